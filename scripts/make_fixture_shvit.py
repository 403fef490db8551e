"""Parity fixtures for SHViT against timm 1.0.31 (``timm.models.shvit.SHViT``) and the official ysj9909/SHViT@6a729cc
``model/shvit.py`` (optional: ``--official <git dir or file>``).

Writes ``shvit_timm`` to tests/fixtures/: the ``shvit_test`` configuration (widths 32/48/64, one block per stage,
attention in stages 2-3) with random weights and BatchNorm statistics, on a 96x80 input (the padded stride-2 convs
round the 80 px side up: 5 -> 3 -> 2 tokens). Keys are timm's (``head.bn``, ``head.l``); our ``SHViT.remap``
translates the classifier. With ``--official``, also ``shvit_official``: the same configuration and weights built by
the official ``SHViT`` (flat ``blocks1``-``blocks3`` with the downsamplings inline), keys as it names them.

Run with the reference venv, never in CI:
``PYTHONPATH=src /work/refenv/bin/python scripts/make_fixture_shvit.py [--official <git dir of ysj9909/SHViT>]``
"""
from __future__ import annotations

import argparse
import re

import torch
from timm.models.shvit import SHViT

from fixture_io import OUT, import_official, randomize_fan_in, write  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "6a729cc"
FILE = "model/shvit.py"


def _timm_to_official(key: str) -> str:
    """timm's key -> the official flat layout (the inverse of the conversion timm's hub weights went through)."""
    m = re.match(r"^stages\.(\d+)\.(downsample|blocks)\.(\d+)\.(.*)$", key)
    if not m:
        return key
    i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
    if kind == "blocks":
        return f"blocks{i + 1}.{j + 3 if i else j}.{rest}"
    pos = {0: "0.0", 1: "0.1", 2: "1", 3: "2.0", 4: "2.1"}[j]
    return f"blocks{i + 1}.{pos}.{rest}"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = SHViT(embed_dim=(32, 48, 64), depth=(1, 1, 1), partial_dim=(8, 12, 16), types=("i", "s", "s"),
                  num_classes=10)
    randomize_fan_in(model, 1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the head's BatchNorm1d and the GroupNorms, which randomize_fan_in leaves at (1, 0)
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.GroupNorm)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(2))
    write("shvit_timm", model, x, {"model": "shvit_test", "num_classes": 10, "layout": "timm",
                                   "reference": "timm 1.0.31 timm.models.shvit.SHViT"})

    parser = argparse.ArgumentParser()
    parser.add_argument("--official", default=None)
    path = parser.parse_args().official
    if path:
        off = import_official(path, COMMIT, FILE, "shvit_official")
        official = off.SHViT(embed_dim=[32, 48, 64], partial_dim=[8, 12, 16], qk_dim=[16, 16, 16], depth=[1, 1, 1],
                             types=["i", "s", "s"], num_classes=10)
        official.load_state_dict({_timm_to_official(k): v for k, v in model.state_dict().items()})
        write("shvit_official", official, x, {"model": "shvit_test", "num_classes": 10,
                                              "reference": f"ysj9909/SHViT@{COMMIT} {FILE} SHViT"})


if __name__ == "__main__":
    main()
