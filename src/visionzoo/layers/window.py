"""Non-overlapping window partition and its inverse, on channels-last maps."""
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
