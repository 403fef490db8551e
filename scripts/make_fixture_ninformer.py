"""Parity fixture for NiNformer against the official code.

Reference: ``ninformer.py`` of Abdullah-88/NiNformer at commit 0ec85d46a82ea9472fdd28dde0b70dc0ca62a91a (2024-08-06,
BSD-3-Clause), read from a local file and never copied into this repository. Get it from the mirror that
``fetch github:Abdullah-88/NiNformer`` gives::

    mkdir -p /tmp/nin && git --git-dir=<mirror> show 0ec85d46:ninformer.py > /tmp/nin/ninformer.py

The classification wrapper (``NiNformerImageClassification``) lives in the repository's ``train.py``, which
downloads CIFAR-10 when imported; this script rebuilds the same wrapper around the imported ``NiNformer`` (a 4x4/4
patchify conv, the blocks, a token mean, a linear classifier), as written there.

One tiny model (32 px, patch 8, d_model 32, d_ffn 48, 2 layers, 10 classes) with random weights, on a 32x32
input; also prints the official parameter count of the CIFAR configuration with a 1000-class head. Writes
``tests/fixtures/ninformer_official.*``. Run with the reference venv:
``/work/refenv/bin/python scripts/make_fixture_ninformer.py /tmp/nin/ninformer.py``.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from fixture_io import load_module, randomize_fan_in, write  # noqa: E402  (scripts/ is on sys.path)


def classifier(official, image_size: int, patch_size: int, d_model: int, d_ffn: int, num_layers: int,
               num_classes: int) -> nn.Module:
    """The official ``NiNformerImageClassification`` of train.py, rebuilt (same modules, names and forward)."""
    class NiNformerImageClassification(official.NiNformer):
        def __init__(self) -> None:
            super().__init__(d_model, d_ffn, (image_size // patch_size) ** 2, num_layers, 0.5)
            self.patcher = nn.Conv2d(3, d_model, kernel_size=patch_size, stride=patch_size)
            self.classifier = nn.Linear(d_model, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            patches = self.patcher(x)
            B, C = patches.shape[:2]
            embedding = self.model(patches.permute(0, 2, 3, 1).reshape(B, -1, C))
            return self.classifier(embedding.mean(dim=1))

    return NiNformerImageClassification()


def main(path: str) -> None:
    official = load_module(path, "ninformer_official")
    full = classifier(official, 32, 4, 256, 512, 4, 1000)
    print("ninformer_cifar params (1000 classes):", sum(p.numel() for p in full.parameters()))
    torch.manual_seed(0)
    model = classifier(official, 32, 8, 32, 48, 2, 10)
    randomize_fan_in(model, seed=0)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    write("ninformer_official", model, x, {"model": "ninformer_test", "num_classes": 10, "img_size": 32,
                                           "overrides": {"patch_size": 8, "embed_dim": 32, "hidden_dim": 48,
                                                         "depth": 2}})


if __name__ == "__main__":
    main(sys.argv[1])
