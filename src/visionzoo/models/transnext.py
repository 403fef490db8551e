"""TransNeXt, from "TransNeXt: Robust Foveal Visual Perception for Vision Transformers" (Shi, CVPR 2024).
https://arxiv.org/abs/2311.17132

Differs from the paper: none. Follows the pure-PyTorch path of DaiShiResearch/TransNeXt (Apache-2.0),
``classification/transnext.py`` with ``attention_native.py`` (not the swattention CUDA kernel), and keeps its
state-dict keys (``patch_embed1``, ``block1.0.attn.kv``, ``norm1``, ``head``), so official checkpoints load as they
are. ``drop_rate`` is the dropout before the classifier here (the library's meaning); the official ``drop_rate``
(dropout inside the blocks) is ``proj_drop_rate``. The official ``fixed_pool_size`` option (not used by the released
models) is not implemented.

Input sizes: any multiple of 32. The official model fixes its relative-coordinate tables, padding masks and length
scales for one ``img_size`` at construction. Here they are recomputed from the input's size on first use and cached
per (stage, size, device, dtype), never stored in the state dict; the pooled-key grid is ``H / sr_ratio`` of the
actual map. Relative coordinates are normalised by the stage size of ``pretrain_size``, exactly as the official
model built with ``img_size=<input>, pretrain_size=<pretrain_size>`` does (that is how its 384 px fine-tuned models
and its detection/segmentation backbones run), so outputs match the official model built for that input size.
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import DropPath, LayerNorm, drop_path_rates, init_linear, is_meta
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["TransNeXt", "relative_position_cpb", "local_window_tables"]


class StageTables(NamedTuple):
    """Size-dependent tables of one stage: index into the coordinate table, the coordinates, length scale, mask."""

    index: Tensor  # (Nq * Nk,) long
    coords: Tensor  # (T, 2) log-spaced relative coordinates, one row per distinct (dh, dw)
    seq_scale: Tensor  # (N, 1) log(#keys) per query (aggregated attention) or () log(N) (full attention)
    padding_mask: Tensor | None  # (N, window**2) True where the sliding window leaves the map


@torch.no_grad()
def relative_position_cpb(query_size: tuple[int, int], key_size: tuple[int, int],
                          pretrain_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Index ``(Nq * Nk,)`` and distinct log-spaced coordinates ``(T, 2)`` of every query-key offset.

    Pooled keys sit at the centres of their pooling cells (adaptive average of the query axis). Offsets are scaled to
    [-8, 8] by the stage size at pretraining, then mapped through sign(x) * log2(|x| + 1) / log2(8). The vertical and
    horizontal offsets vary independently, so the distinct (dh, dw) pairs are all pairs of a distinct dh and a
    distinct dw, in the lexicographic order ``torch.unique(dim=0)`` gives the official table. Computed on CPU.
    """
    def axis(n_q: int, n_k: int, n_pre: int) -> tuple[Tensor, Tensor]:
        q = torch.arange(n_q, dtype=torch.float32, device="cpu")
        k = F.adaptive_avg_pool1d(q[None], n_k)[0]
        return torch.unique((q[:, None] - k[None, :]) / (n_pre - 1) * 8, return_inverse=True)  # (U,), (n_q, n_k)

    dh, ih = axis(query_size[0], key_size[0], pretrain_size[0])
    dw, iw = axis(query_size[1], key_size[1], pretrain_size[1])
    coords = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), dim=-1).view(-1, 2)  # (Uh * Uw, 2)
    index = ih[:, None, :, None] * len(dw) + iw[None, :, None, :]  # (Hq, Wq, Hk, Wk)
    coords = torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(8)
    return index.reshape(-1), coords


