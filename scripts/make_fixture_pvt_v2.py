"""Parity fixtures for PVT v2 against timm 1.0.31 and the official code.

References:
- ``timm.models.pvt_v2.PyramidVisionTransformerV2`` (timm 1.0.31, Apache-2.0), whose key layout we keep;
- ``classification/pvt_v2.py`` of whai362/PVT (Apache-2.0), branch v2, at commit
  57e2dfaa5a46f9050d76f306a4fcd9a7c061f520 (2022-10-27), read from a local file and never copied into this
  repository. Get it from the mirror that ``fetch github:whai362/PVT`` gives:
  ``git --git-dir=<mirror> show 57e2dfaa:classification/pvt_v2.py > /tmp/pvt/pvt_v2_official.py``, then pass that
  path as the first argument (or in ``PVT_V2_OFFICIAL_FILE``). It imports timm's layers.

One tiny configuration (embed_dims 8/16/24/32, depths 1/2/1/1, heads 1/2/3/4, mlp_ratios 2, sr_ratios 8/4/2/1,
10 classes). Writes to tests/fixtures/:

- ``pvt_v2_timm``: timm's model (strided-conv SRA) on a 64x64 input;
- ``pvt_v2_timm_li``: timm's model with ``linear=True`` (linear SRA, extra ReLU) on a 32x96 input;
- ``pvt_v2_official``: the official model on a 32x96 input; its state dict keeps the official layout
  (``patch_embed{i}``, ``block{i}``, ``norm{i}``, ``mlp.dwconv.dwconv``), so the test goes through
  ``PyramidVisionTransformerV2.remap``.

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_pvt_v2.py /tmp/pvt/pvt_v2_official.py``.
"""
from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from torch import nn

from fixture_io import OUT, load_module, randomize_all, write  # noqa: E402  (scripts/ is on sys.path)

OFFICIAL_COMMIT = "57e2dfaa5a46f9050d76f306a4fcd9a7c061f520"
TINY = dict(embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2),
            sr_ratios=(8, 4, 2, 1))


def make(name: str, model: nn.Module, shape: tuple[int, ...], seed: int, linear: bool, reference: str,
         layout: str) -> None:
    randomize_all(model, seed)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    overrides = {**{k: list(v) for k, v in TINY.items()}, "linear": linear}
    write(name, model, x, {"model": "pvt_v2_test", "overrides": overrides, "num_classes": 10, "img_size": None,
                           "reference": reference, "layout": layout})


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PVT_V2_OFFICIAL_FILE")
    if not path or not Path(path).is_file():
        raise SystemExit("pass the official classification/pvt_v2.py (see the docstring) as the first argument")
    OUT.mkdir(parents=True, exist_ok=True)
    timm_ref = "timm 1.0.31 timm.models.pvt_v2.PyramidVisionTransformerV2"
    for name, linear, shape, seed in (("pvt_v2_timm", False, (2, 3, 64, 64), 1),
                                      ("pvt_v2_timm_li", True, (2, 3, 32, 96), 3)):
        torch.manual_seed(0)
        model = PyramidVisionTransformerV2(num_classes=10, linear=linear, **TINY)
        make(name, model, shape, seed, linear, timm_ref + (" (linear=True)" if linear else ""), "timm")

    official = load_module(path, "pvt_v2_official").PyramidVisionTransformerV2
    torch.manual_seed(0)
    model = official(img_size=64, patch_size=4, num_classes=10, qkv_bias=True,
                     norm_layer=partial(nn.LayerNorm, eps=1e-6), **{k: list(v) for k, v in TINY.items()})
    make("pvt_v2_official", model, (2, 3, 32, 96), 5, False,
         f"whai362/PVT@{OFFICIAL_COMMIT} classification/pvt_v2.py PyramidVisionTransformerV2", "official")


if __name__ == "__main__":
    main()
