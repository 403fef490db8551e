"""Checkpoints: our format (safetensors + JSON metadata), timm-layout and official-layout state dicts.

Our format stores the state_dict as safetensors with ``{"format": "visionzoo", "variant": name,
"args": json}`` in the metadata, so a file alone rebuilds its model. Other layouts are detected by key
overlap and turned into ours by the family's ``remap`` static method. Torch pickles load only with
``weights_only=True``: a checkpoint never runs code.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from visionzoo.errors import ArgumentError, CheckpointError, NotFoundError
from visionzoo.pretrained import download

__all__ = ["CheckpointError", "adapt_input_conv", "atomic_write", "convert", "download", "load_checkpoint",
           "load_model", "read", "save", "to_model_layout", "unwrap"]

FORMAT = "visionzoo"
_CONTAINER_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema", "module", "net", "params")
_SHOWN_KEYS = 5  # keys listed per kind of mismatch


def _jsonable(args: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in args.items():
        if isinstance(v, tuple):
            v = list(v)
        json.dumps(v)  # raises TypeError for a non-plain argument, naming the value
        out[k] = v
    return out


def atomic_write(path: Path, write) -> None:  # noqa: ANN001
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path``.

    The file gets the mode a plain ``open(path, "w")`` would give (0o666 less the umask), not the 0o600 of a
    temporary file.
    """
    from visionzoo.pretrained import _umask_mode

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save(model: nn.Module, path: str | os.PathLike, extra: dict[str, str] | None = None) -> Path:
    """Write ``model`` in our format, atomically (a temp file, then a rename). ``.safetensors`` or ``.pt``."""
    from safetensors.torch import save_file

    path = Path(path)
    variant = getattr(model, "variant", None)
    if variant is None:
        raise ArgumentError("weights.save: the model has no .variant; build it with visionzoo.create_model")
    name, args = variant
    meta = {"format": FORMAT, "variant": name, "args": json.dumps(_jsonable(args)), **(extra or {})}
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    else:
        atomic_write(path, lambda tmp: torch.save({**meta, "args": json.loads(meta["args"]), "state_dict": state},
                                                   tmp))
    return path


def read(path: str | os.PathLike, state_key: str | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint file into ``(state_dict, metadata)`` without building a model.

    ``state_key`` picks an entry of a training checkpoint (e.g. ``"model_ema"``) when the file has it. An
    empty, truncated or foreign file, or a pickle that would run code, raises ``CheckpointError`` naming the
    file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): the download or save that wrote it "
                              f"was cut off; download or save it again")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        return obj["state_dict"], meta
    return unwrap(obj, state_key), {}


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001  (SafetensorError comes from Rust and has no importable base)
        if type(e).__name__ != "SafetensorError":
            raise
        with open(path, "rb") as f:
            head = f.read(8)
        size = path.stat().st_size
        text = str(e)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            what = "is a torch pickle, not a safetensors file: rename it to .pth (or .pt) to load it"
        elif size < 8 or "header too small" in text:
            what = f"is too short to be a safetensors file ({size} bytes): download or save it again"
        elif "not fully covered" in text or "invalid header length" in text:
            what = (f"is truncated ({size} bytes, fewer than its header declares): the download or save was cut "
                    f"off; download or save it again")
        else:
            what = f"is not a valid safetensors file ({text.split(': ', 1)[-1]}): download or save it again"
        raise CheckpointError(f"checkpoint {str(path)!r} {what}") from None
    if "args" in meta:
        meta["args"] = json.loads(meta["args"])
    return state, meta


