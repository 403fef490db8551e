"""Parity fixture for VOLO against timm 1.0.31.

Reference: ``timm.models.volo.VOLO`` (timm 1.0.31; a port of sail-sg/volo, whose checkpoints timm loads without a
key filter, so the timm layout is also the official one). One tiny configuration, ``volo_test`` with four stages
(layers 1/1/1/1, dims 32/64/64/64, heads 2/4/4/4, stem width 16, one class-attention block, aux head, 64 px,
10 classes), random weights (fan-in scaled Linear/Conv, LayerNorms and BatchNorm statistics away from the
defaults, non-trivial position table and class token), writes ``volo_timm`` to tests/fixtures/. The output checks the
whole eval path: Outlookers, transformer stages, class attention, and the class + 0.5 * max(aux) head.

Run with the reference venv, never in CI: ``PYTHONPATH=src /work/refenv/bin/python scripts/make_fixture_volo.py``.
"""
from __future__ import annotations

import torch
from timm.models.volo import VOLO

from fixture_io import OUT, randomize_fan_in, write  # noqa: E402  (scripts/ is on sys.path)

TINY = dict(layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64), num_heads=(2, 4, 4, 4), stem_hidden_dim=16,
            post_layers=("ca",), img_size=64, num_classes=10)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = VOLO(**TINY)
    randomize_fan_in(model, 1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        model.pos_embed.copy_(0.5 * torch.randn(model.pos_embed.shape, generator=g))
        model.cls_token.copy_(0.5 * torch.randn(model.cls_token.shape, generator=g))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    overrides = {"layers": [1, 1, 1, 1], "embed_dims": [32, 64, 64, 64], "num_heads": [2, 4, 4, 4],
                 "downsamples": [True, False, False, False], "outlook_attention": [True, False, False, False]}
    meta = {"model": "volo_test", "overrides": overrides, "num_classes": 10, "img_size": 64, "layout": "timm",
            "reference": "timm 1.0.31 timm.models.volo.VOLO"}
    write("volo_timm", model, x, meta)


if __name__ == "__main__":
    main()
