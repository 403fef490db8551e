"""Parity with the reference implementations: every fixture in tests/fixtures/ (made by scripts/make_fixture_*.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import visionzoo
from visionzoo.registry import list_families

FIXTURES = Path(__file__).parent / "fixtures"
SPECS = sorted(FIXTURES.glob("*.json"))


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_matches_reference(spec):
    meta = json.loads(spec.read_text())
    weights = spec.with_suffix(".safetensors")
    io = load_file(str(spec.with_name(spec.stem + ".io.safetensors")))
    model = visionzoo.create_model(meta["model"], num_classes=meta["num_classes"], img_size=meta.get("img_size"),
                                   checkpoint_path=str(weights), **_tuples(meta.get("overrides", {}))).eval()
    with torch.no_grad():
        out = model(io["input"])
    torch.testing.assert_close(out, io["output"], atol=meta.get("atol", 1e-5), rtol=0)


def test_every_family_has_a_fixture():
    """Every family with reference code has a fixture; one declared code-less (``code=None``) has none to match."""
    covered = {visionzoo.get_variant(json.loads(p.read_text())["model"]).family for p in SPECS}
    missing = [f.name for f in list_families() if f.code is not None and f.name not in covered]
    assert not missing, f"families without a parity fixture: {missing}"
    stale = sorted({f.name for f in list_families() if f.code is None} & covered)
    assert not stale, f"families declared without official code have a fixture (set code=): {stale}"
