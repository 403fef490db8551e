"""The head protocol: every family classifies through one ``ClassifierHead`` at ``model.head``.

pool -> norm -> pre_logits -> dropout -> fc. ``pre_logits`` is whatever hidden layer a family's head has
(a Linear + tanh in MaxViT, a Linear + GELU + LayerNorm in InceptionNeXt, a conv + BatchNorm + act in
VanillaNet) or nothing; ``reset`` replaces only ``fc``, on the device and in the dtype of the model, with the
library's init.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .act import LayerType
from .init import init_linear
from .norm import get_norm
from .tracing import trace_leaf

POOL_TYPES = ("avg", "max", "token", "")


@trace_leaf  # it branches on x.ndim: one opaque node under FX
def _pool(x: Tensor, pool_type: str, prefix_tokens: int) -> Tensor:
    if x.ndim == 4:
        if pool_type == "token":
            raise ValueError("head: pool_type 'token' needs (B, N, C) tokens, got an NCHW map")
        return x.mean((2, 3)) if pool_type == "avg" else x.amax((2, 3))  # (B, C, H, W) -> (B, C)
    if pool_type == "token":
        return x[:, 0]  # class token, (B, N, C) -> (B, C)
    tokens = x[:, prefix_tokens:]
    return tokens.mean(1) if pool_type == "avg" else tokens.amax(1)  # (B, N, C) -> (B, C)


class ClassifierHead(nn.Module):
    """Pool, optionally normalise, optional hidden layer, dropout, classify.

    Args:
        pool_type: ``"avg"`` (mean over H, W of an NCHW map, or over the patch tokens of ``(B, N, C)``),
            ``"max"`` (NCHW), ``"token"`` (token 0 of ``(B, N, C)``) or ``""`` (input is already ``(B, C)``).
        norm_layer: a norm over channels after pooling (ConvNeXt's head, ViT's ``fc_norm``), or ``None``.
        pre_logits: a module between the norm and the dropout (a head's hidden layer), or ``None``.
        hidden_size: the width ``pre_logits`` outputs (the width ``fc`` reads); ``in_features`` when ``None``.
        prefix_tokens: tokens ahead of the patch tokens that ``"avg"`` leaves out of the mean.
    """

    fc_names: tuple[str, ...] = ("fc",)

    def __init__(self, in_features: int, num_classes: int = 1000, pool_type: str = "avg", drop_rate: float = 0.0,
                 norm_layer: LayerType | None = None, pre_logits: nn.Module | None = None,
                 hidden_size: int | None = None, prefix_tokens: int = 0) -> None:
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise ValueError(f"head: pool_type must be one of {POOL_TYPES}, got {pool_type!r}")
        self.in_features = in_features
        self.hidden_size = hidden_size or in_features
        self.pool_type = pool_type
        self.prefix_tokens = prefix_tokens
        self.norm = get_norm(norm_layer)(in_features) if norm_layer is not None else nn.Identity()
        self.pre_logits = pre_logits if pre_logits is not None else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        # NOTE: torch's default Linear init here; the family's own init pass follows at the end of its __init__
        self.fc = nn.Linear(self.hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def _new_fc(self, num_classes: int, device: torch.device | None = None, dtype: torch.dtype | None = None
                ) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        fc = nn.Linear(self.hidden_size, num_classes, device=device, dtype=dtype)
        init_linear(fc)
        return fc

    def reset(self, num_classes: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        """A fresh classifier of ``num_classes`` outputs (0 = none) on ``device`` in ``dtype``."""
        for name in self.fc_names:
            setattr(self, name, self._new_fc(num_classes, device, dtype).train(self.training))

    def pool(self, x: Tensor) -> Tensor:
        if self.pool_type == "":
            return x
        return _pool(x, self.pool_type, self.prefix_tokens)

    def forward_pre_logits(self, x: Tensor) -> Tensor:
        return self.drop(self.pre_logits(self.norm(self.pool(x))))

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.forward_pre_logits(x)
        return x if pre_logits else self.fc(x)
