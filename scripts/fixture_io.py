"""Writing one parity fixture (shared by the make_fixture_*.py scripts; see scripts/README.md)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def save_fixture(name: str, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run ``model`` in eval mode on ``x``; write its state_dict and the input/output pair. Returns (y, state)."""
    model.eval()
    with torch.no_grad():
        y = model(x)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(OUT / f"{name}.safetensors"))
    save_file({"input": x.contiguous(), "output": y.contiguous()}, str(OUT / f"{name}.io.safetensors"))
    return y, state


def save_meta(name: str, meta: dict, indent: int = 1) -> None:
    """Write the JSON that tells tests/test_parity.py how to build our matching model."""
    (OUT / f"{name}.json").write_text(json.dumps({**meta, "atol": meta.get("atol", 1e-5)}, indent=indent) + "\n")
