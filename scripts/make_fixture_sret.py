"""Parity fixture for SReT against the official code.

Reference: ``SReT.py`` of szq0214/SReT (MIT) at commit af6db0ae4138 (2022-09-06), read from a local file and
never copied into this repository. Get it from the mirror that ``fetch github:szq0214/SReT`` gives:
``git --git-dir=<mirror> show af6db0ae4138:SReT.py > /tmp/sret/SReT.py`` and pass that path as the first argument
(or in ``SRET_OFFICIAL_FILE``).

The official recursive pass shuffles the tokens with ``torch.randperm`` on every call, in evaluation too. For a
reproducible reference, ``torch.randperm`` is replaced while the fixture runs by the permutation that our evaluation
mode uses (token ``i`` to group ``i mod groups2``: ``arange(N).reshape(N / G, G).T.flatten()``, which the official
code then cuts into ``G`` contiguous groups); everything else is the official arithmetic.

One tiny configuration, ``sret_test`` (base dims 16, heads 1/2/4, depths 2/2/2 with one shared block applied twice per
stage, groups1 8/4/1, groups2 2/1/1, mlp ratio 2, 64 px, 10 classes), random weights (fan-in scaled Linear/Conv,
LayerNorms, learned scalars and BatchNorm statistics away from the defaults), written as ``sret_official`` in the
official key layout (loaded through ``SReT.remap``).

Run with the reference venv, never in CI: ``/work/refenv/bin/python scripts/make_fixture_sret.py /tmp/sret/SReT.py``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from fixture_io import OUT, load_module, randomize_fan_in, write  # noqa: E402  (scripts/ is on sys.path)

OFFICIAL_COMMIT = "af6db0ae4138"
TINY = dict(base_dims=[16, 16, 16], heads=[1, 2, 4], depth=[2, 2, 2], recursive_num=[1, 1, 1], groups1=[8, 4, 1],
            groups2=[2, 1, 1], mlp_ratio=2.0, np_mlp_ratio=1)


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SRET_OFFICIAL_FILE")
    if not path or not Path(path).is_file():
        raise SystemExit("pass the official SReT.py (see the docstring) as the first argument")
    official = load_module(path, "sret_official").SReT
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = official(image_size=64, patch_size=16, stride=8, num_classes=10, drop_path_rate=0.0, **TINY)
    randomize_fan_in(model, 1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias") and "coefficient" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "norm" in n:
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
        model.pos_embed.copy_(0.5 * torch.randn(model.pos_embed.shape, generator=g))
    groups = {N: G for N, G in ((64, 2),)}  # the recursive passes with groups2 > 1: stage 1, 8x8 tokens

    def interleave(n: int, *args, **kwargs) -> torch.Tensor:
        G = groups[n]
        return torch.arange(n).reshape(n // G, G).t().flatten()

    randperm, torch.randperm = torch.randperm, interleave
    try:
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
        meta = {"model": "sret_test", "overrides": {}, "num_classes": 10, "img_size": 64, "layout": "official",
                "reference": f"szq0214/SReT@{OFFICIAL_COMMIT} SReT.py SReT (recursive-pass permutation fixed, see "
                             f"scripts/make_fixture_sret.py)"}
        write("sret_official", model, x, meta)
    finally:
        torch.randperm = randperm


if __name__ == "__main__":
    main()
