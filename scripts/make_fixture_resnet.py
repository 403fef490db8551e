"""Parity fixtures for ResNet against timm 1.0.31.

Reference: ``timm.models.resnet.ResNet`` (timm 1.0.31), whose key layout equals torchvision's. Writes two fixtures
to tests/fixtures/, each a 4-stage, depth-1 network with the standard 64-channel 7x7 stem, 10 classes, 64 px input:

- ``resnet_bottleneck``: ``Bottleneck`` blocks, ``channels=(8, 16, 16, 32)`` (stage outputs 32, 64, 64, 128);
- ``resnet_basic``: ``BasicBlock`` blocks, ``channels=(8, 16, 16, 32)``.

Every BatchNorm gets random affine parameters and running statistics (timm zero-initialises the last BN of each
branch, which would hide that branch), so eval-mode outputs test the whole network.

Run with the reference venv, never in CI: ``/work/refenv/bin/python scripts/make_fixture_resnet.py``.
"""
from __future__ import annotations

import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from fixture_io import OUT, save_fixture, save_meta  # noqa: E402  (scripts/ is on sys.path)

NUM_CLASSES = 10
CHANNELS = (8, 16, 16, 32)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random BN affine parameters and running statistics; conv and fc weights keep timm's init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def write(name: str, model: torch.nn.Module, x: torch.Tensor, overrides: dict) -> None:
    y, state = save_fixture(name, model, x)
    meta = {"model": "resnet_test", "overrides": overrides, "num_classes": NUM_CLASSES, "img_size": None,
            "reference": "timm 1.0.31 timm.models.resnet.ResNet", "layout": "timm"}
    save_meta(name, meta, indent=1)
    print(name, tuple(x.shape), "->", tuple(y.shape), f"{sum(v.numel() for v in state.values())} values")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for i, (name, block, kind) in enumerate([("resnet_bottleneck", Bottleneck, "bottleneck"),
                                             ("resnet_basic", BasicBlock, "basic")]):
        torch.manual_seed(i)
        model = ResNet(block, layers=(1, 1, 1, 1), channels=CHANNELS, num_classes=NUM_CLASSES)
        randomize(model, 10 + i)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(20 + i))
        dims = [c * block.expansion for c in CHANNELS]
        write(name, model, x, dict(depths=[1, 1, 1, 1], dims=dims, block=kind, stem_width=64))


if __name__ == "__main__":
    main()
