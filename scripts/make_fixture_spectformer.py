"""Parity fixtures for SpectFormer (hierarchical and vanilla) against the official code (badripatro/SpectFormers).

Reference: ``hierarchical_architecture/spectformer.py`` and ``vanilla_architecture/spectformer.py`` of
badripatro/SpectFormers at commit b6cf487a0ea71eeb252d5ba0fc7410b3f5dbd256, read from a local git directory (the
``fetch github:badripatro/SpectFormers`` mirror) given as ``--official PATH`` or ``SPECTFORMER_OFFICIAL``, and never
copied into this repository. The hierarchical file imports pytorch_wavelets (unused) and timm; the vanilla one
imports ``numpy.lib.arraypad`` (gone in numpy 2: a shim provides it). Run in the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_spectformer.py --official /work/.mirror/badripatro+SpectFormers/repo``.

Writes to tests/fixtures/:

- ``spectformer_official``: the official hierarchical ``SpectFormer`` with stem 8, dims 16/32/48/64, depths
  1/1/1/1, heads 1/2/3/4, mlp ratios 2, token labeling on (aux head), 10 classes, eval mode (the official inference
  output ``head(cls) + 0.5 * max(aux_head(tokens))``), on a 2x3x64x64 input. The official filters exist only for
  dims 64/96/128/192 at 224 px; this script gives each spectral block a ``complex_weight`` on the 64 px grid
  (16x9 in stage 1, 8x5 in stage 2), the shapes its forward needs; the forward itself is the official one.
- ``spectformer_official_nodense``: the same with ``token_label=False`` (class-token logits only).
- ``spectformer_vit_official``: the official vanilla ``SpectFormer`` at img_size 64, patch 16, width 48, depth 6
  (4 spectral blocks, then 2 attention blocks with the hard-coded 6 heads), mlp ratio 2, 10 classes.
"""
from __future__ import annotations

import contextlib
import io
import sys
import types
from functools import partial

import numpy
import torch
from torch import nn

from fixture_io import import_official, official_path, randomize_all, write  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "b6cf487a0ea71eeb252d5ba0fc7410b3f5dbd256"
REPO = f"badripatro/SpectFormers@{COMMIT}"
H = dict(stem_hidden_dim=8, embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], mlp_ratios=[2, 2, 2, 2],
         depths=[1, 1, 1, 1])


def hierarchical(official, token_label: bool) -> nn.Module:  # noqa: ANN001
    model = official.SpectFormer(norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=10,
                                 token_label=token_label, **H)
    for i, (dim, side) in enumerate(((16, 16), (32, 8))):
        for block in getattr(model, f"block{i + 1}"):
            block.attn.h, block.attn.w = side, side // 2 + 1
            block.attn.complex_weight = nn.Parameter(0.02 * torch.randn(side, side // 2 + 1, dim, 2))
    return model


def main() -> None:
    path = official_path(__doc__.splitlines()[0], "SPECTFORMER_OFFICIAL", "git dir of badripatro/SpectFormers")
    shim = types.ModuleType("numpy.lib.arraypad")
    shim.pad = numpy.pad
    sys.modules["numpy.lib.arraypad"] = shim
    hier = import_official(path, COMMIT, "hierarchical_architecture/spectformer.py", "spectformer_h_official")
    vanilla = import_official(path, COMMIT, "vanilla_architecture/spectformer.py", "spectformer_v_official")
    overrides = dict(dims=H["embed_dims"], depths=H["depths"], num_heads=H["num_heads"], mlp_ratios=H["mlp_ratios"],
                     stem_hidden=8)
    for i, (name, dense) in enumerate((("spectformer_official", True), ("spectformer_official_nodense", False))):
        torch.manual_seed(i)
        model = hierarchical(hier, dense)
        randomize_all(model, 10 + i)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(20 + i))
        write(name, model, x, {"model": "spectformer_test", "overrides": {**overrides, "token_label": dense},
                               "num_classes": 10, "img_size": 64,
                               "reference": f"{REPO} hierarchical_architecture/spectformer.py SpectFormer"})
    torch.manual_seed(2)
    with contextlib.redirect_stdout(io.StringIO()):  # the official constructor prints its drop-path setting
        model = vanilla.SpectFormer(img_size=64, patch_size=16, embed_dim=48, depth=6, mlp_ratio=2, num_classes=10)
    randomize_all(model, 12)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(22))
    write("spectformer_vit_official", model, x,
          {"model": "spectformer_vit_test", "num_classes": 10, "img_size": 64,
           "overrides": dict(embed_dim=48, depth=6, num_heads=6, spectral_layers=4, mlp_ratio=2),
           "reference": f"{REPO} vanilla_architecture/spectformer.py SpectFormer"})


if __name__ == "__main__":
    main()
