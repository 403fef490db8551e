"""Attention options for plain token sequences besides softmax attention: the ``attn_type`` seam of ``Attention``.

``Attention(attn_type=...)`` picks the core of one attention layer; a plain-ViT family takes a model-level
``attn_type`` and gives each block its layer type with ``attn_types_per_block``:

- ``"softmax"`` (default): ``softmax(q k^T / sqrt(d)) v`` through ``AttentionCore`` (SDPA).
- ``"diag"``: TransNormer's DiagAttention, from "The Devil in Linear Transformer" (Qin et al., EMNLP 2022,
  https://arxiv.org/abs/2210.10340): softmax attention within non-overlapping chunks of ``chunk_size`` consecutive
  tokens (a block-diagonal attention matrix). It is softmax attention and runs through ``AttentionCore`` with the
  chunks as a leading batch dim.
- ``"norm_linear"``: TransNormer's NormAttention: ``phi(q) (phi(k)^T v)`` with ``phi = 1 + elu`` and no
  ``1 / (phi(q) sum phi(k))`` scaling; the heads' concatenated output goes through a parameter-free RMS norm
  (``SimpleRMSNorm``) before the output projection. Linear in the number of tokens; it is not softmax attention and
  does not use ``AttentionCore`` (it has no probabilities to observe and takes no bias).
- ``"gmm"``: the Gaussian mixture mask of "Toward a Deeper Understanding: RetNet Viewed through Convolution" (Li &
  Zhang, 2023, https://arxiv.org/abs/2309.05375): the logits are multiplied element-wise by a per-head mask
  ``M[i, j] = sum_k alpha_k exp(-|p_i - p_j|^2 / (2 (sigma_k^2 + 1e-5)))`` over the 2-D patch positions ``p``,
  ``softmax((q k^T / sqrt(d)) * M) v`` (``AttentionCore``'s ``weight``), with two learned scalars per kernel and head.

Model-level types (``attn_types_per_block``): ``"transnormer"`` = ``"diag"`` in the first half of the blocks and
``"norm_linear"`` in the rest (the paper's layout: local attention in early layers against attention dilution);
``"retnet"`` = ``"gmm"`` in every block; a layer type given at model level applies to every block.

Follows OpenNLPLab/fairseq-evo (the code behind OpenNLPLab/Transnormer's scripts; ``roberta_transnormer_t2``:
``linear_act_fun="1+elu"``, chunk 64, softmax in the chunks, SimpleRMSNorm) and
CatworldLee/Gaussian-Mixture-Mask-Attention (``models/gmm.py``, 5 kernels). Differs from them: the padded keys of
the last chunk are masked (the official code lets zero keys take part in the softmax); the Gaussian mask is
computed as ``exp(-d^2 / (2 s))`` (the official ``exp(-d^2 / 2) ** (1 / s)`` underflows to 0 in float32 beyond
about 14 patches); class/prefix tokens keep a mask weight of 1 (the official ViT drops its class token when the
mask is on); TransNormer's URPE position encoding and GLU channel mixer are not part of the attention option.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tracing import trace_leaf

LAYER_ATTN_TYPES = ("softmax", "diag", "norm_linear", "gmm")
MODEL_ATTN_TYPES = ("softmax", "transnormer", "retnet", "diag", "norm_linear", "gmm")


def attn_types_per_block(attn_type: str, depth: int) -> list[str]:
    """The layer attention type of each of ``depth`` blocks for a model-level ``attn_type``."""
    if attn_type not in MODEL_ATTN_TYPES:
        raise ValueError(f"attn_type must be one of {MODEL_ATTN_TYPES}, got {attn_type!r}")
    if attn_type == "transnormer":
        return ["diag"] * (depth // 2) + ["norm_linear"] * (depth - depth // 2)
    return ["gmm" if attn_type == "retnet" else attn_type] * depth


def elu_feature_map(x: Tensor) -> Tensor:
    """TransNormer's kernel ``phi(x) = 1 + elu(x)`` (positive)."""
    return 1 + F.elu(x)


