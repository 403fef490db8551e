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


DEPLOY_MODELS = [n for n in FULL_MODELS if get_variant(n).deploy_params_m is not None]


@pytest.mark.parametrize("name", DEPLOY_MODELS)
def test_deploy_form_matches_official(name):
    v = get_variant(name)
    with torch.device("meta"):
        model = visionzoo.create_model(name).eval()
        model.fuse()
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - v.deploy_params_m) <= 0.005 * v.deploy_params_m, f"{name}: deploy {n:.3f}M vs {v.deploy_params_m}M"
    if v.deploy_gmacs is not None:
        got = visionzoo.profile(model).gmacs
        assert abs(got - v.deploy_gmacs) <= 0.05 * v.deploy_gmacs, f"{name}: deploy {got:.3f} vs {v.deploy_gmacs}"
