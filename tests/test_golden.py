"""Seeded outputs of every ``*_test`` variant against stored values (catches silent numeric changes).

Regenerate after a deliberate change with ``VISIONZOO_ACCEPT_GOLDEN=1 pytest tests/test_golden.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import visionzoo
from conftest import TEST_MODELS, make_input

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name", TEST_MODELS)
def test_golden_output(name):
    torch.manual_seed(0)
    model = visionzoo.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        out = model(make_input(model))
    path = GOLDEN / f"{name}.safetensors"
    if os.environ.get("VISIONZOO_ACCEPT_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        save_file({"output": out.contiguous()}, str(path))
    assert path.exists(), f"no golden file for {name}; run VISIONZOO_ACCEPT_GOLDEN=1 pytest tests/test_golden.py"
    ref = load_file(str(path))["output"]
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-5)
