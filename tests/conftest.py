"""Shared fixtures: one thread, fixed seed, each tiny model built once per session."""
from __future__ import annotations

import copy

import pytest
import torch

import visionzoo

torch.set_num_threads(1)

TEST_MODELS = visionzoo.list_models("*_test")
FULL_MODELS = visionzoo.list_models(exclude_test=True)

_CACHE: dict[str, torch.nn.Module] = {}


@pytest.fixture(autouse=True, scope="session")
def private_visionzoo_cache(tmp_path_factory):
    """Measured choices (deploy backends, kernels) go to a temporary cache, never the user's; the Linear/Conv2d
    kernel is pinned (its calibration takes seconds on a loaded machine; tests/tools/test_deploy.py measures it)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VISIONZOO_CACHE", str(tmp_path_factory.mktemp("visionzoo-cache")))
    mp.setenv("VISIONZOO_KERNEL", "onednn")
    yield
    mp.undo()


def _build(name: str) -> torch.nn.Module:
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = visionzoo.create_model(name, num_classes=10).eval()
    return _CACHE[name]


@pytest.fixture
def tiny_model():
    """Factory: a fresh deep copy of the session-cached ``*_test`` model with 10 classes."""
    def get(name: str) -> torch.nn.Module:
        return copy.deepcopy(_build(name))
    return get


def make_input(model: torch.nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A batch at the model's default input size (its data_config)."""
    _, h, w = model.data_config["input_size"]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.in_chans, h, w, generator=g)


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