def norm_linear_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``phi(q) (phi(k)^T v)`` over ``(..., N, d)`` tensors, without the denominator (NormAttention's core)."""
    kv = elu_feature_map(k).transpose(-2, -1) @ v  # (..., d, N) @ (..., N, d_v) -> (..., d, d_v)
    return elu_feature_map(q) @ kv  # (..., N, d) @ (..., d, d_v) -> (..., N, d_v)


class SimpleRMSNorm(nn.Module):
    """``x / (rms(x) + eps)`` over the last dim, no parameters (TransNormer's output norm)."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
        return x / (rms + self.eps)


@trace_leaf
def to_chunks(q: Tensor, k: Tensor, v: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(B, h, N, d)`` q, k, v zero-padded to whole chunks, as ``(B, h * G, chunk, d)``, and the additive
    ``(h * G, 1, chunk)`` mask of the padded keys (``-inf``; 0 for the keys that exist), in ``q``'s dtype."""
    B, h, N, d = q.shape
    pad = (-N) % chunk_size
    G = (N + pad) // chunk_size
    valid = F.pad(torch.ones(N, dtype=torch.bool, device=q.device), (0, pad), value=False)
    mask = torch.zeros(G, 1, chunk_size, dtype=q.dtype, device=q.device)
    mask = mask.masked_fill(~valid.reshape(G, 1, chunk_size), float("-inf")).repeat(h, 1, 1)  # (h * G, 1, c)
    q, k, v = (F.pad(t, (0, 0, 0, pad)).reshape(B, h * G, chunk_size, d) for t in (q, k, v))  # -> (B, h*G, c, d)
    return q, k, v, mask


def diag_attention(core: nn.Module, q: Tensor, k: Tensor, v: Tensor, chunk_size: int, scale: float,
                   dropout_p: float = 0.0) -> Tensor:
    """Softmax attention within chunks of ``chunk_size`` consecutive tokens of ``(B, h, N, d)`` q, k, v.

    Runs through ``core`` (an ``AttentionCore``) as one ``(B, h * G, chunk, d)`` call (4-D, as SDPA exports); the
    padded keys of the last chunk are masked out."""
    B, h, N, d = q.shape
    qc, kc, vc, mask = to_chunks(q, k, v, chunk_size)
    out = core(qc, kc, vc, mask, scale=scale, dropout_p=dropout_p)
    return out.reshape(B, h, -1, d)[:, :, :N]  # (B, h * G, c, d) -> (B, h, N, d)


def diag_attention_probs(core: nn.Module, q: Tensor, k: Tensor, chunk_size: int, scale: float) -> Tensor:
    """The full ``(B, h, N, N)`` block-diagonal probabilities of ``diag_attention`` (zero outside the chunks)."""
    N = q.shape[-2]
    chunk = torch.arange(N, device=q.device) // chunk_size
    return core.probs(q, k, chunk[:, None] == chunk[None, :], scale=scale)


@trace_leaf
def grid_sq_dist(n: int | Tensor, prefix_tokens: int, grid: tuple[int, int] | None, like: Tensor) -> Tensor:
    """Squared distances ``(N_p, N_p)`` between the patch positions of a row-major ``grid`` (square when ``None``)."""
    n = int(n) - prefix_tokens
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"attn_type='gmm': {n} patch tokens do not form a square grid; pass grid=(H, W)")
        grid = (side, side)
    if grid[0] * grid[1] != n:
        raise ValueError(f"attn_type='gmm': grid {grid} does not hold the {n} patch tokens")
    ys = torch.arange(grid[0], device=like.device, dtype=like.dtype).repeat_interleave(grid[1])
    xs = torch.arange(grid[1], device=like.device, dtype=like.dtype).repeat(grid[0])
    return (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2


class GaussianMixtureMask(nn.Module):
    """Per-head multiplicative logit mask, a mixture of ``num_kernels`` Gaussians of the patch distance."""

    def __init__(self, num_heads: int, num_kernels: int = 5) -> None:
        super().__init__()
        self.sigma = nn.Parameter(torch.empty(num_kernels, num_heads, 1, 1))
        self.alpha = nn.Parameter(torch.empty(num_kernels, num_heads, 1, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.sigma.is_meta:
            return
        with torch.no_grad():  # as the official code: sigma ~ N(10, 10^2), alpha ~ N(0, 2^2)
            self.sigma.normal_(10.0, 10.0)
            self.alpha.normal_(0.0, 2.0)

    def forward(self, n: int, prefix_tokens: int, grid: tuple[int, int] | None, like: Tensor) -> Tensor:
        """The mask ``(heads, N, N)`` for ``n`` tokens (``prefix_tokens`` first, weight 1 in their rows/cols)."""
        d2 = grid_sq_dist(n, prefix_tokens, grid, like)
        var = 2 * (self.sigma.to(like.dtype) ** 2 + 1e-5)  # (K, h, 1, 1)
        mask = (self.alpha.to(like.dtype) * torch.exp(-d2 / var)).sum(0)  # (K, h, N_p, N_p) -> (h, N_p, N_p)
        return F.pad(mask, (prefix_tokens, 0, prefix_tokens, 0), value=1.0)
