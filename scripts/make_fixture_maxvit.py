"""Parity fixture for MaxViT against timm 1.0.31 (``timm.models.maxxvit.MaxxVit``, Apache-2.0).

A tiny configuration of timm's ``maxvit_*_tf`` recipe (``_tf_cfg``: TF "SAME" padding, BN eps 1e-3, GELU-tanh,
interleaved qkv heads, TF-style relative position bias, a pre-logits head): dims 8/16/16/24, depths 1/2/1/1, stem
width 8, 8 channels per head, built for 64 px so window = grid = 2 (maps 16, 8, 4, 2), 10 classes. Parameters,
BatchNorm statistics and bias tables are randomised. Writes ``tests/fixtures/maxvit_timm.*``.

Run with the reference venv, never in CI: ``/work/refenv/bin/python scripts/make_fixture_maxvit.py``.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from timm.models.maxxvit import MaxxVit, MaxxVitCfg, _tf_cfg

from fixture_io import OUT, randomize_all, write  # noqa: E402  (scripts/ is on sys.path)

TINY = dict(dims=(8, 16, 16, 24), depths=(1, 2, 1, 1), stem_width=8, dim_head=8)
IMG = 64


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tf = _tf_cfg()
    cfg = MaxxVitCfg(embed_dim=TINY["dims"], depths=TINY["depths"], block_type=("M",) * 4,
                     stem_width=TINY["stem_width"], stem_bias=True, head_hidden_size=TINY["dims"][-1],
                     conv_cfg=tf["conv_cfg"], transformer_cfg=replace(tf["transformer_cfg"], dim_head=TINY["dim_head"]))
    torch.manual_seed(0)
    model = MaxxVit(cfg, img_size=IMG, num_classes=10)
    randomize_all(model, seed=1)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    reference = "timm 1.0.31 timm.models.maxxvit.MaxxVit (maxvit_*_tf config, _tf_cfg)"
    write("maxvit_timm", model, x, {"model": "maxvit_test", "overrides": overrides, "num_classes": 10, "img_size": IMG,
                                    "reference": reference, "layout": "timm"})


if __name__ == "__main__":
    main()
