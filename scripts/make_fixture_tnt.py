"""Parity fixture for TNT against timm 1.0.31 (``timm.models.tnt.TNT``, the non-legacy pixel embedding).

Writes ``tnt_timm``: a tiny TNT (patch 16, words 4x4, dims 32 / 8, depth 2, heads 2 / 2) on a 32 px input.

Run with the reference venv, never in CI: ``PYTHONPATH=src /work/refenv/bin/python scripts/make_fixture_tnt.py``.
"""
from __future__ import annotations

import torch
from timm.models.tnt import TNT

from fixture_io import OUT, randomize_all, write  # noqa: E402  (scripts/ is on sys.path)

TINY = dict(patch_size=16, embed_dim=32, inner_dim=8, depth=2, num_heads_inner=2, num_heads_outer=2, qkv_bias=False)
OURS = dict(embed_dim=32, inner_dim=8, depth=2, num_heads_inner=2, num_heads=2)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = TNT(img_size=32, num_classes=10, **TINY)
    randomize_all(model, 1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    write("tnt_timm", model, x, {"model": "tnt_test", "overrides": OURS, "num_classes": 10, "img_size": 32,
                                 "reference": "timm 1.0.31 timm.models.tnt.TNT", "layout": "timm"})


if __name__ == "__main__":
    main()
