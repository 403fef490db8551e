"""The convolutional parts DHVT puts into a ViT, shared by the DHVT family and ``visionzoo train --dhvt``.

"Bridging the Gap Between Vision Transformers and Convolutional Neural Networks on Small Datasets" (Lu et al.,
NeurIPS 2022, https://arxiv.org/abs/2210.05958; official code ArieSeirack/DHVT ``vision_transformer.py``):

- ``SOPE``: sequential overlapping patch embedding, log2(patch) 3x3 stride-2 conv + BN layers between two per-channel
  affines;
- ``DAFF``: the feed-forward run as convolutions on the patch map, with a squeeze-excitation that rescales the
  prefix (class) tokens;
- ``head_tokens``: the per-head summary tokens of head-interacting attention (HI-MHSA).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .tracing import trace_leaf

__all__ = ["DAFF", "SOPE", "Affine", "head_tokens", "square_grid"]


@trace_leaf
def square_grid(x: Tensor, prefix: int = 1) -> tuple[int, int]:
    """The ``(H, W)`` of the patch tokens of ``x`` ``(B, prefix + H*W, C)`` when nobody passed it: a square map."""
    n = x.shape[1] - prefix
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} patch tokens do not form a square map; pass the map's (H, W)")
    return side, side


class Affine(nn.Module):
    """A learned per-channel scale and shift on an NCHW map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.alpha + self.beta


def _conv_bn(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(out_dim))


class SOPE(nn.Module):
    """Affine, log2(patch) 3x3/2 conv + BN layers (GELU between), affine: ``(B, C, H, W)`` -> ``(B, D, H/p, W/p)``.

    The widths double up to ``embed_dim``: ``D/8, D/4, D/2, D`` at patch 16, ``D/2, D`` at patch 4, ``D`` at patch 2
    (the official three); other powers of two follow the same rule (``D/4, D/2, D`` at patch 8). At patch 2 the
    official code ends with a GELU, at the others it does not; we keep both.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        steps = int(math.log2(patch_size)) if patch_size >= 2 else 0
        if steps < 1 or 2 ** steps != patch_size or embed_dim % 2 ** (steps - 1):
            raise ValueError(f"SOPE: patch_size must be a power of two >= 2 (one stride-2 conv per factor 2) and "
                             f"embed_dim a multiple of patch_size/2, got patch {patch_size}, embed_dim {embed_dim}")
        dims = (in_chans, *(embed_dim // 2 ** (steps - 1 - i) for i in range(steps)))
        layers: list[nn.Module] = []
        for i in range(steps):
            layers += [_conv_bn(dims[i], dims[i + 1]), nn.GELU()]
        self.proj = nn.Sequential(*(layers if patch_size == 2 else layers[:-1]))  # NOTE: patch 2 ends with GELU
        self.pre_affine = Affine(in_chans)
        self.post_affine = Affine(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.post_affine(self.proj(self.pre_affine(x)))


class DAFF(nn.Module):
    """Conv feed-forward on the patch map (1x1, depthwise 3x3 with residual, 1x1; BN after each) and SE-scaled prefix
    tokens: ``(B, prefix + H*W, C)`` -> the same shape.

    The prefix tokens (the class token) skip the convs and are multiplied channel-wise by a squeeze-excitation of the
    pooled map (Linear C -> C/4, GELU, Linear; no sigmoid, as in the official code). ``forward(x, hw)`` takes the
    map's ``(H, W)``; without it, ``grid`` (set by whoever knows the input size) or else a square map is used.
    """

    fuse_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))  # Backbone.fuse folds each BN into its conv

    def __init__(self, dim: int, hidden: int, prefix: int = 1) -> None:
        super().__init__()
        self.prefix = prefix
        self.grid: tuple[int, int] | None = None
        self.conv1 = nn.Conv2d(dim, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = nn.Conv2d(hidden, dim, 1)
        self.act = nn.GELU()
        self.bn1 = nn.BatchNorm2d(hidden)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.bn3 = nn.BatchNorm2d(dim)
        self.compress = nn.Linear(dim, dim // 4)
        self.excitation = nn.Linear(dim // 4, dim)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        B, N, C = x.shape
        p = self.prefix
        hw = hw or self.grid or square_grid(x, p)
        pre = x[:, :p]
        x = x[:, p:].transpose(1, 2).reshape(B, C, hw[0], hw[1])  # (B, HW, C) -> (B, C, H, W)
        x = self.act(self.bn1(self.conv1(x)))
        x = x + self.act(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if p:
            weight = self.excitation(self.act(self.compress(x.mean((2, 3)))))  # (B, C), no sigmoid
            pre = pre * weight.unsqueeze(1)
        return torch.cat([pre, x.flatten(2).transpose(1, 2)], dim=1)  # (B, C, H, W) -> (B, p + HW, C)


def head_tokens(x: Tensor, num_heads: int, proj: nn.Linear, norm: nn.Module, act: nn.Module, pos: Tensor) -> Tensor:
    """HI-MHSA's head tokens of ``x`` ``(B, N, C)``: each head's channel group averaged over the tokens, lifted to the
    full width by ``proj`` (head_dim -> C), normed per head group, activated, plus a learned per-head embedding ``pos``
    ``(1, heads, C)``; ``(B, heads, C)``."""
    B, N, C = x.shape
    h, d = num_heads, C // num_heads
    t = x.reshape(B, N, h, d).mean(1)  # (B, N, h, d) -> (B, h, d)
    t = proj(t).reshape(B, h, h, d)  # (B, h, C) -> (B, h, h, d)
    return act(norm(t)).flatten(2) + pos  # -> (B, h, C)
