"""The 2D Haar discrete wavelet transform (one level), in plain torch.

It computes what ``pytorch_wavelets.DWTForward(J=1, wave="db1", mode="zero")`` computes, without that
dependency. For every 2x2 block ``[[a, b], [c, d]]`` of every channel it gives four coefficients::

    LL = (a + b + c + d) / 2      low-pass along rows and columns
    LH = (a + b - c - d) / 2      low-pass along a row, high-pass down a column
    HL = (a - b + c - d) / 2      high-pass along a row, low-pass down a column
    HH = (a - b - c + d) / 2      high-pass along both

which is an orthonormal change of basis of the block (lossless). A side of odd length gets one zero row or
column at its end first, as pytorch_wavelets' ``mode="zero"`` does. Several levels are the one-level transform
applied again to ``LL``.

Cost: the transform runs as one depthwise 2x2 convolution with stride 2 and four fixed filters per channel, so
a MAC counter sees it as a conv: 4 MACs per output coefficient, that is ``4 * C * H * W`` MACs per level for a
``(C, H, W)`` input (even sides). The filters are built in ``forward`` (no buffers, nothing in a state_dict).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .tracing import trace_leaf

__all__ = ["HaarDWT", "haar_dwt2d"]

# Rows: LL, LH, HL, HH; columns: the block's pixels a (top left), b (top right), c (bottom left), d (bottom right).
_HAAR_SIGNS = ((1, 1, 1, 1), (1, 1, -1, -1), (1, -1, 1, -1), (1, -1, -1, 1))


def haar_dwt2d(x: Tensor) -> tuple[Tensor, Tensor]:
    """One level of the 2D Haar DWT of ``x`` (B, C, H, W).

    Returns ``(ll, highs)``: ``ll`` (B, C, ceil(H/2), ceil(W/2)) and ``highs`` (B, C, 3, ceil(H/2), ceil(W/2))
    holding LH, HL, HH in that order (pytorch_wavelets' layout of ``yh[0]``).
    """
    x = _pad_to_even(x)
    C = x.shape[1]
    filters = x.new_tensor(_HAAR_SIGNS).mul_(0.5).reshape(4, 1, 2, 2)  # in x's dtype, on its device
    y = F.conv2d(x, filters.repeat(C, 1, 1, 1), stride=2, groups=C)  # (B, 4C, H/2, W/2), channel = 4c + band
    y = y.unflatten(1, (-1, 4))  # (B, 4C, h, w) -> (B, C, 4, h, w)
    return y[:, :, 0], y[:, :, 1:]


@trace_leaf  # it branches on the input size: one opaque node under FX
def _pad_to_even(x: Tensor) -> Tensor:
    H, W = x.shape[-2:]
    if H % 2 or W % 2:
        x = F.pad(x, (0, W % 2, 0, H % 2))  # zero row / column at the end of an odd side
    return x


class HaarDWT(nn.Module):
    """A ``levels``-level 2D Haar DWT: returns ``(ll, [highs_1, ..., highs_levels])``, finest level first.

    The same outputs as ``pytorch_wavelets.DWTForward(J=levels, wave="db1", mode="zero")``; no parameters.
    """

    def __init__(self, levels: int = 1) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"HaarDWT: levels must be >= 1, got {levels}")
        self.levels = levels

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        highs = []
        for _ in range(self.levels):
            x, h = haar_dwt2d(x)
            highs.append(h)
        return x, highs
