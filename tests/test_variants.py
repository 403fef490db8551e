"""Every full variant builds on the meta device with the official parameter count."""
from __future__ import annotations

import pytest
import torch

import visionzoo
from conftest import FULL_MODELS
from visionzoo.registry import get_variant


@pytest.mark.parametrize("name", FULL_MODELS)
def test_params_match_official(name):
    v = get_variant(name)
    with torch.device("meta"):
        model = visionzoo.create_model(name)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - v.params_m) <= 0.005 * v.params_m, f"{name}: {n:.3f}M vs official {v.params_m}M"
    modules = dict(model.named_modules())
    assert all(f.module in modules for f in model.feature_info)


@pytest.mark.parametrize("name", FULL_MODELS)
def test_macs_match_official(name):
    v = get_variant(name)
    if v.gmacs is None:
        pytest.skip(f"{name}: no official MAC count recorded")
    got = visionzoo.profile(name).gmacs
    assert abs(got - v.gmacs) <= 0.05 * v.gmacs, f"{name}: {got:.3f} GMACs vs official {v.gmacs}"
