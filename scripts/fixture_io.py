"""Shared by the make_fixture_*.py scripts (reference venv only; see scripts/README.md): importing an official
model file, giving a reference model non-trivial weights, writing one parity fixture."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import types
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


def randomize_all(model: torch.nn.Module, seed: int) -> None:
    """Every parameter around 0 (norm scales around 1), and BatchNorm running statistics away from (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = name.endswith("weight") and p.ndim == 1
            p.copy_((1.0 if is_norm_scale else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


@torch.no_grad()
def randomize_fan_in(model: torch.nn.Module, seed: int, kernels: tuple[str, ...] = ()) -> None:
    """Conv/Linear weights (and those of modules whose class is named in ``kernels``) ~ N(0, 1/fan_in), biases with
    std 0.1, BatchNorm affine and running statistics spread around (1, 0)."""
    g = torch.Generator().manual_seed(seed)

    def rand(t: torch.Tensor, low: float, spread: float, normal: bool = True) -> None:
        noise = torch.randn(t.shape, generator=g) if normal else torch.rand(t.shape, generator=g)
        t.copy_(low + spread * noise)

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            rand(m.weight, 1.0, 0.3)
            rand(m.bias, 0.0, 0.2)
            rand(m.running_mean, 0.0, 0.2)
            rand(m.running_var, 0.5, 1.0, normal=False)
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)) or type(m).__name__ in kernels:
            rand(m.weight, 0.0, m.weight[0].numel() ** -0.5)
            if m.bias is not None:
                rand(m.bias, 0.0, 0.1)


def load_module(path: str, name: str) -> types.ModuleType:
    """Import an official model file from ``path`` as module ``name``; its timm ``register_model`` calls are no-ops
    (official factories may share timm's names)."""
    import timm.models.registry

    timm.models.registry.register_model = lambda fn: fn
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def official_path(description: str, env: str, what: str) -> str:
    """The ``--official PATH`` argument (or the environment variable ``env``): a git dir or the model file."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--official", default=os.environ.get(env), help=what)
    path = parser.parse_args().official
    if not path:
        parser.error(f"pass --official PATH (or set {env})")
    OUT.mkdir(parents=True, exist_ok=True)
    return path


def import_official(path: str, commit: str, repo_file: str, module_name: str) -> types.ModuleType:
    """Import ``repo_file`` from a git directory (read at ``commit``) or import the file at ``path`` itself."""
    src = Path(path)
    if src.is_dir():
        text = subprocess.run(["git", "--git-dir", str(src), "show", f"{commit}:{repo_file}"],
                              check=True, capture_output=True, text=True).stdout
        src = Path(tempfile.mkdtemp()) / f"{module_name}.py"
        src.write_text(text)
    return load_module(str(src), module_name)


@torch.no_grad()
def reparameterise(model: torch.nn.Module, x: torch.Tensor, method: str) -> None:
    """Call the official re-parameterisation ``model.<method>()`` in eval mode and print how much the output moved."""
    before = model.eval()(x)
    getattr(model, method)()
    print(f"official {method}() changes the output by {(model(x) - before).abs().max().item():.2e}")


def write(name: str, model: torch.nn.Module, x: torch.Tensor, meta: dict) -> None:
    """Save the fixture ``name`` (reference weights, input/output, ``meta`` for tests/test_parity.py; layout
    "official" unless ``meta`` says otherwise) and print a one-line summary."""
    y, state = save_fixture(name, model, x)
    save_meta(name, {"layout": "official", **meta})
    sizes = [os.path.getsize(OUT / f"{name}{s}") for s in (".safetensors", ".io.safetensors")]
    print(f"{name}: input {tuple(x.shape)} -> output {tuple(y.shape)}, {len(state)} keys, files {sizes} bytes, "
          f"output std {y.std():.3f}")
