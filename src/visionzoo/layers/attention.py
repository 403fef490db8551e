"""The attention seam: every softmax attention in the library computes through ``AttentionCore``.

``AttentionCore`` computes ``softmax(q @ k^T * scale + bias) @ v``. By default that is one
``F.scaled_dot_product_attention`` call (fused, fast); a tool switches a core to the explicit path, where
the probabilities exist as a tensor, by setting ``observer`` (attention maps) or ``fused = False``
(quantizing the two matmuls, through the optional ``q_quant``/``k_quant``/``v_quant``/``probs_quant`` hooks).
Masks, relative-position tables and a tool's per-key bias (``extra_bias``, e.g. ToMe's log token size) all enter
the same way: added to the logits. ``qkv_observer`` shows a tool the queries, keys and values of a call (ToMe's
matching metric, EViT's class attention) without leaving the fused path.

``Attention`` is plain multi-head self-attention over tokens on top of it. Besides ``forward`` it can give the
probabilities alone from queries and keys (``attention_probs``) and let a caller turn its values into the output
(``forward(x, attend=...)``): MCTF's one-step-ahead attention computes the map on the tokens before merging and
applies the merged map to the values of the merged tokens.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .act import LayerType
from .linear_attention import (
    LAYER_ATTN_TYPES,
    GaussianMixtureMask,
    SimpleRMSNorm,
    diag_attention,
    diag_attention_probs,
    norm_linear_attention,
)
from .norm import get_norm
from .tracing import is_fx_symbolic_tracing, is_tracing

Observer = Callable[["AttentionCore", Tensor, "tuple[int, int] | None"], None]
QKVObserver = Callable[["AttentionCore", Tensor, Tensor, Tensor, "Tensor | None", float], None]


class AttentionCore(nn.Module):
    """``softmax(q k^T * scale + bias) v`` over the last two dims of ``q``, ``k``, ``v`` (any batch dims before).

    Has no parameters, so it changes no state-dict layout. The module that owns it sets ``prefix_tokens``
    (class/distillation tokens ahead of the patch tokens) and passes ``grid``, the ``(H, W)`` layout of the
    queries, whenever it is not the whole patch grid (windows, stripes, rows).

    Attributes a tool may set:
        observer: called as ``observer(core, probs, grid)`` with the ``(..., N_q, N_k)`` probabilities.
        fused: ``False`` runs the explicit matmul-softmax-matmul path even without an observer.
        extra_bias: a tensor added to the logits on top of the caller's bias (broadcast to ``(..., N_q, N_k)``);
            a float bias is cast to the dtype of ``q`` (autocast), a boolean one masks (``True`` = may attend).
        qkv_observer: called as ``qkv_observer(core, q, k, v, bias, scale)`` before the attention runs, with the
            bias that will be added (the caller's and ``extra_bias`` combined) and the resolved scale. It does not
            switch off the fused path.
        head_mask: a ``(heads,)`` tensor multiplying each head's output (0 removes a head; head importance).

    ``forward``'s optional ``weight`` (broadcast to ``(..., N_q, N_k)``) multiplies the scaled logits before the bias
    is added (a multiplicative mask such as the Gaussian mixture mask of ``linear_attention.py``); it runs the
    explicit path.

    Attributes the owning module may set, for windowed calls (the leading dim is batch x windows), so that tools
    can put each window's queries back on the image:
        partition: ``"block"`` (default): contiguous ``grid``-sized windows of the (padded) token map in row-major
            order (Swin windows, CSWin stripes, RMT rows/columns); ``"grid"``: each window a ``grid``-sized set of
            tokens strided over the whole map (MaxViT grid attention, CrossFormer's long-distance groups).
        shift: ``(dy, dx)``, the cyclic shift the map was rolled by (``-shift``) before partitioning (Swin's
            shifted windows).
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
        self.head_mask: Tensor | None = None
        self.partition = "block"
        self.shift: tuple[int, int] = (0, 0)
        self.qkv_observer: QKVObserver | None = None

        self.q_quant: Callable[[Tensor], Tensor] | None = None
        self.k_quant: Callable[[Tensor], Tensor] | None = None
        self.v_quant: Callable[[Tensor], Tensor] | None = None
        self.probs_quant: Callable[[Tensor], Tensor] | None = None

    def full_bias(self, bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """The caller's ``bias`` combined with ``extra_bias`` (a float bias in ``dtype``), as the logits get it."""
        extra = self.extra_bias
        if extra is None:
            return bias
        if extra.is_floating_point() and extra.dtype != dtype:
            extra = extra.to(dtype)
        if bias is None:
            return extra
        if bias.dtype == torch.bool and extra.dtype == torch.bool:
            return bias & extra
        if bias.dtype == torch.bool:  # a boolean mask becomes 0 / -inf before a float bias is added to it
            bias = torch.zeros_like(bias, dtype=extra.dtype).masked_fill(~bias, float("-inf"))
        return _add_bias(bias, extra)

    def probs(self, q: Tensor, k: Tensor, bias: Tensor | None = None, *, scale: float | None = None,
              weight: Tensor | None = None) -> Tensor:
        """``softmax(q k^T * scale (* weight) + bias + extra_bias)``, ``(..., N_q, N_k)``, without the values."""
        return self._probs(q, k, self.full_bias(bias, q.dtype), q.shape[-1] ** -0.5 if scale is None else scale,
                           weight)

    def _probs(self, q: Tensor, k: Tensor, bias: Tensor | None, scale: float, weight: Tensor | None = None) -> Tensor:
        logits = (q * scale) @ k.transpose(-2, -1)  # (..., N_q, d) @ (..., d, N_k) -> (..., N_q, N_k)
        if weight is not None:
            logits = logits * weight
        if bias is not None:
            logits = _add_bias(logits, bias)
        return logits.softmax(dim=-1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, *, scale: float | None = None,
                dropout_p: float = 0.0, grid: tuple[int, int] | None = None, weight: Tensor | None = None) -> Tensor:
        bias = self.full_bias(bias, q.dtype)
        if self.qkv_observer is not None:
            self.qkv_observer(self, q, k, v, bias, q.shape[-1] ** -0.5 if scale is None else scale)
        quant = not (self.q_quant is None and self.k_quant is None and self.v_quant is None
                     and self.probs_quant is None)
        if self.fused and self.observer is None and not quant and weight is None:
            out = self._sdpa(q, k, v, bias, scale, dropout_p)
            if bias is not None and is_tracing():
                # NOTE: on CPU, SDPA's output layout depends on the kernel it picks, and that depends on whether the
                # bias requires grad (a table computed from parameters does); the ONNX exporter re-traces with the
                # other answer than torch.export, so a caller's transpose + reshape recorded as a view then fails.
                # One copy in traced graphs makes the layout the same for every kernel; eager is unchanged.
                out = out.clone(memory_format=torch.contiguous_format)
            return out if self.head_mask is None else self._mask_heads(out)
        if quant:
            q, k, v = _apply(self.q_quant, q), _apply(self.k_quant, k), _apply(self.v_quant, v)
        probs = self._probs(q, k, bias, q.shape[-1] ** -0.5 if scale is None else scale, weight)
        if self.observer is not None:
            self.observer(self, probs, grid)
        if self.probs_quant is not None:
            probs = self.probs_quant(probs)
        if dropout_p > 0.0:
            probs = F.dropout(probs, dropout_p, training=True)
        out = probs @ v  # (..., N_q, N_k) @ (..., N_k, d_v) -> (..., N_q, d_v)
        return out if self.head_mask is None else self._mask_heads(out)

    @staticmethod
    def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float | None, dropout_p: float = 0.0
              ) -> Tensor:
        """The fused path: ``F.scaled_dot_product_attention``, with its inputs as torch's CPU kernel takes them (not
        under FX symbolic tracing, where ranks and strides are not known)."""
        if is_fx_symbolic_tracing():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
        if bias is not None and bias.dim() not in (2, q.dim()):
            # NOTE: torch's CPU SDPA takes its fused kernel only with a 2-D mask or one of q's rank, and falls back
            # to its unfused math path otherwise (a 3-D (heads, N, N) bias: 2.8x slower at RMT's shapes, AMD EPYC).
            # Leading 1s broadcast the same.
            bias = bias[(None,) * (q.dim() - bias.dim())]
        # NOTE: so does a q, k or v whose last dimension is strided (GLNet's global tokens: 1.2-1.6x slower)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)

    def _mask_heads(self, out: Tensor) -> Tensor:
        """``out`` ``(..., heads, N_q, d_v)`` with each head scaled by ``head_mask``."""
        mask = self.head_mask
        if mask.ndim != 1 or mask.numel() != out.shape[-3]:
            raise ValueError(f"AttentionCore.head_mask must have one entry per head ({out.shape[-3]}), got shape "
                             f"{tuple(mask.shape)}")
        return out * mask.to(out.dtype).view(-1, 1, 1)

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
        attend: in ``forward``, a function from the values of ``x`` ``(B, heads, N, d)`` to the attention output
            ``(B, heads, N, d)``, in place of ``softmax(q k^T) v`` (queries and keys are then not computed, and
            attention dropout is the function's business).
        attn_type: the core (``linear_attention.py``): ``"softmax"`` (default), ``"diag"`` (TransNormer's
            block-diagonal softmax over chunks of ``chunk_size`` tokens), ``"norm_linear"`` (TransNormer's
            NormAttention, with a parameter-free RMS norm before ``proj``), ``"gmm"`` (the Gaussian mixture logit mask
            of "RetNet viewed through convolution", ``num_kernels`` Gaussians; adds ``mask.sigma``/``mask.alpha``).
            Only ``"softmax"`` takes token tools (``extra_bias``, ``qkv_observer``); ``"norm_linear"`` has no
            probabilities and takes no mask.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_layer: LayerType = "ln",
                 head_dim: int | None = None, prefix_tokens: int = 0, attn_type: str = "softmax",
                 chunk_size: int = 64, num_kernels: int = 5) -> None:
        super().__init__()
        if head_dim is None and dim % num_heads != 0:
            raise ValueError(f"attention: dim {dim} must be divisible by num_heads {num_heads}")
        if attn_type not in LAYER_ATTN_TYPES:
            raise ValueError(f"attention: attn_type must be one of {LAYER_ATTN_TYPES}, got {attn_type!r}")
        self.attn_type = attn_type
        self.chunk_size = chunk_size
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
        if attn_type == "gmm":
            self.mask = GaussianMixtureMask(num_heads, num_kernels)
        if attn_type == "norm_linear":
            self.out_norm = SimpleRMSNorm()
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: Tensor, part: slice, n: int) -> list[Tensor]:
        """Rows ``part`` of the qkv projection (``n`` of q/k/v) of ``x`` ``(B, N, C)``, as ``n x (B, h, N, d)``."""
        B, N, _ = x.shape
        bias = None if self.qkv.bias is None else self.qkv.bias[part]
        y = F.linear(x, self.qkv.weight[part], bias).reshape(B, N, n, self.num_heads, self.head_dim)
        return list(y.permute(2, 0, 3, 1, 4).unbind(0))  # (B, N, n, h, d) -> n x (B, h, N, d)

    def attention_probs(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """The probabilities ``(B, heads, N, N)`` of ``x``'s self-attention, from queries and keys alone."""
        inner = self.num_heads * self.head_dim
        q, k = self._heads(x, slice(0, 2 * inner), 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.attn_type == "gmm":
            weight = self.mask(x.shape[1], self.core.prefix_tokens, None, q)
            return self.core.probs(q, k, attn_mask, scale=self.scale, weight=weight)
        if self.attn_type == "diag":
            return diag_attention_probs(self.core, q, k, self.chunk_size, self.scale)
        if self.attn_type == "norm_linear":
            raise ValueError("attention: attn_type='norm_linear' (linear attention) has no attention probabilities")
        return self.core.probs(q, k, attn_mask, scale=self.scale)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, grid: tuple[int, int] | None = None,
                attend: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        B, N, _ = x.shape
        if attend is not None:
            inner = self.num_heads * self.head_dim
            (v,) = self._heads(x, slice(2 * inner, 3 * inner), 1)
            x = attend(v).transpose(1, 2).reshape(B, N, -1)  # (B, h, N, d) -> (B, N, h * d)
            return self.proj_drop(self.proj(x))
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, 3, h, d) -> 3 x (B, h, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        drop = self.attn_drop.p if self.training else 0.0
        if self.attn_type == "softmax":
            x = self.core(q, k, v, attn_mask, scale=self.scale, dropout_p=drop, grid=grid)
        else:
            x = self._other_core(q, k, v, attn_mask, drop, grid)
        x = x.transpose(1, 2).reshape(B, N, -1)  # (B, h, N, d) -> (B, N, h * d)
        if self.attn_type == "norm_linear":
            x = self.out_norm(x)
        return self.proj_drop(self.proj(x))

    def _other_core(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, drop: float,
                    grid: tuple[int, int] | None) -> Tensor:
        """The ``(B, h, N, d)`` output of a core other than softmax (``attn_type``)."""
        core = self.core
        if not is_tracing():
            if core.extra_bias is not None or core.qkv_observer is not None:
                raise ValueError(f"attention: token tools (extra_bias, qkv_observer) need attn_type='softmax', "
                                 f"got {self.attn_type!r}")
            if self.attn_type == "norm_linear" and (attn_mask is not None or core.observer is not None
                                                    or core.head_mask is not None):
                raise ValueError("attention: attn_type='norm_linear' (linear attention) takes no attn_mask and has "
                                 "no attention probabilities to observe or heads to mask")
            if self.attn_type == "diag" and attn_mask is not None:
                raise ValueError("attention: attn_type='diag' takes no attn_mask")
        if self.attn_type == "gmm":
            weight = self.mask(q.shape[2], core.prefix_tokens, grid, q)
            return core(q, k, v, attn_mask, scale=self.scale, dropout_p=drop, grid=grid, weight=weight)
        if self.attn_type == "diag":
            return diag_attention(core, q, k, v, self.chunk_size, self.scale, drop)
        return norm_linear_attention(q, k, v)