@torch.no_grad()
def local_window_tables(size: tuple[int, int], window_size: int) -> tuple[Tensor, Tensor]:
    """Per query of an ``H x W`` map: how many of its ``window x window`` neighbours lie inside the map ``(N, 1)``,
    and a mask ``(N, window**2)`` that is True for the neighbours outside (in ``F.unfold`` order). Computed on CPU."""
    ones = torch.ones(1, 1, *size, device="cpu")
    inside = F.unfold(ones, window_size, padding=window_size // 2)[0]  # (window**2, N)
    return inside.sum(0)[:, None], (inside == 0).t()


class TransNeXtPatchEmbed(nn.Module):
    """Overlapping strided convolution, then LayerNorm over the flattened tokens."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(out_dim)  # NOTE: torch's eps 1e-5 here, as the official code

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W  # (B, C, H, W) -> (B, N, C)


class TransNeXtDWConv(nn.Module):
    """Depthwise 3x3 convolution on a token sequence laid out as an ``H x W`` map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        B, N, C = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(B, C, H, W))  # (B, N, C) -> (B, C, H, W)
        return x.flatten(2).transpose(1, 2)  # -> (B, N, C)


class ConvolutionalGLU(nn.Module):
    """Gated linear unit whose gate branch is a depthwise 3x3 conv + GELU: fc2(GELU(dw(x)) * v)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        self.fc1 = nn.Linear(dim, 2 * hidden_dim)
        self.dwconv = TransNeXtDWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        x, v = self.fc1(x).chunk(2, dim=-1)
        x = self.drop(self.act(self.dwconv(x, H, W)) * v)
        return self.drop(self.fc2(x))


class _CosineAttentionBase(nn.Module):
    """Parameters shared by both attentions: temperature, query embedding and the log-CPB position MLP."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"transnext: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # softplus(temperature) starts at 1 / 0.24
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), math.log(math.expm1(1 / 0.24))))
        self.query_embedding = nn.Parameter(torch.zeros(num_heads, 1, self.head_dim))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.cpb_fc1 = nn.Linear(2, 512)
        self.cpb_act = nn.ReLU()
        self.cpb_fc2 = nn.Linear(512, num_heads)

    def position_bias(self, tables: StageTables, n_query: int, n_key: int) -> Tensor:
        """Continuous relative position bias ``(heads, Nq, Nk)`` from the MLP on the distinct coordinates."""
        bias = self.cpb_fc2(self.cpb_act(self.cpb_fc1(tables.coords)))  # (T, heads)
        return bias.transpose(0, 1)[:, tables.index].view(-1, n_query, n_key)

    def scaled_queries(self, q: Tensor, tables: StageTables) -> Tensor:
        """Length-scaled cosine queries: (normalised q + query embedding) * softplus(temperature) * log(#keys)."""
        return (q + self.query_embedding) * F.softplus(self.temperature) * tables.seq_scale


