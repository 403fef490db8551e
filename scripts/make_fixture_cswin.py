"""Parity fixture for the CSWin Transformer against the official code.

Reference: ``models/cswin.py`` of microsoft/CSWin-Transformer (MIT) at commit
f111ae2f771df32006e7afd7916835dd67d4cb9d (2022-03-18), read from a local file and never copied into this
repository. Get it from the mirror that ``fetch github:microsoft/CSWin-Transformer`` gives:
``git --git-dir=<mirror> show f111ae2f:models/cswin.py > /tmp/cswin/cswin.py``, then pass that path as the first
argument (or in ``CSWIN_OFFICIAL_FILE``). It imports timm's layers and einops (``/work/refenv/bin/pip install
einops``), so it runs in the reference venv.

The official model is built for one square input size (its token reshapes use ``img_size``), so the fixture uses
its tiny configuration at that size: embed_dim 6, depths 1/1/2/1, heads 2/2/2/2, stripe widths 1/2/2/2, mlp_ratio
2, 10 classes, 64 px. Stages 1-3 (16x16, 8x8, 4x4 maps) have several stripes in each direction, stage 4 is full
attention. Writes ``tests/fixtures/cswin_official.*`` (official key layout, loaded through ``remap``).

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_cswin.py /tmp/cswin/cswin.py``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from fixture_io import OUT, randomize_all, save_fixture, save_meta  # noqa: E402  (scripts/ is on sys.path)

OFFICIAL_COMMIT = "f111ae2f771df32006e7afd7916835dd67d4cb9d"
TINY = dict(embed_dim=6, depths=(1, 1, 2, 1), num_heads=(2, 2, 2, 2), split_size=(1, 2, 2, 2), mlp_ratio=2.0)


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CSWIN_OFFICIAL_FILE")
    if not path or not Path(path).is_file():
        raise SystemExit("pass the official models/cswin.py (see the docstring) as the first argument")
    spec = importlib.util.spec_from_file_location("cswin_official", path)
    official = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = official  # timm's register_model looks the module up there
    spec.loader.exec_module(official)
    OUT.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = official.CSWinTransformer(img_size=64, patch_size=4, num_classes=10, embed_dim=TINY["embed_dim"],
                                      depth=list(TINY["depths"]), split_size=list(TINY["split_size"]),
                                      num_heads=list(TINY["num_heads"]), mlp_ratio=TINY["mlp_ratio"])
    randomize_all(model, seed=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    name = "cswin_official"
    y, state = save_fixture(name, model, x)
    overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    save_meta(name, {"model": "cswin_test", "overrides": overrides, "num_classes": 10, "img_size": None,
                     "reference": f"microsoft/CSWin-Transformer@{OFFICIAL_COMMIT} models/cswin.py CSWinTransformer",
                     "layout": "official"}, indent=2)
    sizes = [os.path.getsize(OUT / f"{name}{s}") for s in (".safetensors", ".io.safetensors")]
    print(f"{name}: input {tuple(x.shape)} output {tuple(y.shape)}, {len(state)} keys, files {sizes} bytes")


if __name__ == "__main__":
    main()
