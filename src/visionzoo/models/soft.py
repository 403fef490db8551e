"""SOFT, from "SOFT: Softmax-free Transformer with Linear Complexity" (Lu et al., NeurIPS 2021).
https://arxiv.org/abs/2110.11945

A PVT-like pyramid: conv patch embeddings (3x3 convs with BN and ReLU), learned position tables, and in stages 1-3
softmax-free attention blocks; stage 4 carries a class token through plain softmax-attention blocks, and the head
reads it after the final norm.

Softmax-free attention (stages 1-3) is NOT softmax attention, so it does not go through ``AttentionCore``: queries
and keys share one projection (``K = Q``, scaled by ``d^-1/4``), the similarity is the Gaussian kernel
``exp(-||q_i - k_j||^2 / 2)``, and the ``N x N`` kernel matrix is replaced by its Nystrom approximation through
``m`` landmarks (a strided ``sr x sr`` conv of the queries, LayerNorm, GELU, per head):
``K(Q, L) pinv(K(L, L)) K(L, Q) V``. The pseudo-inverse is ``newton_pinv``: Newton-Schulz iterations
``V <- 2V - V A V`` (20), started at ``V_0 = alpha A`` with ``alpha = 1.8 / max_row_sum(K)^2``, on
``A = K(L, L) + 0.01 I`` (the official CUDA-side function, written here in torch). As the official autograd function
does, its gradient is the exact inverse's, ``-V^T g V^T``, not the gradient through the iterations. A depthwise conv
over the values (kernel 9/5/3; the heads are its channels) is added. These blocks are post-norm
(``x = LN(x + attn(x)); x = LN(x + FFN(x))``, FFN 4x with tanh-GELU). Stage 4's softmax attention does go through
``AttentionCore`` (``layers.SpatialReductionAttention`` with ``sr_ratio=1``).

Differs from the paper: follows the code. The official ``soft_small`` (depths 1-3-20-4) builds 38.86M parameters
while the paper and README report 24M (3.3 GFLOPs), which stage-3 depth 7 would give; the variant here is the code's.
The official blocks use their ``drop_path`` rate as plain dropout after attention and FFN; so does ``drop_path_rate``
here for stages 1-3 (stage 4 has real stochastic depth). The IJCV "-Norm" variants (symmetric normalisation of the
landmark kernel) are not registered.

Follows fudan-zvg/SOFT ``models/softmax_free_vision_transformer.py``, ``models/softmax_free_transformer.py`` and
``SOFT/kernel/inverse.py`` (Apache-2.0). Each stage is one module here (``stages.i``: ``patch_embed``, ``pos_embed``,
``blocks``, and ``cls_token`` in the last); ``SOFT.remap`` translates the official flat keys (``patch_embed{i}``,
``pos_embed{i}``, ``block{i}.j.att.*``, ``cls_token``, ``head``). Position tables are made for ``img_size`` and,
as in the official code, bilinearly resized to the input's grid on the fly.
"""
from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    LastStageClassTokenMixin,
    MapTokenBlock,
    SpatialReductionAttention,
    drop_path_rates,
    init_linear,
    resample_abs_pos_embed,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["SOFT", "newton_pinv"]


def newton_pinv(mat: Tensor, iters: int = 20, eps: float = 0.01) -> Tensor:
    """Newton-Schulz inverse of ``mat + eps * I`` over the last two dims (square, non-negative entries, as a Gaussian
    kernel matrix); with ``eps=0`` and enough iterations it converges to the Moore-Penrose pseudo-inverse.

    Start ``V_0 = alpha * A`` with ``alpha = 1.8 / max_i(sum_j mat_ij)^2`` (below ``2 / sigma_max(A)^2`` for a
    symmetric ``A``), then ``V <- 2V - V A V``. The gradient is the exact inverse's, ``-V^T g V^T`` (the official
    autograd function), through a zero-valued term: no gradient flows through the iterations.
    """
    m = mat.shape[-1]
    eye = torch.eye(m, dtype=mat.dtype, device=mat.device)
    fixed = mat.detach()
    a = fixed + eps * eye
    alpha = 1.8 / fixed.sum(-1).amax(-1) ** 2  # (...,): one start per matrix
    v = alpha[..., None, None] * a
    for _ in range(iters):
        v = 2 * v - v @ a @ v
    return v - v @ (mat - fixed) @ v  # value v; d/d mat = -v^T g v^T


