"""Parity fixtures for DHVT against the official code.

Reference: ``vision_transformer.py`` of ArieSeirack/DHVT at commit a86fedab5a58 (2022-12-30), read from a local file
and never copied into this repository. Get it from the mirror that ``fetch github:ArieSeirack/DHVT`` gives:
``git --git-dir=<mirror> show a86fedab5a58:vision_transformer.py > /tmp/dhvt/vision_transformer.py`` and pass that
path as the first argument (or in ``DHVT_OFFICIAL_FILE``). The file imports the repository's ``helpers.py`` for a
function the models do not use, and that imports a profiler: a stub ``helpers`` module stands in. Its SOPE uses
``nn.SyncBatchNorm``, replaced by ``nn.BatchNorm2d`` here (the same keys and the same eval-mode arithmetic).

Two tiny configurations (dim 32, depth 2, 2 heads, 10 classes, random weights with BatchNorm statistics away from
(0, 1)), in the official key layout (loaded through ``DHVT.remap``):

- ``dhvt_official_p16``: patch 16 (four SOPE convs), a 64x64 input (``dhvt_test``);
- ``dhvt_official_p2``: patch 2 (one SOPE conv ending in GELU), a 16x16 input.

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_dhvt.py /tmp/dhvt/vision_transformer.py``.
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch

from fixture_io import OUT, load_module, randomize_fan_in, write  # noqa: E402  (scripts/ is on sys.path)

OFFICIAL_COMMIT = "a86fedab5a58"


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DHVT_OFFICIAL_FILE")
    if not path or not Path(path).is_file():
        raise SystemExit("pass the official vision_transformer.py (see the docstring) as the first argument")
    helpers = types.ModuleType("helpers")
    helpers.complement_idx = None
    sys.modules["helpers"] = helpers
    torch.nn.SyncBatchNorm = torch.nn.BatchNorm2d
    official = load_module(path, "dhvt_official").VisionTransformer
    OUT.mkdir(parents=True, exist_ok=True)
    for name, patch, size, seed in (("dhvt_official_p16", 16, 64, 1), ("dhvt_official_p2", 2, 16, 4)):
        torch.manual_seed(0)
        model = official(img_size=size, patch_size=patch, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4,
                         num_classes=10, apply_dhvt=True)
        randomize_fan_in(model, seed)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(("alpha", "norm1.weight", "norm2.weight", "ht_norm.weight")) or n == "norm.weight":
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
                elif n.endswith(("beta", "pos_embed", "cls_token")) or "norm" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 2))
        meta = {"model": "dhvt_test", "overrides": {"patch_size": patch}, "num_classes": 10, "layout": "official",
                "reference": f"ArieSeirack/DHVT@{OFFICIAL_COMMIT} vision_transformer.py VisionTransformer"}
        write(name, model, x, meta)


if __name__ == "__main__":
    main()
