"""A pruned model's structure as data, so ``visionzoo.load_model`` rebuilds it from the checkpoint alone.

``structure_record(model)`` compares ``model`` with a fresh build of its variant (on the meta device) and keeps
what differs: the shape of every parameter and buffer, and every plain attribute (ints, floats, tuples of them:
``in_features``, ``out_channels``, ``num_features``, ``normalized_shape``, ``num_heads``, ...) of every module.
``apply_structure(model, record)`` reshapes a fresh build to match: it replaces those tensors by empty ones of the
recorded shape and sets the attributes; ``load_state_dict`` then fills the values. No family code is involved.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from visionzoo.errors import ArgumentError

_PLAIN = (int, float, bool)


def _plain(v: Any) -> bool:
    return isinstance(v, _PLAIN) or isinstance(v, tuple) and all(isinstance(i, _PLAIN) for i in v)


def _template(model: nn.Module) -> nn.Module:
    from visionzoo.registry import create_model

    name, args = model.variant
    with torch.device("meta"):
        return create_model(name, **args)


def structure_record(model: nn.Module) -> dict[str, Any]:
    """``{"shapes": {tensor name: shape}, "attrs": {module name: {attr: value}}}``: how ``model`` differs from a fresh
    build of its variant (empty for an unpruned model)."""
    if getattr(model, "variant", None) is None:
        raise ArgumentError("structure_record: the model has no .variant; build it with visionzoo.create_model")
    ref = _template(model)
    ref_state = {k: v.shape for k, v in ref.state_dict().items()}
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if ref_state.get(k) != v.shape}
    ref_mods = dict(ref.named_modules())
    attrs: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        r = ref_mods.get(name)
        if r is None:
            continue
        diff = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(m).items()
                if not k.startswith("_") and k != "training" and _plain(v) and vars(r).get(k) != v}
        if diff:
            attrs[name] = diff
    return {"shapes": shapes, "attrs": attrs} if shapes or attrs else {}


def apply_structure(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Reshape a fresh build of the variant to ``record`` (see ``structure_record``), in place; returns it."""
    for key, shape in record.get("shapes", {}).items():
        mod_name, _, leaf = key.rpartition(".")
        m = model.get_submodule(mod_name) if mod_name else model
        old = getattr(m, leaf)
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(m, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
        elif leaf in m._buffers:
            m._buffers[leaf] = new
        else:
            raise ArgumentError(f"structure record names {key!r}, which is neither a parameter nor a buffer here")
    for mod_name, values in record.get("attrs", {}).items():
        m = model.get_submodule(mod_name) if mod_name else model
        for k, v in values.items():
            setattr(m, k, tuple(v) if isinstance(v, list) else v)
    return model