class TransNeXtAttention(_CosineAttentionBase):
    """Full multi-head attention (last stage) with length-scaled cosine similarity and log-CPB bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__(dim, num_heads, attn_drop, proj_drop)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)

    def forward(self, x: Tensor, H: int, W: int, tables: StageTables) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, 3, h, d) -> 3 x (B, h, N, d)
        q = self.scaled_queries(F.normalize(q, dim=-1), tables)
        bias = self.position_bias(tables, N, N)[None]  # (1, h, N, N)
        drop = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, F.normalize(k, dim=-1), v, attn_mask=bias, dropout_p=drop, scale=1.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, h, N, d) -> (B, N, C)
        return self.proj_drop(self.proj(x))


class AggregatedAttention(_CosineAttentionBase):
    """Each query attends, under one softmax, to its ``window x window`` neighbours and to ``H/sr x W/sr`` pooled
    tokens; the neighbour weights also get a query-dependent term from learnable tokens."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 3, sr_ratio: int = 2, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__(dim, num_heads, attn_drop, proj_drop)
        if window_size % 2 != 1:
            raise ValueError(f"transnext: window_size must be odd, got {window_size}")
        self.window_size = window_size
        self.local_len = window_size**2
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.sr = nn.Conv2d(dim, dim, 1)
        self.norm = nn.LayerNorm(dim)  # NOTE: torch's eps 1e-5 here, as the official code
        self.act = nn.GELU()
        self.relative_pos_bias_local = nn.Parameter(torch.zeros(num_heads, self.local_len))
        self.learnable_tokens = nn.Parameter(torch.zeros(num_heads, self.head_dim, self.local_len))
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, self.local_len))

    def forward(self, x: Tensor, H: int, W: int, tables: StageTables) -> Tensor:
        B, N, C = x.shape
        h, d, L = self.num_heads, self.head_dim, self.local_len
        q = F.normalize(self.q(x).reshape(B, N, h, d).transpose(1, 2), dim=-1)  # (B, N, C) -> (B, h, N, d)
        q_scaled = self.scaled_queries(q, tables)

        # sliding-window keys and values: L2-normalised keys, unfolded together with the values
        k, v = self.kv(x).chunk(2, dim=-1)
        k = F.normalize(k.reshape(B, N, h, d), dim=-1).reshape(B, N, C)
        kv = torch.cat([k, v], dim=-1).transpose(1, 2).reshape(B, 2 * C, H, W)  # (B, N, 2C) -> (B, 2C, H, W)
        kv = F.unfold(kv, self.window_size, padding=self.window_size // 2)  # -> (B, 2C * L, N)
        k_local, v_local = kv.reshape(B, 2 * h, d, L, N).permute(0, 1, 4, 2, 3).chunk(2, dim=1)  # 2 x (B, h, N, d, L)
        attn_local = (q_scaled.unsqueeze(-2) @ k_local).squeeze(-2)  # (B, h, N, 1, d) @ (B, h, N, d, L) -> (B, h, N, L)
        attn_local = attn_local + self.relative_pos_bias_local.unsqueeze(1)
        attn_local = attn_local.masked_fill(tables.padding_mask, float("-inf"))

        # pooled keys and values: 1x1 conv, GELU, average pool to H/sr x W/sr, LayerNorm, the same kv projection
        pooled = x.transpose(1, 2).reshape(B, C, H, W)  # (B, N, C) -> (B, C, H, W)
        pooled = F.adaptive_avg_pool2d(self.act(self.sr(pooled)), (H // self.sr_ratio, W // self.sr_ratio))
        pooled = self.norm(pooled.flatten(2).transpose(1, 2))  # -> (B, P, C)
        P = pooled.shape[1]
        k_pool, v_pool = self.kv(pooled).reshape(B, P, 2 * h, d).transpose(1, 2).chunk(2, dim=1)  # 2 x (B, h, P, d)
        attn_pool = q_scaled @ F.normalize(k_pool, dim=-1).transpose(-2, -1) + self.position_bias(tables, N, P)

        attn = torch.cat([attn_local, attn_pool], dim=-1).softmax(dim=-1)  # (B, h, N, L + P)
        attn_local, attn_pool = self.attn_drop(attn).split([L, P], dim=-1)
        attn_local = attn_local + q @ self.learnable_tokens + self.learnable_bias  # (B, h, N, L)
        x_local = (attn_local.unsqueeze(-2) @ v_local.transpose(-2, -1)).squeeze(-2)  # -> (B, h, N, d)
        x = (x_local + attn_pool @ v_pool).transpose(1, 2).reshape(B, N, C)  # (B, h, N, d) -> (B, N, C)
        return self.proj_drop(self.proj(x))


class TransNeXtBlock(nn.Module):
    """Pre-norm block: (aggregated) attention, then a convolutional GLU, each residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, window_size: int = 3,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        if sr_ratio == 1:
            self.attn = TransNeXtAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        else:
            self.attn = AggregatedAttention(dim, num_heads, window_size, sr_ratio, qkv_bias, attn_drop, proj_drop)
        self.norm2 = LayerNorm(dim)
        self.mlp = ConvolutionalGLU(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, H: int, W: int, tables: StageTables) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W, tables))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class TransNeXt(Backbone):
    """TransNeXt: four stages of overlapping patch embedding, aggregated-attention blocks (full attention where
    ``sr_ratio`` is 1) with convolutional GLUs, and a per-stage LayerNorm; mean of the last tokens, then a Linear.

    Args:
        sr_ratios: per stage, the side ratio of the map to its pooled-token grid; 1 selects full attention.
        window_size: side of the sliding window of aggregated attention (odd).
        pretrain_size: the input size the relative coordinates are normalised for (224 for the released models,
            also when they run at 384 px); not a limit on the input size.
        proj_drop_rate: dropout after the attention projection and inside the GLU (the official ``drop_rate``).
    """

    kind = "vit"
    takes_patch_size = True
    min_input_size = 32
    input_multiple = 32
    first_conv = "patch_embed1.proj"
    classifier = "head"
    nwd_keywords = ("query_embedding", "relative_pos_bias_local", "cpb", "temperature")

    def __init__(self, dims: tuple[int, ...] = (48, 96, 192, 384), depths: tuple[int, ...] = (2, 2, 15, 2),
                 num_heads: tuple[int, ...] = (2, 4, 8, 16), mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
                 sr_ratios: tuple[int, ...] = (8, 4, 2, 1), window_size: int = 3, qkv_bias: bool = True,
                 pretrain_size: int = 224, patch_size: int = 4, *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        n = len(depths)
        if not len(dims) == len(num_heads) == len(mlp_ratios) == len(sr_ratios) == n:
            raise ValueError(f"transnext: dims {tuple(dims)}, depths {tuple(depths)}, num_heads {tuple(num_heads)}, "
                             f"mlp_ratios {tuple(mlp_ratios)} and sr_ratios {tuple(sr_ratios)} need one entry per "
                             f"stage")
        stride = patch_size * 2 ** (n - 1)
        if pretrain_size % stride or pretrain_size < 2 * stride:
            raise ValueError(f"transnext: pretrain_size must be a multiple of {stride} and at least {2 * stride} "
                             f"(every stage needs 2+ positions to normalise coordinates), got {pretrain_size}")
        for i, r in enumerate(sr_ratios):
            if (stride // (patch_size * 2**i)) % r:
                raise ValueError(f"transnext: sr_ratios[{i}]={r} must divide {stride // (patch_size * 2**i)} so that "
                                 f"every input multiple of {stride} pools evenly")
        self.in_chans = in_chans
        self.num_stages = n
        self.patch_size = patch_size
        self.pretrain_size = pretrain_size
        self.window_size = window_size
        self.sr_ratios = tuple(sr_ratios)
        self.min_input_size = self.input_multiple = stride
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        infos = []
        for i in range(n):
            embed = (TransNeXtPatchEmbed(in_chans, dims[0], 2 * patch_size - 1, patch_size) if i == 0 else
                     TransNeXtPatchEmbed(dims[i - 1], dims[i], 3, 2))
            blocks = nn.ModuleList([
                TransNeXtBlock(dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], window_size, qkv_bias,
                               attn_drop_rate, proj_drop_rate, dpr[i][j]) for j in range(depths[i])])
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", LayerNorm(dims[i]))
            infos.append(FeatureInfo(dims[i], patch_size * 2**i, f"norm{i + 1}"))
        self.set_feature_info(infos)
        self.init_linear_head(dims[-1], num_classes, drop_rate)
        self._tables: dict[tuple, StageTables] = {}  # size-dependent tables by (stage, H, W, device, dtype); not state
        self.apply(_init_weights)

    def stage_tables(self, i: int, H: int, W: int, like: Tensor) -> StageTables:
        """Stage ``i``'s tables for an ``H x W`` map: built on CPU once per size, cached on ``like``'s device."""
        key = (i, H, W, like.device, like.dtype)
        if key not in self._tables:
            sr, pre = self.sr_ratios[i], self.pretrain_size // (self.patch_size * 2**i)
            with torch.inference_mode(False):  # tables made under inference_mode must still serve training
                index, coords = relative_position_cpb((H, W), (H // sr, W // sr), (pre, pre))
                if sr == 1:
                    seq_scale, mask = torch.tensor(math.log(H * W), device="cpu"), None
                else:
                    n_local, mask = local_window_tables((H, W), self.window_size)
                    seq_scale = torch.log(n_local + (H // sr) * (W // sr))
                dev, dt = like.device, like.dtype
                self._tables[key] = StageTables(index.to(dev), coords.to(dev, dt), seq_scale.to(dev, dt),
                                                None if mask is None else mask.to(dev))
        return self._tables[key]

    def forward_stage(self, i: int, x: Tensor) -> Tensor:
        """Stage ``i``: patch embedding of an NCHW map, blocks on tokens, the stage norm; returns NCHW."""
        x, H, W = self.get_submodule(f"patch_embed{i + 1}")(x)  # (B, C_in, H_in, W_in) -> (B, N, C)
        tables = self.stage_tables(i, H, W, x)
        for block in self.get_submodule(f"block{i + 1}"):
            x = block(x, H, W, tables)
        x = self.get_submodule(f"norm{i + 1}")(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, H, W)  # (B, N, C) -> (B, C, H, W)

    def forward_stem(self, x: Tensor) -> Tensor:
        return x  # the first patch embedding is part of stage 0

    def stage_modules(self) -> list[nn.Module]:
        # NOTE: callables rather than modules, so the official flat key layout (patch_embed1, block1, norm1) is kept
        return [partial(self.forward_stage, i) for i in range(self.num_stages)]


    def no_weight_decay(self) -> set[str]:
        """The official keywords: query embeddings, local bias tables, the CPB MLPs and the temperatures."""
        return {n for n, _ in self.named_parameters() if any(k in n for k in self.nwd_keywords)}


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d) and not is_meta(m):  # fan-out normal init, as the official code
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(m.bias)
    elif isinstance(m, _CosineAttentionBase) and not m.query_embedding.is_meta:
        nn.init.trunc_normal_(m.query_embedding, std=0.02)
        if isinstance(m, AggregatedAttention):
            nn.init.trunc_normal_(m.relative_pos_bias_local, std=0.0004)
            nn.init.trunc_normal_(m.learnable_tokens, std=0.02)
    init_linear(m, std=0.02)


_README = "official README, ImageNet-1K 224x224 pre-trained models"
_FT = "official README, ImageNet-1K 384x384 fine-tuned models"
_MACS = ("gmacs: the official model (native attention path) counted with visionzoo.profile; fvcore gives {fv}, "
         "the README {rd} G")
_SIZES = "other multiples of 32 recompute the coordinate tables, masks and length scales per input size"
_FT_NOTES = ("fine-tuned at 384 px from the 224 px model; the coordinates stay normalised for pretrain_size=224, as "
             "the official fine-tuning config sets; evaluated by warping to 384x384 (no crop)")
_T = dict(dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24))
_S = dict(**_T, depths=(5, 5, 22, 5))
_B = dict(dims=(96, 192, 384, 768), num_heads=(4, 8, 16, 32), depths=(5, 5, 23, 5))

# params_m: exact count of the official model (1000 classes)
VARIANTS = {
    "transnext_test":      Variant(dict(dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                                        pretrain_size=64), params_m=0.240256, input_size=64),
    "transnext_micro":     Variant(dict(), params_m=12.809304, gmacs=2.649,
                                   paper=Paper(12.8, 2.7, 82.5, _README),
                                   notes=f"{_MACS.format(fv=2.664, rd=2.7)}; {_SIZES}"),
    "transnext_tiny":      Variant(dict(**_T), params_m=28.258960, gmacs=5.711,
                                   paper=Paper(28.2, 5.7, 84.0, _README),
                                   notes=f"{_MACS.format(fv=5.734, rd=5.7)}; {_SIZES}"),
    "transnext_small":     Variant(_S, params_m=49.741564, gmacs=10.291,
                                   paper=Paper(49.7, 10.3, 84.7, _README),
                                   notes=f"{_MACS.format(fv=10.33, rd=10.3)}; {_SIZES}"),
    "transnext_base":      Variant(_B, params_m=89.721496, gmacs=18.300,
                                   paper=Paper(89.7, 18.4, 84.8, _README),
                                   notes=f"{_MACS.format(fv=18.354, rd=18.4)}; {_SIZES}"),
    "transnext_small_384": Variant(_S, params_m=49.741564, gmacs=32.018, input_size=384, crop_pct=1.0,
                                   paper=Paper(49.7, 32.1, 86.0, _FT),
                                   notes=f"{_FT_NOTES}; gmacs: the official model built with img_size=384, "
                                         f"pretrain_size=224, counted with visionzoo.profile"),
    "transnext_base_384":  Variant(_B, params_m=89.721496, gmacs=56.185, input_size=384, crop_pct=1.0,
                                   paper=Paper(89.7, 56.3, 86.2, _FT),
                                   notes=f"{_FT_NOTES}; gmacs: the official model built with img_size=384, "
                                         f"pretrain_size=224, counted with visionzoo.profile"),
}
register_family(TransNeXt, VARIANTS, paper="arXiv:2311.17132", kind="vit", family="transnext")
