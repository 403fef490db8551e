"""GFNet-style global filters: ``irfft2(rfft2(x) * W)`` with a learnable complex ``W`` per channel.

``SpectralGatingFilter`` works on channels-last maps ``(B, H, W, C)`` (or tokens with their grid) and keeps the
weight layout of GFNet / SpectFormer: ``complex_weight`` ``(h, w, C, 2)``, real and imaginary parts last, on the
rfft2 grid ``h x w = H x (W//2 + 1)`` of the size it is built for. Another input size resizes the filter bilinearly
(``align_corners=True``, as HorNet's global filter does) to the input's grid on the fly.

Eager runs ``torch.fft``; while tracing (FX, torch.export, compile, ONNX) the same transform runs as real DFT matrix
products at the traced size (``dft_filter``), which exporters and onnxruntime handle (no complex dtype).
TorchScript's tracer gets the DFT form too, on purpose: with ``torch.fft`` in a traced graph, oneDNN Graph fusion
(the ``torchscript`` deploy backend) corrupted the heap on SpectFormer-H (torch 2.13: the process aborted), while
on the DFT form it fails with a clean error. The two forms agree to float rounding. Half and bfloat16 inputs are
filtered in float32 and cast back (the official code casts to float32 and keeps it); float64 stays float64.

This is not softmax attention: it goes through no ``AttentionCore``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tracing import is_tracing, trace_leaf


@trace_leaf
def filter_on_grid(weight: Tensor, x: Tensor) -> Tensor:
    """The ``(h, w, C, 2)`` filter on the rfft2 grid of ``x`` ``(B, H, W, C)``: ``(H, W//2 + 1, C, 2)``, x's dtype."""
    H, W = x.shape[1:3]
    size = (H, W // 2 + 1)
    if tuple(weight.shape[:2]) != size:
        weight = weight.permute(3, 2, 0, 1)  # (h, w, C, 2) -> (2, C, h, w): real/imag as the batch
        weight = F.interpolate(weight, size=size, mode="bilinear", align_corners=True)
        weight = weight.permute(2, 3, 1, 0)  # (2, C, H, Wf) -> (H, Wf, C, 2)
    return weight.to(x.dtype)


@trace_leaf
def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 when it is half or bfloat16, else unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def fft_filter(x: Tensor, weight: Tensor) -> Tensor:
    """rfft2 over (H, W) of ``x`` ``(B, H, W, C)``, times ``weight`` ``(H, W//2+1, C, 2)``, irfft2 (``ortho``)."""
    H, W = x.shape[1:3]
    x = torch.fft.rfft2(x, dim=(1, 2), norm="ortho")  # (B, H, W, C) -> (B, H, W//2+1, C), complex
    x = x * torch.view_as_complex(weight.contiguous())
    return torch.fft.irfft2(x, s=(H, W), dim=(1, 2), norm="ortho")


@trace_leaf
def dft_bases(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Real DFT matrices for the grid of ``x`` ``(B, C, H, W)``, in its dtype and on its device.

    ``cos_h, sin_h`` ``(H, H)``: the DFT along H. ``cos_w, sin_w`` ``(W, W//2+1)``: the rfft along W. ``icos_w,
    isin_w`` ``(W//2+1, W)``: the irfft along W, each bin weighted by how often it occurs in the full spectrum (bin
    0 and, for even W, bin W/2 once, the others twice for their conjugate mirror), times both ortho scales 1/(H W).
    """
    H, W = x.shape[-2:]

    def cos_sin(n: int, rows: int, cols: int) -> tuple[Tensor, Tensor]:
        r = torch.arange(rows, device=x.device)
        c = torch.arange(cols, device=x.device)
        angle = (r[:, None] * c[None, :] % n).to(x.dtype) * (2 * math.pi / n)  # exact phase, reduced mod n
        return angle.cos(), angle.sin()

    cos_h, sin_h = cos_sin(H, H, H)
    cos_w, sin_w = cos_sin(W, W, W // 2 + 1)
    k = torch.arange(W // 2 + 1, device=x.device)
    count = (2 - (k == 0).to(torch.int64) - (2 * k == W).to(torch.int64)).to(x.dtype) / (H * W)
    return cos_h, sin_h, cos_w, sin_w, cos_w.T * count[:, None], sin_w.T * count[:, None]


def dft_filter(x: Tensor, weight: Tensor) -> Tensor:
    """``fft_filter`` as real matrix products at the size of ``x`` (what exporters and onnxruntime run)."""
    x = x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W): transforms act on the last two dims
    w_re, w_im = weight.permute(2, 0, 1, 3).unbind(-1)  # (H, Wf, C, 2) -> 2 x (C, H, Wf)
    cos_h, sin_h, cos_w, sin_w, icos_w, isin_w = dft_bases(x)
    re, im = x @ cos_w, -(x @ sin_w)  # rfft along W: (B, C, H, W) -> (B, C, H, Wf)
    re, im = cos_h @ re + sin_h @ im, cos_h @ im - sin_h @ re  # DFT along H: (H, H) @ (B, C, H, Wf)
    re, im = re * w_re - im * w_im, re * w_im + im * w_re  # times the complex filter
    re, im = cos_h @ re - sin_h @ im, cos_h @ im + sin_h @ re  # inverse DFT along H
    x = re @ icos_w - im @ isin_w  # irfft along W: (B, C, H, Wf) -> (B, C, H, W)
    return x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)


def global_filter(x: Tensor, weight: Tensor) -> Tensor:
    """``irfft2(rfft2(x) * weight)`` of ``x`` ``(B, H, W, C)`` with ``weight`` ``(h, w, C, 2)`` (resized to x's grid),
    run in at least float32, returned in x's dtype; FFT in eager, DFT matrices while tracing."""
    y = upcast(x)
    w = filter_on_grid(weight, y)
    y = (dft_filter if is_tracing() else fft_filter)(y, w)
    return y.type_as(x)


class SpectralGatingFilter(nn.Module):
    """GFNet's global filter on tokens ``(B, N, C)`` laid out on an ``(H, W)`` grid.

    Args:
        grid: ``(h, w)``, the token grid of the build resolution; the filter has ``h x (w//2 + 1)`` frequencies.
    """

    def __init__(self, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.complex_weight = nn.Parameter(torch.empty(grid[0], grid[1] // 2 + 1, dim, 2))
        if not self.complex_weight.is_meta:
            nn.init.normal_(self.complex_weight, std=0.02)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """``x``: tokens ``(B, N, C)`` on the grid ``size``, or a channels-last map ``(B, H, W, C)`` (no ``size``)."""
        if size is None:
            return global_filter(x, self.complex_weight)
        B, N, C = x.shape
        x = global_filter(x.reshape(B, size[0], size[1], C), self.complex_weight)  # (B, N, C) -> (B, H, W, C)
        return x.reshape(B, N, C)  # (B, H, W, C) -> (B, N, C)

    def extra_repr(self) -> str:
        return f"grid={self.grid}"
