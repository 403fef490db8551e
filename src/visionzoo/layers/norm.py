"""Normalisation layers and lookup by name."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .act import LayerType


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dimension, eps 1e-6 by default (the value most vision backbones use)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, stored as buffers (no gradients)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Return ``module`` with every BatchNorm2d inside it replaced by a frozen copy."""
        if isinstance(module, nn.BatchNorm2d):
            frozen = cls(module.num_features, module.eps)
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new = cls.convert(child)
            if new is not child:
                setattr(module, name, new)
        return module


_NORMS: dict[str, type[nn.Module]] = {
    "ln": LayerNorm,
    "layernorm": LayerNorm,
    "ln2d": LayerNorm2d,
    "layernorm2d": LayerNorm2d,
    "bn": nn.BatchNorm2d,
    "bn2d": nn.BatchNorm2d,
    "batchnorm": nn.BatchNorm2d,
    "bn1d": nn.BatchNorm1d,
    "frozen_bn": FrozenBatchNorm2d,
    "identity": nn.Identity,
}


def get_norm(norm: LayerType | None) -> type[nn.Module]:
    """Resolve a normalisation layer given by name (``"ln2d"``) or class; ``None`` means identity."""
    if norm is None:
        return nn.Identity
    if isinstance(norm, str):
        key = norm.lower()
        if key not in _NORMS:
            raise ValueError(f"unknown norm layer {norm!r}; choose one of {sorted(_NORMS)}")
        return _NORMS[key]
    if isinstance(norm, type) and issubclass(norm, nn.Module):
        return norm
    raise TypeError(f"norm_layer must be a name or an nn.Module class, got {norm!r}")
