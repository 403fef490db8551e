"""Activation lookup by name: a string or a class in, a class out."""
from __future__ import annotations

from torch import nn

LayerType = str | type[nn.Module]

_ACTS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "hardswish": nn.Hardswish,
    "hard_swish": nn.Hardswish,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "mish": nn.Mish,
    "leaky_relu": nn.LeakyReLU,
    "identity": nn.Identity,
}


class GELUTanh(nn.GELU):
    """GELU with the tanh approximation."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")


_ACTS["gelu_tanh"] = GELUTanh


def get_act(act: LayerType | None) -> type[nn.Module]:
    """Resolve an activation given by name (``"gelu"``) or class; ``None`` means identity."""
    if act is None:
        return nn.Identity
    if isinstance(act, str):
        key = act.lower()
        if key not in _ACTS:
            raise ValueError(f"unknown activation {act!r}; choose one of {sorted(_ACTS)}")
        return _ACTS[key]
    if isinstance(act, type) and issubclass(act, nn.Module):
        return act
    raise TypeError(f"act_layer must be a name or an nn.Module class, got {act!r}")
