"""The attention seam: every softmax attention in the library computes through ``AttentionCore``.

``AttentionCore`` computes ``softmax(q @ k^T * scale + bias) @ v``. By default that is one
``F.scaled_dot_product_attention`` call (fused, fast); a tool switches a core to the explicit path, where
the probabilities exist as a tensor, by setting ``observer`` (attention maps) or ``fused = False``
(quantizing the two matmuls, through the optional ``q_quant``/``k_quant``/``v_quant``/``probs_quant`` hooks).
Masks, relative-position tables and a tool's per-key bias (``extra_bias``, e.g. ToMe's log token size) all enter
the same way: added to the logits.

``Attention`` is plain multi-head self-attention over tokens on top of it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .act import LayerType
from .norm import get_norm

Observer = Callable[["AttentionCore", Tensor, "tuple[int, int] | None"], None]


class AttentionCore(nn.Module):
    """``softmax(q k^T * scale + bias) v`` over the last two dims of ``q``, ``k``, ``v`` (any batch dims before).

    Has no parameters, so it changes no state-dict layout. The module that owns it sets ``prefix_tokens``
    (class/distillation tokens ahead of the patch tokens) and passes ``grid``, the ``(H, W)`` layout of the
    queries, whenever it is not the whole patch grid (windows, stripes, rows).

    Attributes a tool may set:
        observer: called as ``observer(core, probs, grid)`` with the ``(..., N_q, N_k)`` probabilities.
        fused: ``False`` runs the explicit matmul-softmax-matmul path even without an observer.
        extra_bias: a tensor added to the logits on top of the caller's bias (broadcast to ``(..., N_q, N_k)``).
        q_quant, k_quant, v_quant, probs_quant: ``None`` (the default) or a callable (e.g. a fake-quantizer module)
            applied to the matmul inputs of the explicit path: ``q`` and ``k`` before ``q @ k^T``, the post-softmax
            probabilities and ``v`` before ``probs @ v``. Setting any of them runs the explicit path. A module set here
            becomes a submodule (its buffers join the state dict); ``None`` leaves the state dict as it was.
    """

    def __init__(self, prefix_tokens: int = 0) -> None:
        super().__init__()
        self.prefix_tokens = prefix_tokens
        self.fused = True
        self.observer: Observer | None = None
        self.extra_bias: Tensor | None = None
        self.q_quant: Callable[[Tensor], Tensor] | None = None
        self.k_quant: Callable[[Tensor], Tensor] | None = None
        self.v_quant: Callable[[Tensor], Tensor] | None = None
        self.probs_quant: Callable[[Tensor], Tensor] | None = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, *, scale: float | None = None,
                dropout_p: float = 0.0, grid: tuple[int, int] | None = None) -> Tensor:
        if self.extra_bias is not None:
            bias = self.extra_bias if bias is None else _add_bias(bias, self.extra_bias)
        quant = not (self.q_quant is None and self.k_quant is None and self.v_quant is None
                     and self.probs_quant is None)
        if self.fused and self.observer is None and not quant:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if quant:
            q, k, v = _apply(self.q_quant, q), _apply(self.k_quant, k), _apply(self.v_quant, v)
        logits = (q * scale) @ k.transpose(-2, -1)  # (..., N_q, d) @ (..., d, N_k) -> (..., N_q, N_k)
        if bias is not None:
            logits = _add_bias(logits, bias)
        probs = logits.softmax(dim=-1)
        if self.observer is not None:
            self.observer(self, probs, grid)
        if self.probs_quant is not None:
            probs = self.probs_quant(probs)
        if dropout_p > 0.0:
            probs = F.dropout(probs, dropout_p, training=True)
        return probs @ v  # (..., N_q, N_k) @ (..., N_k, d_v) -> (..., N_q, d_v)

    def extra_repr(self) -> str:
        return f"prefix_tokens={self.prefix_tokens}" if self.prefix_tokens else ""


def _apply(fn: Callable[[Tensor], Tensor] | None, x: Tensor) -> Tensor:
    return x if fn is None else fn(x)


def _add_bias(logits: Tensor, bias: Tensor) -> Tensor:
    """Logits plus an additive float bias, or with a boolean mask applied (``True`` = may attend, as in SDPA)."""
    if bias.dtype == torch.bool:
        return logits.masked_fill(~bias, float("-inf"))
    return logits + bias


class Attention(nn.Module):
    """Multi-head self-attention over tokens ``(B, N, C)``, with an optional additive mask or bias.

    Args:
        qk_norm: normalise queries and keys per head before the dot product.
        prefix_tokens: class/distillation tokens ahead of the patch tokens (recorded with attention maps).
        attn_mask: in ``forward``, a float tensor broadcastable to ``(B, heads, N, N)`` added to the logits.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_layer: LayerType = "ln",
                 head_dim: int | None = None, prefix_tokens: int = 0) -> None:
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
        self.core = AttentionCore(prefix_tokens)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, grid: tuple[int, int] | None = None) -> Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, 3, h, d) -> 3 x (B, h, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        drop = self.attn_drop.p if self.training else 0.0
        x = self.core(q, k, v, attn_mask, scale=self.scale, dropout_p=drop, grid=grid)
        x = x.transpose(1, 2).reshape(B, N, -1)  # (B, h, N, d) -> (B, N, h * d)
        return self.proj_drop(self.proj(x))
