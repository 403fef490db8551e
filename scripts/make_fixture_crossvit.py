"""Parity fixtures for CrossViT against timm 1.0.31 (``timm.models.crossvit.CrossVit``).

Writes ``crossvit_timm`` (linear patch embedding) and ``crossvit_timm_dagger`` (the three-conv embedding): a tiny
two-branch model (patch 12 on 72 px, patch 16 on the 64 px resize; widths 32 / 64, two multi-scale blocks of one
block per branch) with random weights, so the bicubic resize, both heads and the cross-attention all count.

Run with the reference venv, never in CI: ``PYTHONPATH=src /work/refenv/bin/python scripts/make_fixture_crossvit.py``.
"""
from __future__ import annotations

import torch
from timm.models.crossvit import CrossVit

from fixture_io import OUT, randomize_all, write  # noqa: E402  (scripts/ is on sys.path)

TINY = dict(img_size=72, img_scale=(1.0, 64 / 72), patch_size=(12, 16), embed_dim=(32, 64),
            depth=((1, 1, 0), (1, 1, 0)), num_heads=(2, 2), mlp_ratio=(2.0, 2.0, 1.0), num_classes=10)
OURS = dict(img_scale=(1.0, 64 / 72), embed_dim=(32, 64), depth=((1, 1, 0), (1, 1, 0)), num_heads=(2, 2),
            mlp_ratio=(2.0, 2.0, 1.0))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, multi_conv, seed in (("crossvit_timm", False, 1), ("crossvit_timm_dagger", True, 3)):
        torch.manual_seed(0)
        model = CrossVit(**TINY, multi_conv=multi_conv)
        randomize_all(model, seed)
        x = torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(seed + 1))
        write(name, model, x, {"model": "crossvit_test", "overrides": {**OURS, "multi_conv": multi_conv},
                               "num_classes": 10, "img_size": 72, "layout": "timm",
                               "reference": "timm 1.0.31 timm.models.crossvit.CrossVit"})


if __name__ == "__main__":
    main()
