"""Parity fixtures for UniFormer against the official code.

Reference: ``image_classification/models/uniformer.py`` of Sense-X/UniFormer (MIT) at commit
52a0415e4e0dda880fab8ffbc710e4d8e171149d (2024-01-18), read from a local file and never copied into this
repository. Get it from the mirror that ``fetch github:Sense-X/UniFormer`` gives:
``git --git-dir=<mirror> show 52a0415e:image_classification/models/uniformer.py > /tmp/uniformer/uniformer.py``,
then pass that path as the first argument (or in ``UNIFORMER_OFFICIAL_FILE``). It imports timm's layers, so it runs
in the reference venv.

Two tiny configurations (dims 8/16/24/32, depths 1/2/1/1, head_dim 8, 10 classes, 64 px input), parameters and
BatchNorm statistics randomised (the classifier scaled down so that the logits are of order 1); both keep the
official keys, which are ours:

- ``uniformer_official``: non-overlapping patch embeddings with LayerNorm (the S and B models);
- ``uniformer_official_convstem``: ``conv_stem=True``, the overlapping conv-BN embeddings of the S+ model.

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_uniformer.py /tmp/uniformer/uniformer.py``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from fixture_io import OUT, load_module, randomize_all, write  # noqa: E402  (scripts/ is on sys.path)

OFFICIAL_COMMIT = "52a0415e4e0dda880fab8ffbc710e4d8e171149d"
TINY = dict(dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), head_dim=8)
IMG = 64


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("UNIFORMER_OFFICIAL_FILE")
    if not path or not Path(path).is_file():
        raise SystemExit("pass the official image_classification/models/uniformer.py (see the docstring) as the "
                         "first argument")
    OUT.mkdir(parents=True, exist_ok=True)
    official = load_module(path, "uniformer_official").UniFormer
    reference = f"Sense-X/UniFormer@{OFFICIAL_COMMIT} image_classification/models/uniformer.py UniFormer"
    for seed, (name, conv_stem) in enumerate((("uniformer_official", False), ("uniformer_official_convstem", True))):
        torch.manual_seed(0)
        model = official(depth=list(TINY["depths"]), img_size=IMG, num_classes=10, embed_dim=list(TINY["dims"]),
                         head_dim=TINY["head_dim"], mlp_ratio=4, qkv_bias=True, conv_stem=conv_stem)
        randomize_all(model, seed=2 * seed + 1)
        with torch.no_grad():  # logits of order 1, so that float32 round-off stays well under the 1e-5 tolerance
            model.head.weight.mul_(0.05)
        x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2 * seed + 2))
        overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
        write(name, model, x, {"model": "uniformer_test", "overrides": {**overrides, "conv_stem": conv_stem},
                               "num_classes": 10, "img_size": None, "reference": reference, "layout": "official"})


if __name__ == "__main__":
    main()
