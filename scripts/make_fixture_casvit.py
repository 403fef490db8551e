"""Parity fixture for CAS-ViT against the official Tianfang-Zhang/CAS-ViT@041d2d6 ``classification/model/rcvit.py``.

Writes ``casvit_official`` to tests/fixtures/: the ``casvit_test`` configuration (one block per stage, widths
16/24/32/48, with the distillation head) built by the official ``RCViT``, with random weights and BatchNorm
statistics, run in eval mode (the two heads averaged) on a 64x96 input. Keys are the official ones (``network.i``,
``head``, ``dist_head``); our ``CASViT.remap`` translates them.

Run with the reference venv, never in CI:
``PYTHONPATH=src /work/refenv/bin/python scripts/make_fixture_casvit.py --official <git dir of the repo>``
"""
from __future__ import annotations

import torch

from fixture_io import import_official, official_path, randomize_fan_in, write  # noqa: E402  (scripts/ on sys.path)

COMMIT = "041d2d6"
FILE = "classification/model/rcvit.py"


def main() -> None:
    path = official_path(__doc__, "CASVIT_OFFICIAL", "git dir of Tianfang-Zhang/CAS-ViT or the rcvit.py file")
    rcvit = import_official(path, COMMIT, FILE, "rcvit_official")
    torch.manual_seed(0)
    model = rcvit.RCViT(layers=[1, 1, 1, 1], embed_dims=[16, 24, 32, 48], num_classes=10)
    randomize_fan_in(model, 1)
    with torch.no_grad():  # residual sums grow the features to std ~20: small classifiers keep the logits near 1
        for fc in (model.head, model.dist_head):
            fc.weight.mul_(0.05)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    write("casvit_official", model, x, {"model": "casvit_test", "num_classes": 10,
                                        "reference": f"Tianfang-Zhang/CAS-ViT@{COMMIT} {FILE} RCViT"})


if __name__ == "__main__":
    main()