def _plain_data_globals() -> list[Any]:
    """Plain-data types training scripts store next to the weights (the argparse arguments, a best accuracy as a
    numpy scalar). Unpickling them sets attributes or reads bytes and runs no code, so they are allowed."""
    import argparse

    import numpy as np

    types: list[Any] = [argparse.Namespace, np.dtype]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    types.append(scalar)
    types += [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Float16DType", "Int64DType",
                                                "Int32DType", "BoolDType") if hasattr(getattr(np, "dtypes", None), n)]
    return types


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, with one line of ours for each way a file can fail."""
    import pickle
    import re

    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_plain_data_globals()):
            warnings.simplefilter("ignore", UserWarning)  # torch warns about pickle protocols before refusing
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL (\S+)", str(e))
        with open(path, "rb") as f:
            is_pickle = f.read(1) == b"\x80"  # pickle protocol 2+ starts with PROTO
        if m:
            what = f"holds pickled Python objects ({m.group(1)}) that would run code when loaded"
        elif is_pickle:
            what = "is a plain Python pickle (pickle.dump, not torch.save), which could run code when loaded"
        else:
            raise CheckpointError(f"checkpoint {str(path)!r} is not a file torch can read (neither a torch zip nor "
                                  f"a pickle): check that it is the file you meant, or download or save it "
                                  f"again") from None
        raise CheckpointError(f"checkpoint {str(path)!r} {what}; visionzoo loads tensors only: re-save just the "
                              f"weights, e.g. torch.save(model.state_dict(), path) or visionzoo.save") from None
    except EOFError:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated (it ends before its data does): the download "
                              f"or save was cut off; download or save it again") from None
    except RuntimeError as e:
        if "zip archive" in str(e) or "PytorchStreamReader" in str(e):
            raise CheckpointError(f"checkpoint {str(path)!r} is truncated or damaged (not a complete torch zip "
                                  f"file): download or save it again") from None
        raise
    except (KeyError, ValueError, UnicodeDecodeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file torch can read (neither a torch zip nor a "
                              f"pickle; {type(e).__name__}): check that it is the file you meant, or download or "
                              f"save it again") from None


def unwrap(obj: Any, state_key: str | None = None) -> dict[str, Tensor]:
    """Find the state_dict inside the containers training scripts write, and strip DDP's ``module.``.

    ``state_key`` is tried first (e.g. ``"model_ema"`` for a checkpoint whose EMA weights are the reported ones).
    """
    if state_key and isinstance(obj, dict) and isinstance(obj.get(state_key), dict):
        obj = obj[state_key]
    while isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        key = next((k for k in _CONTAINER_KEYS if k in obj), None)
        if key is None:
            raise CheckpointError(f"no state_dict found in checkpoint; top-level keys: {sorted(map(str, obj))[:10]}")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _overlap(keys, expected: set[str]) -> float:  # noqa: ANN001
    keys = set(keys)
    return len(keys & expected) / max(len(keys | expected), 1)


def to_model_layout(model: nn.Module, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Detect the checkpoint's layout and return it in the model's own keys, with the layout's name."""
    expected = set(model.state_dict())
    remap = getattr(type(model), "remap", None)
    if remap is None or _overlap(state, expected) == 1.0:
        return state, "visionzoo/timm"
    mapped = remap(dict(state))
    if _overlap(mapped, expected) > _overlap(state, expected):
        return mapped, "official"
    return state, "visionzoo/timm"


@torch.no_grad()
def adapt_input_conv(weight: Tensor, in_chans: int) -> Tensor:
    """Fit a first-conv weight ``(O, I, kh, kw)`` to ``in_chans`` inputs: sum for 1, tile and rescale otherwise."""
    n_in = weight.shape[1]
    if in_chans == n_in:
        return weight
    dtype = weight.dtype
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_chans // n_in)
        w = w.repeat(1, reps, 1, 1)[:, :in_chans] * (n_in / in_chans)
    return w.to(dtype)


def _classifier_keys(model: nn.Module) -> list[str]:
    name = getattr(model, "classifier", None)
    names = [name] if isinstance(name, str) else list(name or ())
    return [f"{n}.{p}" for n in names for p in ("weight", "bias")]


def load_checkpoint(model: nn.Module, path: str | os.PathLike | dict[str, Tensor], strict: bool = True,
                    state_key: str | None = None) -> str:
    """Load a checkpoint file (or state_dict) into ``model``; returns the detected layout.

    A classifier of another size is re-initialised with a warning; a first conv with other input
    channels is adapted. Missing or unexpected keys and shape mismatches raise ``CheckpointError``
    listing them, and naming the model the file records when it is another (with ``strict=False`` they
    only warn).
    """
    if isinstance(path, dict):
        return _load_state(model, dict(path), {}, "checkpoint", strict)
    state, meta = read(path, state_key)
    return _load_state(model, state, meta, f"checkpoint {str(path)!r}", strict)


