"""Parity fixtures for InceptionNeXt against timm 1.0.31 (``timm.models.inception_next.MetaNeXt``, Apache-2.0).

Both use depths 1/1/1/1, dims 8/16/24/32, MLP ratios 4/4/4/3, 10 classes, a 2x3x64x64 input, and every parameter
and BatchNorm running statistic randomised with ``fixture_io.randomize_all`` (layer-scale ``gamma`` starts
at 1e-6, which would hide every block).
Writes to tests/fixtures/:

- ``inception_next_timm``: the tiny/small/base token mixer (square 3, band 11, branch_ratio 0.125);
- ``inception_next_timm_atto``: the atto token mixer (band 9, branch_ratio 0.25).

Run with the reference venv, never in CI: ``/work/refenv/bin/python scripts/make_fixture_inception_next.py``.
"""
from __future__ import annotations

import os
from functools import partial

import torch
from timm.models.inception_next import InceptionDWConv2d, MetaNeXt

from fixture_io import OUT, randomize_all, save_fixture, save_meta  # noqa: E402  (scripts/ is on sys.path)

NUM_CLASSES = 10
TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    cases = [("inception_next_timm", dict(band_kernel_size=11, branch_ratio=0.125)),
             ("inception_next_timm_atto", dict(band_kernel_size=9, branch_ratio=0.25))]
    for i, (name, mixer) in enumerate(cases):
        torch.manual_seed(i)
        model = MetaNeXt(num_classes=NUM_CLASSES, token_mixers=partial(InceptionDWConv2d, **mixer), **TINY)
        randomize_all(model, 10 + i)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(20 + i))
        y, state = save_fixture(name, model, x)
        overrides = {**{k: list(v) for k, v in TINY.items()}, **mixer}
        meta = {"model": "inception_next_test", "overrides": overrides, "num_classes": NUM_CLASSES, "img_size": None,
                "reference": "timm 1.0.31 timm.models.inception_next.MetaNeXt", "layout": "timm"}
        save_meta(name, meta, indent=1)
        sizes = [os.path.getsize(OUT / f"{name}{s}") for s in (".safetensors", ".io.safetensors")]
        print(f"{name}: {tuple(x.shape)} -> {tuple(y.shape)}, |y| max {y.abs().max():.3f}, files {sizes} bytes")


if __name__ == "__main__":
    main()
