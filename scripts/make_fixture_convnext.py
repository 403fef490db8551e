"""Parity fixtures for ConvNeXt against timm 1.0.31 and the official facebookresearch/ConvNeXt code.

Writes three fixtures to tests/fixtures/, each a 4-stage, depth-1 network with dims (8, 16, 24, 32), 10 classes,
on a 64 px input:

- ``convnext_timm``: ``timm.models.convnext.ConvNeXt`` (Linear MLP on channels-last maps, the paper's sizes);
- ``convnext_timm_convmlp``: the same with ``conv_mlp=True`` (1x1-conv MLP, timm's atto..nano sizes);
- ``convnext_official``: ``ConvNeXt`` from facebookresearch/ConvNeXt@048efcea897d999aed302f2639b6270aedf8d4c8,
  ``models/convnext.py`` (official key layout: ``downsample_layers``, ``dwconv``, ``pwconv1``, ``norm``, ``head``).

Every parameter is randomised, LayerNorm affines and layer-scale ``gamma`` included (``gamma`` starts at 1e-6,
which would hide every block).

The official file is not copied into this repository: give a git directory of the official repository (it is
read at the pinned commit) or the path of its ``models/convnext.py``, via ``--official PATH`` or the environment
variable ``CONVNEXT_OFFICIAL``. Its imports need timm (``DropPath``, ``trunc_normal_``, ``register_model``).

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_convnext.py --official /path/to/ConvNeXt/.git``.
"""
from __future__ import annotations

import torch
from timm.models.convnext import ConvNeXt as TimmConvNeXt

from fixture_io import OUT, import_official, official_path, save_fixture, save_meta  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "048efcea897d999aed302f2639b6270aedf8d4c8"
NUM_CLASSES = 10
DEPTHS, DIMS = [1, 1, 1, 1], [8, 16, 24, 32]


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter: norm weights and ``gamma`` around 1, the rest around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or ("norm" in name and name.endswith("weight")) or \
                    (p.ndim == 1 and name.endswith("weight")):  # LayerNorm weights (stem/downsample norms too)
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def write(name: str, model: torch.nn.Module, x: torch.Tensor, overrides: dict, reference: str, layout: str) -> None:
    y, state = save_fixture(name, model, x)
    meta = {"model": "convnext_test", "overrides": overrides, "num_classes": NUM_CLASSES, "img_size": None,
            "reference": reference, "layout": layout}
    save_meta(name, meta, indent=1)
    print(name, tuple(x.shape), "->", tuple(y.shape), f"{sum(v.numel() for v in state.values())} values")


def main() -> None:
    official_dir = official_path(__doc__.splitlines()[0], "CONVNEXT_OFFICIAL",
                                 "git dir of facebookresearch/ConvNeXt, or its models/convnext.py")
    OUT.mkdir(parents=True, exist_ok=True)
    timm_ref = "timm 1.0.31 timm.models.convnext.ConvNeXt"

    for i, conv_mlp in enumerate((False, True)):
        torch.manual_seed(i)
        model = TimmConvNeXt(depths=DEPTHS, dims=DIMS, conv_mlp=conv_mlp, num_classes=NUM_CLASSES)
        randomize(model, 10 + i)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(20 + i))
        overrides = dict(depths=DEPTHS, dims=DIMS, conv_mlp=conv_mlp)
        write("convnext_timm_convmlp" if conv_mlp else "convnext_timm", model, x, overrides,
              timm_ref + (" (conv_mlp=True)" if conv_mlp else ""), "timm")

    official = import_official(official_dir, COMMIT, "models/convnext.py", "official_convnext").ConvNeXt
    torch.manual_seed(2)
    model = official(depths=DEPTHS, dims=DIMS, num_classes=NUM_CLASSES)
    randomize(model, 12)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(22))
    write("convnext_official", model, x, dict(depths=DEPTHS, dims=DIMS),
          f"facebookresearch/ConvNeXt@{COMMIT} models/convnext.py ConvNeXt", "official")


if __name__ == "__main__":
    main()
