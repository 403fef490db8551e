"""Parity fixtures for SVT against the official code (badripatro/svt), which runs pytorch_wavelets' DTCWT.

Reference: ``svt.py`` of badripatro/svt at commit fcbc9b325f5d54f0a2e0fef8f35533240faa03c9, read from a local git
directory (the ``fetch github:badripatro/svt`` mirror) given as ``--official PATH`` or ``SVT_OFFICIAL``, and never
copied into this repository. It imports pytorch_wavelets (``DTCWTForward``/``DTCWTInverse``) and timm, both in the
reference venv. Run there, never in CI:
``/work/refenv/bin/python scripts/make_fixture_svt.py --official /work/.mirror/badripatro+svt/repo``.

Writes to tests/fixtures/:

- ``svt_official``: the official ``SVT`` with stem 8, dims 16/32/48/64, depths 2/1/1/1, heads 1/2/3/4, mlp ratios
  2, token labeling on (aux head), 10 classes, eval mode, on a 2x3x64x64 input. The official scattering mixer has
  weights only for dims 64/96/128/192 at 224 px; this script gives each stage-1 mixer the same parameters for 16
  channels on the 64 px grid (low-pass 16x16, 4 channel blocks of 4), the shapes its forward needs; the forward
  (DTCWT, MLP, inverse DTCWT) is the official one. Its state dict holds the transforms' filter buffers
  (``attn.xfm.h0o``, ...), which our ``remap`` drops.
"""
from __future__ import annotations

import torch
from torch import nn

from fixture_io import import_official, official_path, randomize_all, write  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "fcbc9b325f5d54f0a2e0fef8f35533240faa03c9"
CFG = dict(stem_hidden_dim=8, embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], mlp_ratios=[2, 2, 2, 2],
           depths=[2, 1, 1, 1])


def build(official, grid: tuple[int, int]) -> nn.Module:  # noqa: ANN001
    from functools import partial

    model = official.SVT(norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=10, **CFG)
    dim, nb = CFG["embed_dims"][0], 4
    bs = dim // nb
    for block in model.block1:
        mixer = block.attn
        mixer.hidden_size, mixer.num_blocks, mixer.block_size = dim, nb, bs
        mixer.complex_weight_ll = nn.Parameter(0.02 * torch.randn(dim, *grid))
        mixer.complex_weight_lh_1 = nn.Parameter(0.02 * torch.randn(2, nb, bs, bs))
        mixer.complex_weight_lh_2 = nn.Parameter(0.02 * torch.randn(2, nb, bs, bs))
        mixer.complex_weight_lh_b1 = nn.Parameter(0.02 * torch.randn(2, nb, bs))
        mixer.complex_weight_lh_b2 = nn.Parameter(0.02 * torch.randn(2, nb, bs))
    return model


def main() -> None:
    path = official_path(__doc__.splitlines()[0], "SVT_OFFICIAL", "git dir of badripatro/svt")
    official = import_official(path, COMMIT, "svt.py", "svt_official")
    overrides = dict(dims=CFG["embed_dims"], depths=CFG["depths"], num_heads=CFG["num_heads"],
                     mlp_ratios=CFG["mlp_ratios"], stem_hidden=8)
    torch.manual_seed(0)
    model = build(official, (16, 16))
    randomize_all(model, 10)  # parameters only: the transforms' filter buffers stay as the official code makes them
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(20))
    write("svt_official", model, x, {"model": "svt_test", "overrides": overrides, "num_classes": 10, "img_size": 64,
                                     "reference": f"badripatro/svt@{COMMIT} svt.py SVT"})

if __name__ == "__main__":
    main()
