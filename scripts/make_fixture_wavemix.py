"""Parity fixtures for WaveMix against the official pranavphoenix/WaveMix code, and a check of our Haar DWT.

Official code: pranavphoenix/WaveMix@ba3d1b425c3e8a932b8fc6af432685e4dc7af857, ``wavemix/__init__.py`` (DWT and
Level1..4Waveblock) and ``wavemix/classification.py`` (``WaveMix``), official key layout (``conv``, ``layers``,
``pool.2``). Three tiny configurations (depth 2, final_dim 16, ff_channel 16, 10 classes, 64 px input):

- ``wavemix_official_l3``: 3-level blocks, patchify stem (the layout of the ImageNet WaveMix-192/16 models);
- ``wavemix_official_l1``: 1-level blocks (their MLP is named ``feedforward``, not ``feedforward1``);
- ``wavemix_official_l4_strided``: 4-level blocks after the strided stem.

Every parameter and every BatchNorm running statistic is randomised. Before writing, the script checks
``visionzoo.layers.wavelet.HaarDWT`` against ``pytorch_wavelets.DWTForward(J, wave="db1", mode="zero")`` for
J = 1..4 on even and odd sizes (the official code carries a copy of that class; the package is checked too).

The official files are not copied into this repository: pass the official git directory with ``--official PATH``
or ``WAVEMIX_OFFICIAL``; the two files are read at the pinned commit into a temporary package. They import
numpy's removed ``numpy.lib.function_base`` (for an unused name), which is shimmed here. Needs
``pip install einops PyWavelets pytorch_wavelets "setuptools<81"`` in the reference venv.

Run with the reference venv, never in CI:
``PYTHONPATH=src /work/refenv/bin/python scripts/make_fixture_wavemix.py --official /path/to/WaveMix/.git``.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

from fixture_io import OUT, official_path, randomize_fan_in, save_fixture, save_meta  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "ba3d1b425c3e8a932b8fc6af432685e4dc7af857"
NUM_CLASSES = 10
FILES = ("wavemix/__init__.py", "wavemix/classification.py")
CONFIGS = {  # fixture name: (official kwargs, our overrides)
    "wavemix_official_l3": (dict(level=3, initial_conv="pachify", patch_size=4),
                            dict(level=3, stem="pachify", patch_size=4)),
    "wavemix_official_l1": (dict(level=1, initial_conv="pachify", patch_size=4),
                            dict(level=1, stem="pachify", patch_size=4)),
    "wavemix_official_l4_strided": (dict(level=4, initial_conv="strided", stride=2),
                                    dict(level=4, stem="strided", stride=2)),
}
TINY = dict(depth=2, mult=2, ff_channel=16, final_dim=16, dropout=0.5)


def load_official(git_dir: str) -> types.ModuleType:
    """Write the official package at COMMIT into a temp dir and import ``wavemix.classification`` from it."""
    root = Path(tempfile.mkdtemp())
    (root / "wavemix").mkdir()
    for f in FILES:
        text = subprocess.run(["git", "--git-dir", git_dir, "show", f"{COMMIT}:{f}"], check=True,
                              capture_output=True, text=True).stdout
        (root / f).write_text(text)
    sys.modules.setdefault("numpy.lib.function_base", types.SimpleNamespace(hamming=np.hamming))
    sys.path.insert(0, str(root))
    return importlib.import_module("wavemix.classification")


def check_dwt() -> None:
    """Our HaarDWT equals pytorch_wavelets' DWTForward (db1, zero mode) for 1..4 levels, even and odd sides."""
    from pytorch_wavelets import DWTForward

    from visionzoo.layers.wavelet import HaarDWT

    g = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 32, 32), (1, 4, 17, 22)):
        x = torch.randn(shape, generator=g)
        for levels in (1, 2, 3, 4):
            ref_ll, ref_highs = DWTForward(J=levels, wave="db1", mode="zero")(x)
            ll, highs = HaarDWT(levels)(x)
            torch.testing.assert_close(ll, ref_ll, atol=1e-5, rtol=0)
            for a, b in zip(highs, ref_highs, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    print("HaarDWT matches pytorch_wavelets.DWTForward (J=1..4)")


def main() -> None:
    official_dir = official_path(__doc__.splitlines()[0], "WAVEMIX_OFFICIAL",
                                 "git dir of pranavphoenix/WaveMix")
    check_dwt()
    official = load_official(official_dir)
    OUT.mkdir(parents=True, exist_ok=True)
    for i, (name, (kwargs, overrides)) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = official.WaveMix(num_classes=NUM_CLASSES, **TINY, **kwargs)
        randomize_fan_in(model, 10 + i)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(20 + i))
        y, state = save_fixture(name, model, x)
        ours = dict(dim=TINY["final_dim"], depth=TINY["depth"], mult=TINY["mult"], ff_channel=TINY["ff_channel"],
                    mlp_drop=TINY["dropout"], **overrides)
        save_meta(name, {"model": "wavemix_test", "overrides": ours, "num_classes": NUM_CLASSES, "img_size": None,
                         "reference": f"pranavphoenix/WaveMix@{COMMIT} wavemix/classification.py WaveMix",
                         "layout": "official"})
        print(name, tuple(x.shape), "->", tuple(y.shape), f"{sum(v.numel() for v in state.values())} values")


if __name__ == "__main__":
    main()
