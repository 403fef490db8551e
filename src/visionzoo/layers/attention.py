"""Multi-head self-attention through ``F.scaled_dot_product_attention``."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .act import LayerType
from .norm import get_norm


class Attention(nn.Module):
    """Multi-head self-attention over tokens ``(B, N, C)``, with an optional additive mask or bias.

    Args:
        qk_norm: normalise queries and keys per head before the dot product.
        attn_mask: in ``forward``, a float tensor broadcastable to ``(B, heads, N, N)`` added to the logits.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_layer: LayerType = "ln",
                 head_dim: int | None = None) -> None:
        super().__init__()
        if head_dim is None and dim % num_heads != 0:
            raise ValueError(f"attention: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = self.num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        norm = get_norm(norm_layer)
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, 3, h, d) -> 3 x (B, h, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        drop = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, -1)  # (B, h, N, d) -> (B, N, h * d)
        return self.proj_drop(self.proj(x))