def gaussian_kernel(q: Tensor, k: Tensor) -> Tensor:
    """``exp(-||q_i - k_j||^2 / 2)`` for ``q`` ``(..., N, d)`` and ``k`` ``(..., M, d)`` -> ``(..., N, M)``."""
    sq = (q * q).sum(-1, keepdim=True) + (k * k).sum(-1).unsqueeze(-2) - 2 * q @ k.transpose(-2, -1)
    return torch.exp(-sq / 2)


@trace_leaf
def stage_pos_embed(pos_embed: Tensor, size: tuple[int, int], grid: tuple[int, int], prefix: int) -> Tensor:
    """A stage's position table bilinearly resized (no antialias, prefix rows kept) from ``grid`` to ``size``."""
    return resample_abs_pos_embed(pos_embed, size, grid, num_prefix_tokens=prefix, interpolation="bilinear",
                                  antialias=False)


class SOFTKernel(nn.Module):
    """Softmax-free attention of per-head queries and values ``(B, h, N, d)`` over an ``(H, W)`` map (see module)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, conv_size: int, newton_iters: int = 20) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.sr_ratio, self.newton_iters = sr_ratio, newton_iters
        d = self.head_dim
        self.Qlandmark_op = nn.Conv2d(d, d, sr_ratio, sr_ratio, bias=False)
        self.Qnorm_act = nn.Sequential(nn.LayerNorm(d), nn.GELU())
        self.conv = nn.Conv2d(num_heads, num_heads, conv_size, padding=conv_size // 2, groups=num_heads, bias=False)

    def forward(self, q: Tensor, v: Tensor, size: tuple[int, int]) -> Tensor:
        B, h, N, d = q.shape
        H, W = size
        q = q / math.sqrt(math.sqrt(d))
        lm = q.reshape(B * h, H, W, d).permute(0, 3, 1, 2)  # (B, h, N, d) -> (B*h, d, H, W)
        lm = self.Qlandmark_op(lm).flatten(2).transpose(1, 2)  # (B*h, d, H', W') -> (B*h, m, d)
        lm = self.Qnorm_act(lm.reshape(B, h, -1, d))  # (B, h, m, d)
        k1 = gaussian_kernel(q, lm)  # (B, h, N, m)
        k2 = gaussian_kernel(lm, lm)  # (B, h, m, m)
        x = (k1 @ newton_pinv(k2, self.newton_iters)) @ (k1.transpose(-2, -1) @ v)  # (B, h, N, d)
        vmap = v.reshape(B, h, H, W, d).permute(0, 4, 1, 2, 3).reshape(B * d, h, H, W)  # heads as conv channels
        conv = self.conv(vmap).reshape(B, d, h, N).permute(0, 2, 3, 1)  # (B*d, h, H, W) -> (B, h, N, d)
        return x + conv


class SOFTAttention(nn.Module):
    """Query and value projections, the softmax-free kernel, output projection (official names)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, conv_size: int, newton_iters: int = 20) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.W_q = nn.Linear(dim, dim)
        self.W_v = nn.Linear(dim, dim)
        self.attn = SOFTKernel(dim, num_heads, sr_ratio, conv_size, newton_iters)
        self.ff = nn.Linear(dim, dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        q = self.W_q(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)  # (B, N, C) -> (B, h, N, d)
        v = self.W_v(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        x = self.attn(q, v, size).transpose(1, 2).reshape(B, N, C)  # (B, h, N, d) -> (B, N, C)
        return self.ff(x)


class SOFTBlock(nn.Module):
    """Post-norm: ``x = LN(x + attn(x))``, ``x = LN(x + FFN(x))`` (FFN 4x, tanh-GELU)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, conv_size: int, drop: float = 0.0,
                 newton_iters: int = 20) -> None:
        super().__init__()
        self.mha = SOFTAttention(dim, num_heads, sr_ratio, conv_size, newton_iters)
        self.dropout1 = nn.Dropout(drop)
        self.norm1 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU(approximate="tanh")
        self.ff2 = nn.Linear(4 * dim, dim)
        self.dropout2 = nn.Dropout(drop)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.norm1(x + self.dropout1(self.mha(x, size)))
        return self.norm2(x + self.dropout2(self.ff2(self.act(self.ff1(x)))))


def _conv_bn_relu(in_dim: int, out_dim: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_dim, out_dim, 3, stride, 1), nn.BatchNorm2d(out_dim), nn.ReLU()]


class SOFTPatchEmbed(nn.Module):
    """Stage 1: three 3x3 conv-BN-ReLU (stride 2, 1, 2; 32 channels inside); later stages: one (stride 2)."""

    def __init__(self, in_dim: int, dim: int, first: bool) -> None:
        super().__init__()
        layers = (_conv_bn_relu(in_dim, 32, 2) + _conv_bn_relu(32, 32, 1) + _conv_bn_relu(32, dim, 2)) if first \
            else _conv_bn_relu(in_dim, dim, 2)
        self.proj = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class SOFTStage(nn.Module):
    """Patch embedding, position table (and class token in the last stage), blocks. NCHW in; NCHW out, or
    ``(map, class token (B, 1, C))`` for the last stage."""

    def __init__(self, in_dim: int, dim: int, grid: tuple[int, int], depth: int, num_heads: int, mlp_ratio: float,
                 sr_ratio: int, conv_size: int, first: bool, last: bool, qkv_bias: bool, drop_path: list[float],
                 newton_iters: int) -> None:
        super().__init__()
        self.patch_embed = SOFTPatchEmbed(in_dim, dim, first)
        self.grid = grid
        self.num_prefix_tokens = int(last)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + self.num_prefix_tokens, dim))
        if last:
            self.blocks = nn.ModuleList([
                MapTokenBlock(dim, SpatialReductionAttention(dim, num_heads, 1, qkv_bias=qkv_bias, prefix_tokens=1),
                              mlp_ratio, drop_path=drop_path[j], norm_layer="ln") for j in range(depth)])
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        else:
            self.blocks = nn.ModuleList([SOFTBlock(dim, num_heads, sr_ratio, conv_size, drop_path[j], newton_iters)
                                         for j in range(depth)])
            self.cls_token = None

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)
        pos = stage_pos_embed(self.pos_embed, (H, W), self.grid, self.num_prefix_tokens)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # -> (B, 1 + N, C)
        x = x + pos
        for block in self.blocks:
            x = block(x, (H, W))
        if self.cls_token is None:
            return x.transpose(1, 2).reshape(B, C, H, W)  # (B, N, C) -> (B, C, H, W)
        return x[:, 1:].transpose(1, 2).reshape(B, C, H, W), x[:, :1]


class SOFT(LastStageClassTokenMixin, Backbone):
    """SOFT: conv patch embeddings, softmax-free attention stages, a last stage of softmax attention with a class
    token, class-token head.

    Args:
        img_size: the input size the position tables are made for (others resize them on the fly).
        sr_ratios: per stage, the side reduction of the landmark conv (stage 4's must be 1: plain attention).
        conv_sizes: the depthwise value-conv kernel of stages 1-3.
        newton_iters: Newton-Schulz iterations of the landmark kernel's pseudo-inverse.
        mlp_ratio: the MLP ratio of the stage-4 blocks (stages 1-3 use 4, fixed in the official code).
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    min_input_size = 32
    input_multiple = 32
    no_weight_decay_keys = ("cls_token",)
    first_conv = "stages.0.patch_embed.proj.0"

    def __init__(self, img_size: int = 224, embed_dims: tuple[int, ...] = (64, 128, 320, 512),
                 depths: tuple[int, ...] = (1, 2, 3, 2), num_heads: tuple[int, ...] = (2, 4, 10, 16),
                 mlp_ratio: float = 4.0, sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
                 conv_sizes: tuple[int, ...] = (9, 5, 3), newton_iters: int = 20, qkv_bias: bool = True, *,
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not len(embed_dims) == len(depths) == len(num_heads) == len(sr_ratios) == 4 or len(conv_sizes) != 3:
            raise ValueError(f"soft: embed_dims, depths, num_heads, sr_ratios need 4 entries and conv_sizes 3, got "
                             f"{tuple(embed_dims)}, {tuple(depths)}, {tuple(num_heads)}, {tuple(sr_ratios)}, "
                             f"{tuple(conv_sizes)}")
        if sr_ratios[-1] != 1:
            raise ValueError(f"soft: the last stage runs plain attention with a class token, so sr_ratios[-1] must "
                             f"be 1, got {tuple(sr_ratios)}")
        self.in_chans = in_chans
        self.embed_dim = embed_dims[-1]
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        self.stages = nn.ModuleList()
        in_dim = in_chans
        for i, dim in enumerate(embed_dims):
            side = img_size // (4 * 2**i)
            stage = SOFTStage(in_dim, dim, (side, side), depths[i], num_heads[i], mlp_ratio, sr_ratios[i],
                              conv_sizes[min(i, 2)], i == 0, i == 3, qkv_bias, dpr[i], newton_iters)
            self.stages.append(stage)
            in_dim = dim
        self.set_feature_info([FeatureInfo(d, 4 * 2**i, f"stages.{i}") for i, d in enumerate(embed_dims)])
        self.norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        self.init_head(self.embed_dim, num_classes, drop_rate, pool_type="token")
        if not self.stages[-1].cls_token.is_meta:
            for stage in self.stages:
                nn.init.trunc_normal_(stage.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.stages[-1].cls_token, std=0.02)
        self.apply(init_linear)

    def forward_stem(self, x: Tensor) -> Tensor:
        return x  # every stage embeds its own patches

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours: ``patch_embed{i}``, ``pos_embed{i}`` -> ``stages.{i-1}.patch_embed``,
        ``.pos_embed``; ``block{i}.j.att.`` (stages 1-3) and ``block4.j.`` -> ``stages.{i-1}.blocks.j.``;
        ``cls_token`` -> ``stages.3.cls_token``; ``head`` -> ``head.fc``."""
        out = {}
        for k, v in state_dict.items():
            k = re.sub(r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.patch_embed.", k)
            k = re.sub(r"^pos_embed(\d+)$", lambda m: f"stages.{int(m[1]) - 1}.pos_embed", k)
            k = re.sub(r"^block(\d+)\.(\d+)\.att\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.", k)
            k = re.sub(r"^block(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.", k)
            k = re.sub(r"^cls_token$", "stages.3.cls_token", k)
            k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
            out[k] = v
        return out


_SRC = "official README (fudan-zvg/SOFT) ImageNet-1K table at 224 (params, FLOPs, top-1; arXiv:2110.11945)"
_NOTES = ("official {name}; params_m counted on the official file. gmacs: visionzoo.profile with the 20 Newton "
          "steps counted; without them {bare} G, as the paper's FLOPs leave them out")
_BASE = dict(embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16), mlp_ratio=4.0)
_MEDIUM = dict(_BASE, embed_dims=(64, 128, 288, 512), num_heads=(2, 4, 9, 16), depths=(1, 3, 29, 5))
_HUGE = dict(_BASE, embed_dims=(64, 128, 352, 512), num_heads=(2, 4, 11, 16), depths=(1, 5, 49, 5))

VARIANTS = {
    "soft_test":   Variant(dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2)),
                           params_m=0.247469, input_size=64, notes="tiny config for tests"),
    "soft_tiny":   Variant(dict(_BASE, depths=(1, 2, 3, 2)), params_m=13.069056, gmacs=2.166,
                           paper=Paper(13, 1.9, 79.3, _SRC), notes=_NOTES.format(name="soft_tiny", bare=1.978)),
    "soft_small":  Variant(dict(_BASE, depths=(1, 3, 20, 4)), params_m=38.858462, gmacs=7.562,
                           paper=Paper(24, 3.3, 82.2, _SRC),
                           notes="official soft_small as the code builds it (depths 1-3-20-4): 38.86M params, 7.56 "
                                 "GMACs with the Newton steps (6.56 without), while the paper and README report 24M "
                                 "and 3.3 GFLOPs, which stage-3 depth 7 gives (24.11M): followed the code, recorded "
                                 "both"),
    "soft_medium": Variant(_MEDIUM, params_m=45.812707, gmacs=8.885, paper=Paper(45, 7.2, 82.9, _SRC),
                           notes=_NOTES.format(name="soft_medium", bare=7.591)),
    "soft_large":  Variant(dict(_BASE, depths=(1, 3, 40, 5)), params_m=64.700646, gmacs=13.471,
                           paper=Paper(64, 11.0, 83.1, _SRC), notes=_NOTES.format(name="soft_large", bare=11.523)),
    "soft_huge":   Variant(_HUGE, params_m=87.108273, gmacs=19.050, paper=Paper(87, 16.3, 83.3, _SRC),
                           notes=_NOTES.format(name="soft_huge", bare=16.41)),
}
register_family(SOFT, VARIANTS, paper="arXiv:2110.11945", kind="vit",
                code="fudan-zvg/SOFT@d3febc3 models/softmax_free_vision_transformer.py")
