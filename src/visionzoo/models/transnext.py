"""TransNeXt, from "TransNeXt: Robust Foveal Visual Perception for Vision Transformers" (Shi, CVPR 2024).
https://arxiv.org/abs/2311.17132

Differs from the paper: none. Follows the pure-PyTorch path of DaiShiResearch/TransNeXt (Apache-2.0),
``classification/transnext.py`` with ``attention_native.py`` (not the swattention CUDA kernel). Each stage is one
module here (``stages.i``: ``patch_embed``, ``blocks``, ``norm``; the classifier is ``head.fc``);
``TransNeXt.remap`` translates the official flat keys (``patch_embed1``, ``block1.0.attn.kv``, ``norm1``, ``head``).
``drop_rate`` is the dropout before the classifier here (the library's meaning); the official ``drop_rate``
(dropout inside the blocks) is ``proj_drop_rate``. The official ``fixed_pool_size`` option (not used by the released
models) is not implemented.

Input sizes: any multiple of 32. The official model fixes its relative-coordinate tables, padding masks and length
scales for one ``img_size`` at construction. Here they are recomputed from the input's size on first use and cached
per (stage, size, device, dtype), never stored in the state dict (while tracing they are built in the graph); the
pooled-key grid is ``H / sr_ratio`` of the actual map. Relative coordinates are normalised by the stage size of
``pretrain_size``, exactly as the official model built with ``img_size=<input>, pretrain_size=<pretrain_size>`` does
(that is how its 384 px fine-tuned models and its detection/segmentation backbones run), so outputs match the
official model built for that input size.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    AttentionCore,
    DropPath,
    LayerNorm,
    drop_path_rates,
    init_linear,
    is_meta,
    is_tracing,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["TransNeXt", "relative_position_cpb", "local_window_tables"]


class StageTables(NamedTuple):
    """Size-dependent tables of one stage: index into the coordinate table, the coordinates, the length scale and,
    for aggregated attention, where each query's window neighbours sit among its tile's keys."""

    index: Tensor  # (Nq * Nk,) long
    coords: Tensor  # (T, 2) log-spaced relative coordinates, one row per distinct (dh, dw)
    seq_scale: Tensor  # (N, 1) log(#keys) per query (aggregated attention) or () log(N) (full attention)
    local_index: Tensor | None  # (t*t, K) the window position (0..window**2-1) of each halo key, per tile query
    local_valid: Tensor | None  # (nT, t*t, K) True where a halo key is the query's neighbour inside the map


def relative_position_cpb(query_size: tuple[int, int], key_size: tuple[int, int], pretrain_size: tuple[int, int],
                          device: torch.device | str | None = None, dtype: torch.dtype | None = None
                          ) -> tuple[Tensor, Tensor]:
    """Index ``(Nq * Nk,)`` and distinct log-spaced coordinates ``(T, 2)`` of every query-key offset.

    Pooled keys sit at the centres of their ``r x r`` pooling cells (``r = query / key`` side, which must divide).
    Offsets are scaled to [-8, 8] by the stage size at pretraining, then mapped through sign(x) * log2(|x| + 1) /
    log2(8). Along an axis the offsets are ``m - (r - 1) / 2`` for every integer ``m`` from ``-(Nk - 1) r`` to
    ``Nq - 1``, in increasing order: the values, and the order, that the official ``torch.unique`` gives; so the
    table matches the official one row for row, without a data-dependent op (traceable, exportable). The vertical
    and horizontal offsets vary independently: the distinct (dh, dw) pairs are all pairs of a distinct dh and a
    distinct dw, in lexicographic order.
    """
    work = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)  # NOTE: float32 at least

    def axis(n_q: int, n_k: int, n_pre: int) -> tuple[Tensor, Tensor]:
        if n_q % n_k:
            raise ValueError(f"transnext: {n_k} pooled positions must divide the {n_q} query positions of an axis")
        r = n_q // n_k
        m = torch.arange(-(n_k - 1) * r, n_q, device=device, dtype=work)  # every distinct q - r k
        values = (m - (r - 1) / 2) / (n_pre - 1) * 8  # (U,), U = 2 n_q - r
        q, k = torch.arange(n_q, device=device), torch.arange(n_k, device=device)
        return values, q[:, None] - r * k[None, :] + (n_k - 1) * r  # (U,), (n_q, n_k) index into values

    dh, ih = axis(query_size[0], key_size[0], pretrain_size[0])
    dw, iw = axis(query_size[1], key_size[1], pretrain_size[1])
    coords = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), dim=-1).reshape(-1, 2)  # (Uh * Uw, 2)
    index = ih[:, None, :, None] * dw.shape[0] + iw[None, :, None, :]  # (Hq, Wq, Hk, Wk)
    coords = torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(8)
    return index.reshape(-1), coords.to(dtype or torch.get_default_dtype())


def local_window_tables(size: tuple[int, int], window_size: int, device: torch.device | str | None = None
                        ) -> tuple[Tensor, Tensor]:
    """Per query of an ``H x W`` map: how many of its ``window x window`` neighbours lie inside the map ``(N, 1)``,
    and a mask ``(N, window**2)`` that is True for the neighbours outside (in ``F.unfold`` order)."""
    def axis(n: int) -> Tensor:  # (n, window): neighbour j of position i inside [0, n)
        pos = torch.arange(n, device=device)[:, None] + torch.arange(window_size, device=device) - window_size // 2
        return (pos >= 0) & (pos < n)

    inside = (axis(size[0])[:, None, :, None] & axis(size[1])[None, :, None, :])  # (H, W, window, window)
    inside = inside.reshape(size[0] * size[1], window_size**2)  # -> (N, window**2)
    return inside.sum(1, keepdim=True), ~inside


def tile_window_tables(size: tuple[int, int], window_size: int, tile: int, device: torch.device | str | None = None
                       ) -> tuple[Tensor, Tensor]:
    """Queries in ``tile x tile`` tiles of an ``H x W`` map, keys in the tiles' halos (``tile + window - 1`` a side,
    ``K`` of them, as ``F.unfold(kernel=tile + window - 1, stride=tile, padding=window // 2)`` cuts them).

    Returns, for each query of a tile and each halo key, the key's position in the query's ``window x window``
    neighbourhood ``(tile**2, K)`` (0 where it is none), and whether it is a neighbour that lies inside the map
    ``(nT, tile**2, K)``."""
    r, side = window_size // 2, tile + window_size - 1
    q, k = torch.arange(tile, device=device), torch.arange(side, device=device)
    off = k[None, :] - q[:, None]  # (tile, side): halo position - query position along an axis, in 0..2r if near
    near = (off >= 0) & (off < window_size)
    local_index = (off[:, None, :, None] * window_size + off[None, :, None, :]).clamp(0, window_size**2 - 1)
    near = near[:, None, :, None] & near[None, :, None, :]  # (tile, tile, side, side)

    def inside(n: int) -> Tensor:  # (n / tile, side): the halo position of each tile inside [0, n)
        pos = torch.arange(0, n, tile, device=device)[:, None] - r + k
        return (pos >= 0) & (pos < n)

    inside_map = inside(size[0])[:, None, :, None] & inside(size[1])[None, :, None, :]  # (nh, nw, side, side)
    valid = near.reshape(1, tile * tile, side * side) & inside_map.reshape(-1, 1, side * side)  # -> (nT, t*t, K)
    return local_index.reshape(tile * tile, side * side), valid


@trace_leaf
def stage_tables(size: tuple[int, int], sr_ratio: int, pretrain_grid: int, window_size: int, tile: int, like: Tensor
                 ) -> StageTables:
    """A stage's tables for an ``(H, W)`` map, on ``like``'s device and in its dtype. One opaque node under FX."""
    (H, W), sr = size, sr_ratio
    index, coords = relative_position_cpb((H, W), (H // sr, W // sr), (pretrain_grid, pretrain_grid), like.device,
                                          like.dtype)
    if sr == 1:
        log_n = torch.full((), math.log(H * W), device=like.device, dtype=like.dtype)
        return StageTables(index, coords, log_n, None, None)
    n_local, _ = local_window_tables((H, W), window_size, like.device)
    n_keys = (n_local + (H // sr) * (W // sr)).to(torch.promote_types(like.dtype, torch.float32))
    seq_scale = torch.log(n_keys).to(like.dtype)  # (N, 1) log(#keys) per query
    return StageTables(index, coords, seq_scale, *tile_window_tables((H, W), window_size, tile, like.device))


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
        self.core = AttentionCore()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.cpb_fc1 = nn.Linear(2, 512)
        self.cpb_act = nn.ReLU()
        self.cpb_fc2 = nn.Linear(512, num_heads)

    def position_bias(self, tables: StageTables, n_query: int, n_key: int) -> Tensor:
        """Continuous relative position bias ``(heads, Nq, Nk)`` from the MLP on the distinct coordinates."""
        bias = self.cpb_fc2(self.cpb_act(self.cpb_fc1(tables.coords)))  # (T, heads)
        return bias.transpose(0, 1)[:, tables.index].reshape(-1, n_query, n_key)

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
        x = self.core(q, F.normalize(k, dim=-1), v, bias, scale=1.0, dropout_p=drop)
        x = merge_heads(x)  # (B, h, N, d) -> (B, N, C)
        return self.proj_drop(self.proj(x))


class AggregatedAttention(_CosineAttentionBase):
    """Each query attends, under one softmax, to its ``window x window`` neighbours and to ``H/sr x W/sr`` pooled
    tokens; the neighbour weights also get a query-dependent term from learnable tokens.

    Computed per ``tile x tile`` tile of queries: their keys and values are the tile's halo (``tile + window - 1`` a
    side, zero outside the map) and the P pooled tokens; the additive bias gives each query its local position bias
    on its own neighbours, -inf on the other halo keys and on those outside the map, and the continuous position
    bias on the pooled keys. So the softmax is the official one over the L neighbours and P pooled tokens (the other
    keys get probability 0), run as one windowed attention (``tile = 1`` would be per-query key sets, far more
    memory). Recorded maps: ``(B * nT, h, tile**2, K + P)``, grid ``(tile, tile)``, tiles in row-major order. The
    learnable-token term is added after the softmax, as the official code does: no part of the probabilities.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 3, sr_ratio: int = 2, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, tile: int = 4) -> None:
        super().__init__(dim, num_heads, attn_drop, proj_drop)
        if window_size % 2 != 1:
            raise ValueError(f"transnext: window_size must be odd, got {window_size}")
        self.window_size = window_size
        self.local_len = window_size**2
        self.sr_ratio = sr_ratio
        self.tile = tile
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
        h, d, t = self.num_heads, self.head_dim, self.tile
        nh, nw, side = H // t, W // t, t + self.window_size - 1
        T, K = nh * nw, side * side

        def tiles(z: Tensor) -> Tensor:  # (B, h, N, e) -> (B * T, h, t * t, e)
            z = z.reshape(B, h, nh, t, nw, t, -1).permute(0, 2, 4, 1, 3, 5, 6)  # -> (B, nh, nw, h, t, t, e)
            return z.reshape(B * T, h, t * t, -1)

        q = F.normalize(self.q(x).reshape(B, N, h, d).transpose(1, 2), dim=-1)  # (B, N, C) -> (B, h, N, d)

        # the tiles' halo keys and values: L2-normalised keys, unfolded together with the values
        k, v = self.kv(x).chunk(2, dim=-1)
        k = F.normalize(k.reshape(B, N, h, d), dim=-1).reshape(B, N, C)
        kv = torch.cat([k, v], dim=-1).transpose(1, 2).reshape(B, 2 * C, H, W)  # (B, N, 2C) -> (B, 2C, H, W)
        kv = F.unfold(kv, side, padding=self.window_size // 2, stride=t)  # -> (B, 2C * K, T)
        k_halo, v_halo = kv.reshape(B, 2 * h, d, K, T).permute(0, 4, 1, 3, 2).chunk(2, dim=2)  # 2 x (B, T, h, K, d)

        # pooled keys and values: 1x1 conv, GELU, average pool to H/sr x W/sr, LayerNorm, the same kv projection
        pooled = x.transpose(1, 2).reshape(B, C, H, W)  # (B, N, C) -> (B, C, H, W)
        pooled = F.adaptive_avg_pool2d(self.act(self.sr(pooled)), (H // self.sr_ratio, W // self.sr_ratio))
        pooled = self.norm(pooled.flatten(2).transpose(1, 2))  # -> (B, P, C)
        P = pooled.shape[1]
        k_pool, v_pool = self.kv(pooled).reshape(B, P, 2 * h, d).transpose(1, 2).chunk(2, dim=1)  # 2 x (B, h, P, d)
        keys = torch.cat([k_halo, F.normalize(k_pool, dim=-1)[:, None].expand(B, T, h, P, d)], dim=3)
        values = torch.cat([v_halo, v_pool[:, None].expand(B, T, h, P, d)], dim=3)  # (B, T, h, K + P, d)

        # bias: the local position bias on each query's own neighbours (-inf elsewhere), the CPB on the pooled keys
        local = self.relative_pos_bias_local[:, tables.local_index]  # (h, L) -> (h, t*t, K)
        local = local[None].masked_fill(~tables.local_valid[:, None], float("-inf"))  # -> (T, h, t*t, K)
        pool = self.position_bias(tables, N, P).reshape(h, nh, t, nw, t, P)  # (h, N, P) -> (h, nh, t, nw, t, P)
        pool = pool.permute(1, 3, 0, 2, 4, 5).reshape(T, h, t * t, P)  # -> (T, h, t*t, P)
        bias = torch.cat([local, pool], dim=-1).expand(B, -1, -1, -1, -1).reshape(B * T, h, t * t, K + P)

        drop = self.attn_drop.p if self.training else 0.0
        x = self.core(tiles(self.scaled_queries(q, tables)), keys.reshape(B * T, h, K + P, d),
                      values.reshape(B * T, h, K + P, d), bias, scale=1.0, dropout_p=drop, grid=(t, t))
        # NOTE: the learnable tokens weight the neighbours after the softmax (the official order); on the halo keys
        extra = tiles(q @ self.learnable_tokens + self.learnable_bias)  # (B, h, N, d) @ (h, d, L) -> (BT, h, t*t, L)
        extra = extra.gather(-1, tables.local_index.expand(B * T, h, -1, -1))  # -> (B * T, h, t*t, K)
        extra = extra.view(B, T, h, t * t, K).masked_fill(~tables.local_valid[:, None], 0.0)  # own neighbours only
        x = x + extra.view(B * T, h, t * t, K) @ v_halo.reshape(B * T, h, K, d)  # -> (B * T, h, t*t, d)
        x = x.reshape(B, nh, nw, h, t, t, d).permute(0, 1, 4, 2, 5, 3, 6)  # -> (B, nh, t, nw, t, h, d)
        return self.proj_drop(self.proj(x.reshape(B, N, C)))


def merge_heads(x: Tensor) -> Tensor:
    """``(B, h, N, d)`` -> ``(B, N, h * d)``."""
    x = x.transpose(1, 2)  # -> (B, N, h, d)
    return x.reshape(x.shape[0], x.shape[1], -1)


class TransNeXtBlock(nn.Module):
    """Pre-norm block: (aggregated) attention, then a convolutional GLU, each residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, window_size: int = 3,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, drop_path: float = 0.0,
                 tile: int = 4) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        if sr_ratio == 1:
            self.attn = TransNeXtAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        else:
            self.attn = AggregatedAttention(dim, num_heads, window_size, sr_ratio, qkv_bias, attn_drop, proj_drop,
                                            tile)
        self.norm2 = LayerNorm(dim)
        self.mlp = ConvolutionalGLU(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, H: int, W: int, tables: StageTables) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W, tables))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class TransNeXtStage(nn.Module):
    """Overlapping patch embedding of an NCHW map, blocks on its tokens, LayerNorm; NCHW out.

    The size-dependent tables (coordinates, masks, length scales) are built for the map's size on first use and
    cached per (size, device, dtype), never stored in the state dict; while tracing they are built in the graph.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, sr_ratio: int,
                 patch_kernel: int, patch_stride: int, pretrain_grid: int, window_size: int = 3, tile: int = 4,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 drop_path: list[float] | None = None) -> None:
        super().__init__()
        drop_path = drop_path or [0.0] * depth
        self.sr_ratio = sr_ratio
        self.pretrain_grid = pretrain_grid
        self.window_size = window_size
        self.tile = tile
        self.patch_embed = TransNeXtPatchEmbed(in_dim, dim, patch_kernel, patch_stride)
        self.blocks = nn.ModuleList([
            TransNeXtBlock(dim, num_heads, mlp_ratio, sr_ratio, window_size, qkv_bias, attn_drop, proj_drop,
                           drop_path[j], tile) for j in range(depth)])
        self.norm = LayerNorm(dim)
        self._tables: dict[tuple, StageTables] = {}  # by (H, W, device, dtype); not state

    def tables(self, H: int, W: int, like: Tensor) -> StageTables:
        """The tables for an ``H x W`` map on ``like``'s device and in its dtype: cached in eager mode."""
        layout = (self.sr_ratio, self.pretrain_grid, self.window_size, self.tile)
        if is_tracing():
            return stage_tables((H, W), *layout, like)
        key = (H, W, like.device, like.dtype)
        if key not in self._tables:
            with torch.inference_mode(False), torch.no_grad():  # tables made under inference_mode serve training
                self._tables[key] = stage_tables((H, W), *layout, like)
        return self._tables[key]

    def forward(self, x: Tensor) -> Tensor:
        x, H, W = self.patch_embed(x)  # (B, C_in, H_in, W_in) -> (B, N, C)
        tables = self.tables(H, W, x)
        for block in self.blocks:
            x = block(x, H, W, tables)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, H, W)  # (B, N, C) -> (B, C, H, W)


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
    has_attention = True
    takes_patch_size = True
    min_input_size = 32
    input_multiple = 32
    first_conv = "stages.0.patch_embed.proj"
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
        self.stages = nn.ModuleList()
        infos = []
        for i in range(n):
            kernel, step = (2 * patch_size - 1, patch_size) if i == 0 else (3, 2)
            # aggregated attention runs in tiles of up to 4 x 4 queries; the tile divides every map of an allowed input
            tile = math.gcd(4, stride // (patch_size * 2**i))
            self.stages.append(TransNeXtStage(
                dims[i - 1] if i else in_chans, dims[i], depths[i], num_heads[i], mlp_ratios[i], sr_ratios[i], kernel,
                step, pretrain_size // (patch_size * 2**i), window_size, tile, qkv_bias, attn_drop_rate,
                proj_drop_rate, dpr[i]))
            infos.append(FeatureInfo(dims[i], patch_size * 2**i, f"stages.{i}"))
        self.set_feature_info(infos)
        self.init_head(dims[-1], num_classes, drop_rate)
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> Tensor:
        return x  # the first patch embedding is part of stage 0

    def no_weight_decay(self) -> set[str]:
        """The official keywords: query embeddings, local bias tables, the CPB MLPs and the temperatures."""
        return {n for n, _ in self.named_parameters() if any(k in n for k in self.nwd_keywords)}

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys (the pre-seams visionzoo layout too) -> ours; our own keys pass unchanged.

        ``patch_embed{i}.*``, ``block{i}.*``, ``norm{i}.*`` -> ``stages.{i-1}.patch_embed.*``, ``.blocks.*``,
        ``.norm.*``; ``head.{weight,bias}`` -> ``head.fc.*``.
        """
        out = {}
        for k, v in state_dict.items():
            k = re.sub(r"^(patch_embed|block|norm)(\d+)\.",
                       lambda m: f"stages.{int(m[2]) - 1}.{'blocks' if m[1] == 'block' else m[1]}.", k)
            out[re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)] = v
        return out


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
