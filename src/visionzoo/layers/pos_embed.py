"""Resizing learned absolute position tables to another grid."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def resample_abs_pos_embed(posemb: Tensor, new_size: tuple[int, int], old_size: tuple[int, int] | None = None,
                           num_prefix_tokens: int = 1, interpolation: str = "bicubic",
                           antialias: bool = True) -> Tensor:
    """Interpolate a ``(1, prefix + H*W, C)`` table to ``(1, prefix + H'*W', C)``; prefix rows are kept."""
    num_pos = posemb.shape[1] - num_prefix_tokens
    if old_size is None:
        side = int(math.sqrt(num_pos))
        if side * side != num_pos:
            raise ValueError(f"pos_embed: {num_pos} positions are not a square grid; pass old_size")
        old_size = (side, side)
    if tuple(new_size) == tuple(old_size):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dtype = grid.dtype
    grid = grid.reshape(1, old_size[0], old_size[1], -1).permute(0, 3, 1, 2).float()  # (1, N, C) -> (1, C, H, W)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], -1).to(dtype)  # -> (1, H'W', C)
    return torch.cat([prefix, grid], dim=1)
