"""Weight-init helpers shared by families; every one skips meta tensors (shape-only builds)."""
from __future__ import annotations

from torch import nn


def is_meta(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return w is not None and w.is_meta


def init_linear(m: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal weights and zero bias for Linear layers only (the ViT-style init)."""
    if isinstance(m, nn.Linear) and not is_meta(m):
        nn.init.trunc_normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def init_trunc_normal(m: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal weights and zero bias for Linear and Conv layers; LayerNorm to (1, 0)."""
    if is_meta(m):
        return
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
