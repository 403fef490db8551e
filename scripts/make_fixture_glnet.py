"""Parity fixtures for GLNet against the official rayleizhu/GLMix@3c93dbf ``models/glnet.py``.

Writes to tests/fixtures/ (official keys: ``downsample_layers.i``, ``norm``, ``head``; our ``GLNet.remap``
translates them), each with random weights and BatchNorm statistics, run in eval mode:

- ``glnet_official``: the ``glnet_test`` configuration (the GLNet-4G layout: overlapping downsamplings, CPE, residual
  dw-conv MLPs, GLMix / alternating / MHSA stages; widths 32/32/64/64, 4 slots), with layer scale on, 64x96 input;
- ``glnet_official_stl``: the GLNet-STL layout (4x4 stem, BN + 2x2 conv downsamplings, GLMix in stages 1-3, token
  MHSA blocks in stage 4, no CPE), tiny widths, 64 slots (the 8x8 pooling upsamples the small maps), 64x64 input.

``fairscale`` (imported by the official file for activation checkpointing only) is stubbed. Run with the reference
venv, never in CI: ``PYTHONPATH=src /work/refenv/bin/python scripts/make_fixture_glnet.py --official <git dir>``
"""
from __future__ import annotations

import sys
import types

import torch
from torch import nn

from fixture_io import import_official, official_path, randomize_fan_in, write  # noqa: E402  (scripts/ on sys.path)

COMMIT = "3c93dbf"
FILE = "models/glnet.py"


def _stub_fairscale() -> None:
    mods = {n: types.ModuleType(n) for n in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint")}
    mods["fairscale.nn.checkpoint"].checkpoint_wrapper = lambda m: m
    sys.modules.update(mods)


@torch.no_grad()
def _randomize(model: nn.Module, seed: int) -> None:
    randomize_fan_in(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    for name, p in model.named_parameters():
        if name.endswith("in_proj_weight"):
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
        elif name.endswith(("in_proj_bias", "gamma")) or (p.ndim == 1 and "norm" in name and "bias" in name):
            p.copy_(0.1 * torch.randn(p.shape, generator=g) + (0.5 if name.endswith("gamma") else 0.0))
        elif p.ndim == 1 and "norm" in name and "weight" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("slot_scale"):
            p.fill_(8.0)  # sharper clusters than the init 1/sqrt(C)


def main() -> None:
    path = official_path(__doc__, "GLNET_OFFICIAL", "git dir of rayleizhu/GLMix or the glnet.py file")
    _stub_fairscale()
    glnet = import_official(path, COMMIT, FILE, "glnet_official")
    ref = f"rayleizhu/GLMix@{COMMIT} {FILE} GLNet"

    torch.manual_seed(0)
    model = glnet.GLNet(depth=[1, 1, 2, 1], embed_dim=[32, 32, 64, 64], mlp_ratios=[3] * 4, head_dim=32,
                        norm_layer=nn.BatchNorm2d, mixing_modes=("glmix", "glmix", "glmix.mha_nchw", "mha_nchw"),
                        local_dw_ks=5, slot_init="ada_avgpool", num_slots=4, cpe_ks=3, downsample_style="ovlp",
                        transition_layout="proj.norm", mlp_dw=True, layerscale=0.5, num_classes=10)
    _randomize(model, 1)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    write("glnet_official", model, x, {"model": "glnet_test", "num_classes": 10, "overrides": {"ls_init": 0.5},
                                       "reference": ref})

    torch.manual_seed(0)
    model = glnet.GLNet(depth=[1, 1, 1, 1], embed_dim=[32, 32, 64, 64], mlp_ratios=[4] * 4, head_dim=32,
                        norm_layer=nn.BatchNorm2d, mixing_modes=("glmix", "glmix", "glmix", "mha"), local_dw_ks=5,
                        slot_init="ada_avgpool", num_slots=64, transition_layout="norm.proj", num_classes=10)
    _randomize(model, 3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    overrides = {"depths": [1, 1, 1, 1], "num_slots": 64, "mlp_ratio": 4.0,
                 "mixing_modes": ["glmix", "glmix", "glmix", "mha"], "cpe_ks": 0, "overlap": False, "res_dw": False}
    write("glnet_official_stl", model, x, {"model": "glnet_test", "num_classes": 10, "overrides": overrides,
                                           "reference": ref})


if __name__ == "__main__":
    main()
