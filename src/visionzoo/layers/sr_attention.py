"""Spatial-reduction attention (PVT v1 and v2): queries from every token, keys and values from a smaller map."""
from __future__ import annotations

from torch import Tensor, nn

from .attention import AttentionCore


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys and values come from the token map shrunk ``sr_ratio`` times per side.

    The reduction is a strided ``sr_ratio`` x ``sr_ratio`` conv and a LayerNorm (PVT v1, v2); with ``linear=True``
    it is PVT v2's linear SRA instead: average-pool to a fixed 7x7 grid, 1x1 conv, LayerNorm, GELU. With
    ``sr_ratio=1`` (and not linear) keys and values come from all tokens, as in plain attention. State-dict keys
    (``q``, ``kv``, ``sr``, ``norm``, ``proj``) are those of the official code and of timm. ``prefix_tokens``: tokens
    ahead of the map's ``H * W`` tokens (PVT v1's class token in its last stage, where keys are not reduced).
    """

    def __init__(self, dim: int, num_heads: int = 8, sr_ratio: int = 1, linear: bool = False, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, pool_size: int = 7, prefix_tokens: int = 0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"spatial-reduction attention: dim {dim} must be divisible by num_heads {num_heads}")
        if sr_ratio < 1:
            raise ValueError(f"spatial-reduction attention: sr_ratio must be >= 1, got {sr_ratio}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.core = AttentionCore(prefix_tokens)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # NOTE: the reduction's LayerNorm keeps torch's default eps 1e-5 in the official code and in timm
        self.pool = nn.AdaptiveAvgPool2d(pool_size) if linear else None
        self.reduces = linear or sr_ratio > 1
        if self.reduces:
            kernel = 1 if linear else sr_ratio
            self.sr = nn.Conv2d(dim, dim, kernel_size=kernel, stride=kernel)
            self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU() if linear else None

    def reduce(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """Tokens of an ``(H, W)`` map ``(B, H*W, C)`` -> the reduced tokens ``(B, N', C)``."""
        B, _, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, *size)  # (B, HW, C) -> (B, C, H, W)
        if self.pool is not None:
            x = self.pool(x)
        x = self.sr(x).flatten(2).transpose(1, 2)  # (B, C, H', W') -> (B, H'W', C)
        x = self.norm(x)
        return self.act(x) if self.act is not None else x

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """``x``: tokens ``(B, N, C)`` of an ``(H, W)`` map (after ``prefix_tokens`` others), ``N == H * W`` whenever
        keys are reduced."""
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # -> (B, h, N, d)
        kv = self.kv(self.reduce(x, size) if self.reduces else x)
        kv = kv.reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # -> (2, B, h, N', d)
        k, v = kv.unbind(0)
        x = self.core(q, k, v, dropout_p=self.attn_drop if self.training else 0.0, grid=size)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, h, N, d) -> (B, N, C)
        return self.proj_drop(self.proj(x))
