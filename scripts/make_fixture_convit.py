"""Parity fixture for ConViT against timm 1.0.31 (``timm.models.convit.ConVit``).

Writes ``convit_timm``: a tiny ConViT (patch 8 on 32 px, so a 4x4 patch grid; 4 heads of 16, depth 3, the first
two blocks GPSA, then the class token and one MHSA block) with random weights, gates included.

Run with the reference venv, never in CI: ``PYTHONPATH=src /work/refenv/bin/python scripts/make_fixture_convit.py``.
"""
from __future__ import annotations

import torch
from timm.models.convit import ConVit

from fixture_io import OUT, randomize_all, write  # noqa: E402  (scripts/ is on sys.path)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = ConVit(img_size=32, patch_size=8, embed_dim=16, num_heads=4, depth=3, local_up_to_layer=2,
                   num_classes=10)
    randomize_all(model, 1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ours = dict(patch_size=8, embed_dim=64, num_heads=4, depth=3, local_up_to_layer=2)
    write("convit_timm", model, x, {"model": "convit_test", "overrides": ours, "num_classes": 10, "img_size": 32,
                                    "reference": "timm 1.0.31 timm.models.convit.ConVit", "layout": "timm"})


if __name__ == "__main__":
    main()