def _load_state(model: nn.Module, state: dict[str, Tensor], meta: dict[str, Any], where: str, strict: bool) -> str:
    """``load_checkpoint`` once the file is read: ``meta`` (what the file says it is) names a wrong model."""
    state, layout = to_model_layout(model, state)
    if hasattr(model, "adapt_state_dict"):
        state = model.adapt_state_dict(state)
    own = model.state_dict()
    first = getattr(model, "first_conv", None)
    if first and f"{first}.weight" in state and f"{first}.weight" in own:
        k = f"{first}.weight"
        if state[k].ndim == 4 and state[k].shape[1] != own[k].shape[1]:
            warnings.warn(f"{k}: checkpoint has {state[k].shape[1]} input channels, the model "
                          f"{own[k].shape[1]}; adapting the first conv", stacklevel=2)
            state[k] = adapt_input_conv(state[k], own[k].shape[1])
    for k in _classifier_keys(model):
        if k in state and (k not in own or state[k].shape[0] != own[k].shape[0]):
            got = state[k].shape[0]
            want = own[k].shape[0] if k in own else 0
            if k.endswith("weight"):
                warnings.warn(f"checkpoint classifier has {got} classes, the model {want}; "
                              f"the classifier stays freshly initialised", stacklevel=2)
            del state[k]
    classifier = set(_classifier_keys(model))
    missing = [k for k in own if k not in state and k not in classifier]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        name = getattr(model, "name", type(model).__name__)
        recorded = meta.get("variant")
        if recorded and recorded != name:
            who = (f"this checkpoint is {recorded}, not {name}: build it with visionzoo.load_model(path) or "
                   f"create_model({recorded!r}, checkpoint_path=path)")
        else:
            who = f"layout seen: {layout}"
        msg = (f"{where} does not fit {name} ({who}); missing ({len(missing)}): {_few(missing)}; "
               f"unexpected ({len(unexpected)}): {_few(unexpected)}; shape mismatch ({len(shapes)}): {_few(shapes)}")
        if strict or shapes:
            raise CheckpointError(msg)
        warnings.warn(msg, stacklevel=2)
    state = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(state, strict=False)
    return layout


def _few(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN_KEYS])
    return f"[{shown}{', ...' if len(items) > _SHOWN_KEYS else ''}]"


def load_model(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Rebuild a model from a file in our format alone (its variant name and args are in the file; a pruned model's
    widths too, see ``visionzoo.compress.structure``)."""
    from visionzoo.registry import create_model

    state, meta = read(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not in visionzoo format (no variant recorded); use "
                              f"create_model(NAME, checkpoint_path=...) or `visionzoo convert`")
    args = dict(meta["args"])
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    args.update(kwargs)
    model = create_model(meta["variant"], **args)
    if meta.get("structure"):  # a pruned model: reshape the fresh build to the saved widths first
        from visionzoo.compress.structure import apply_structure

        record = meta["structure"]
        apply_structure(model, json.loads(record) if isinstance(record, str) else record)
    load_checkpoint(model, state)
    return model


def convert(src: str | os.PathLike, dst: str | os.PathLike, model_name: str, **kwargs: Any) -> Path:
    """Read any supported layout for ``model_name`` and write it in our format (class count taken from the file)."""
    from visionzoo.registry import create_model

    state, meta = read(src)
    where = f"checkpoint {str(src)!r}"
    probe = create_model(model_name, **kwargs) if "num_classes" in kwargs else None
    if probe is None:
        with torch.device("meta"):
            probe = create_model(model_name, **kwargs)
        mapped, _ = to_model_layout(probe, dict(state))
        keys = _classifier_keys(probe)
        w = mapped.get(keys[0]) if keys else None
        kwargs["num_classes"] = int(w.shape[0]) if w is not None else 0
        probe = create_model(model_name, **kwargs)
    _load_state(probe, state, meta, where, strict=True)
    return save(probe, dst)
