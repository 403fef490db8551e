"""Parity fixtures for PVT (v1) against the official code.

Reference: ``classification/pvt.py`` of whai362/PVT (Apache-2.0), branch v2, at commit
57e2dfaa5a46f9050d76f306a4fcd9a7c061f520 (2022-10-27), read from a local file and never copied into this
repository. Get it from the mirror that ``fetch github:whai362/PVT`` gives:
``git --git-dir=<mirror> show 57e2dfaa:classification/pvt.py > /tmp/pvt/pvt.py``, then pass that path as the first
argument (or in ``PVT_OFFICIAL_FILE``). It imports timm's layers, so it runs in the reference venv.

One tiny configuration (embed_dims 8/16/24/32, depths 1/2/1/1, heads 1/2/3/4, mlp_ratios 2, sr_ratios 8/4/2/1,
10 classes, built for 64 px), two fixtures in the official key layout (loaded as is, timm has no PVT v1):

- ``pvt_official``: a 64x64 input, the size the position tables are made for;
- ``pvt_official_dynsize``: a 32x96 input, so every stage's table is resampled bilinearly on the fly, down in height
  and up in width (the official ``_get_pos_embed``).

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_pvt.py /tmp/pvt/pvt.py``.
"""
from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

from fixture_io import OUT, load_module, randomize_all, write  # noqa: E402  (scripts/ is on sys.path)

OFFICIAL_COMMIT = "57e2dfaa5a46f9050d76f306a4fcd9a7c061f520"
TINY = dict(embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2),
            sr_ratios=(8, 4, 2, 1))


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PVT_OFFICIAL_FILE")
    if not path or not Path(path).is_file():
        raise SystemExit("pass the official classification/pvt.py (see the docstring) as the first argument")
    official = load_module(path, "pvt_official").PyramidVisionTransformer
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"model": "pvt_test", "overrides": {k: list(v) for k, v in TINY.items()}, "num_classes": 10,
            "img_size": 64, "layout": "official",
            "reference": f"whai362/PVT@{OFFICIAL_COMMIT} classification/pvt.py PyramidVisionTransformer"}
    for name, shape, seed in (("pvt_official", (2, 3, 64, 64), 1), ("pvt_official_dynsize", (2, 3, 32, 96), 3)):
        torch.manual_seed(0)
        model = official(img_size=64, patch_size=4, num_classes=10, qkv_bias=True,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6), **{k: list(v) for k, v in TINY.items()})
        randomize_all(model, seed)
        write(name, model, torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1)), meta)


if __name__ == "__main__":
    main()
