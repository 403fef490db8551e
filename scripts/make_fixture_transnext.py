"""Parity fixtures for TransNeXt against the official code (pure-PyTorch aggregated attention).

Reference: ``classification/transnext.py`` and ``classification/attention_native.py`` of DaiShiResearch/TransNeXt
(Apache-2.0) at commit c8a99743b60ac94ac8d2bf66ffe164a440dcfe21 (2024-06-13), read from local files and never
copied into this repository. Get them from the mirror that ``fetch github:DaiShiResearch/TransNeXt`` gives::

    mkdir -p /tmp/transnext
    git --git-dir=<mirror> show c8a99743:classification/transnext.py > /tmp/transnext/transnext.py
    git --git-dir=<mirror> show c8a99743:classification/attention_native.py > /tmp/transnext/attention_native.py

then pass the folder as the first argument (or in ``TRANSNEXT_OFFICIAL_DIR``). ``transnext.py`` asks
``pkg_resources`` whether the swattention CUDA extension is installed; the reference venv has no
``pkg_resources``, so this script puts a stub in ``sys.modules`` that answers "not installed", which selects
``attention_native.py``. Nothing else is shimmed.

One tiny configuration (dims 8/16/24/32, depths 2/1/1/1, heads 1/2/2/4, mlp_ratios 8/8/4/4, sr_ratios 8/4/2/1,
window 3, 10 classes, pretrain size 64); writes to tests/fixtures/:

- ``transnext_official``: built for 64 px (``img_size=64``), run on a 64x64 input;
- ``transnext_official_96``: built with ``img_size=96, pretrain_size=64`` (the official way to run another size,
  as its 384 px fine-tuned models do), run on a 96x96 input; our model, built once for pretrain size 64, must
  recompute its tables for 96 px and match.

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_transnext.py /tmp/transnext``.
"""
from __future__ import annotations

import os
import sys
import types
from functools import partial
from pathlib import Path

import torch

from fixture_io import OUT, randomize_all, write  # noqa: E402  (scripts/ is on sys.path)

OFFICIAL_COMMIT = "c8a99743b60ac94ac8d2bf66ffe164a440dcfe21"
TINY = dict(dims=(8, 16, 24, 32), depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4), mlp_ratios=(8, 8, 4, 4),
            sr_ratios=(8, 4, 2, 1))


def stub_pkg_resources() -> None:
    """A ``pkg_resources`` that reports every distribution as missing (so swattention is never imported)."""
    mod = types.ModuleType("pkg_resources")

    class DistributionNotFound(Exception):
        pass

    def get_distribution(name: str):  # noqa: ANN202
        raise DistributionNotFound(name)

    mod.DistributionNotFound = DistributionNotFound
    mod.get_distribution = get_distribution
    sys.modules["pkg_resources"] = mod


def build(official, img_size: int) -> torch.nn.Module:  # noqa: ANN001
    return official.TransNeXt(img_size=img_size, pretrain_size=64, window_size=[3, 3, 3, None], patch_size=4,
                              embed_dims=list(TINY["dims"]), num_heads=list(TINY["num_heads"]),
                              mlp_ratios=list(TINY["mlp_ratios"]), qkv_bias=True,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), depths=list(TINY["depths"]),
                              sr_ratios=list(TINY["sr_ratios"]), num_classes=10)


def meta(note: str) -> dict:
    overrides = {k: list(v) for k, v in TINY.items()}
    return {"model": "transnext_test", "overrides": {**overrides, "pretrain_size": 64}, "num_classes": 10,
            "img_size": None, "reference": f"DaiShiResearch/TransNeXt@{OFFICIAL_COMMIT} classification/transnext.py "
                                          f"TransNeXt (attention_native.py) {note}", "layout": "official"}


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TRANSNEXT_OFFICIAL_DIR")
    if not folder or not (Path(folder) / "transnext.py").is_file():
        raise SystemExit("pass the folder holding the official transnext.py and attention_native.py (see docstring)")
    stub_pkg_resources()
    sys.path.insert(0, str(folder))
    import transnext as official  # noqa: PLC0415

    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build(official, 64)
    randomize_all(model, seed=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    write("transnext_official", model, x, meta("img_size=64"))

    torch.manual_seed(0)
    model = build(official, 96)
    randomize_all(model, seed=3)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(4))
    write("transnext_official_96", model, x, meta("img_size=96, pretrain_size=64"))


if __name__ == "__main__":
    main()
