"""Non-overlapping window partition and its inverse, on channels-last maps; MaxViT/MAXIM's block and grid groups.

``block_partition`` groups each window's tokens; ``grid_partition`` groups a ``gh x gw`` grid of tokens strided over
the whole map (one token per window of size ``H/gh x W/gw``). MaxViT attends within each group, MAXIM mixes
each group with a gated MLP."""
from __future__ import annotations

from torch import Tensor


def window_partition(x: Tensor, window_size: tuple[int, int]) -> Tensor:
    """``(B, H, W, C)`` -> ``(B * nW, wh, ww, C)``; H and W must be multiples of the window."""
    B, H, W, C = x.shape
    wh, ww = window_size
    x = x.view(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, C)  # (B, nH, wh, nW, ww, C) -> (B*nH*nW, wh, ww, C)


def window_reverse(windows: Tensor, window_size: tuple[int, int], H: int, W: int) -> Tensor:
    """``(B * nW, wh, ww, C)`` -> ``(B, H, W, C)``."""
    wh, ww = window_size
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)  # (B, nH, nW, wh, ww, C) -> (B, H, W, C)


def grid_partition(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, H, W, C)`` -> ``(B * H/gh * W/gw, gh * gw, C)``: each group is a gh x gw grid strided over the map."""
    B, H, W, C = x.shape
    gh, gw = grid
    x = x.reshape(B, gh, H // gh, gw, W // gw, C).permute(0, 2, 4, 1, 3, 5)  # -> (B, H/gh, W/gw, gh, gw, C)
    return x.reshape(-1, gh * gw, C)


def grid_reverse(x: Tensor, grid: tuple[int, int], H: int, W: int) -> Tensor:
    """``(B * H/gh * W/gw, gh * gw, C)`` -> ``(B, H, W, C)``."""
    gh, gw = grid
    C = x.shape[-1]
    x = x.reshape(-1, H // gh, W // gw, gh, gw, C).permute(0, 3, 1, 4, 2, 5)  # -> (B, gh, H/gh, gw, W/gw, C)
    return x.reshape(-1, H, W, C)


def block_partition(x: Tensor, window: tuple[int, int]) -> Tensor:
    """``(B, H, W, C)`` -> ``(B * nW, wh * ww, C)``, non-overlapping windows."""
    return window_partition(x, window).flatten(1, 2)  # (B * nW, wh, ww, C) -> (B * nW, N, C)


def block_reverse(x: Tensor, window: tuple[int, int], H: int, W: int) -> Tensor:
    return window_reverse(x.unflatten(1, window), window, H, W)  # (B * nW, N, C) -> (B, H, W, C)


PARTITIONS = {"block": (block_partition, block_reverse), "grid": (grid_partition, grid_reverse)}
