"""Classifier heads: global pool, optional norm, dropout, linear."""
from __future__ import annotations

from torch import Tensor, nn

from .act import LayerType
from .norm import get_norm


class ClassifierHead(nn.Module):
    """Pool an NCHW map (or take pooled features), optionally normalise, drop out, classify.

    Args:
        pool_type: ``"avg"``, ``"max"`` or ``""`` (input is already pooled, ``(B, C)``).
        norm_layer: a norm over channels applied after pooling (ConvNeXt's head), or ``None``.
    """

    def __init__(self, in_features: int, num_classes: int = 1000, pool_type: str = "avg", drop_rate: float = 0.0,
                 norm_layer: LayerType | None = None) -> None:
        super().__init__()
        if pool_type not in ("avg", "max", ""):
            raise ValueError(f"head: pool_type must be 'avg', 'max' or '', got {pool_type!r}")
        self.in_features = in_features
        self.pool_type = pool_type
        self.norm = get_norm(norm_layer)(in_features) if norm_layer is not None else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.pool_type == "avg":
            x = x.mean((2, 3))  # (B, C, H, W) -> (B, C)
        elif self.pool_type == "max":
            x = x.amax((2, 3))
        x = self.drop(self.norm(x))
        return x if pre_logits else self.fc(x)
