"""Backbone hooks for hierarchical models that carry a class token through their last stage (PVT v1, CvT)."""
from __future__ import annotations

import torch
from torch import Tensor


class LastStageClassTokenMixin:
    """Backbone hooks for hierarchical models whose last stage returns ``(map, class token)`` (PVT v1, CvT).

    Earlier stages return plain NCHW maps. Intermediates are the maps (the class token left out); the final norm
    runs on the class token followed by the map's tokens, so ``forward_features`` gives ``(B, 1 + H*W, C)``.
    """

    def stage_to_nchw(self, x: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        return x[0] if isinstance(x, tuple) else x

    def forward_norm(self, x: tuple[Tensor, Tensor]) -> Tensor:
        fmap, cls_token = x
        x = torch.cat([cls_token, fmap.flatten(2).transpose(1, 2)], dim=1)  # (B, C, H, W) -> (B, 1 + HW, C)
        return self.norm(x)
