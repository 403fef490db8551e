"""RMT, from "RMT: Retentive Networks Meet Vision Transformers" (Fan et al., CVPR 2024).
https://arxiv.org/abs/2309.11523

Differs from the paper: none. Follows the official qhfan/RMT ``classfication_release/RMT.py`` (the repository has no
licence file). The official factories ``RMT_T3``, ``RMT_S``, ``RMT_M2`` and ``RMT_L6`` are ``rmt_tiny``,
``rmt_small``, ``rmt_base`` and ``rmt_large`` (README RMT-T/S/B/L). The token-labelling models (README RMT-S*/B*/L*,
with an extra dense ``aux_head``) are not included. The official ``chunkwise_recurrents`` are ``decomposed`` here, and
the attention runs through ``AttentionCore`` (SDPA) with the spatial decay as its additive bias (the official code
writes the matmuls out; same MACs).

Manhattan self-attention (MaSA): softmax attention over rotary-shifted queries and keys whose logits get
``|dh| + |dw|`` times a per-head ``log(gamma)``; in the decomposed form (early stages) attention runs along each row
with a 1-D decay, then along each column. The decay masks and rotary tables depend only on the map size: they are
built for each input size (in eager, on first use and cached per size, device and dtype), never stored in the state
dict, so any input that is a multiple of 32 works.

Layout: the official code ends stage i with the downsampling to stage i + 1 (``layers.i.downsample``) and takes no
features; here stage i starts with it (``stages.i.downsample``), so stage outputs are the features at strides
4/8/16/32. The head's projection (Linear to ``projection`` channels, BatchNorm, SiLU, before the average pool) is part
of the official ``forward_features``, and is here too: ``forward_norm`` runs it (a 1x1 conv, so that ``fuse`` folds
the BatchNorm into it), so ``num_features`` is ``projection`` and the head is a plain pool + Linear. ``RMT.remap``
translates official checkpoints: ``layers.i.blocks`` -> ``stages.i.blocks``, ``layers.i.Relpos`` ->
``stages.i.relpos`` (the per-head ``angle`` / ``decay`` constants stay persistent buffers, as there),
``layers.i.downsample`` -> ``stages.{i+1}.downsample``, ``proj.weight`` (C', C) -> (C', C, 1, 1), ``head`` ->
``head.fc``.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import AttentionCore, DropPath, LayerNorm, drop_path_rates, init_linear, is_tracing, trace_leaf
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["RMT", "manhattan_decay", "decay_1d"]


def manhattan_decay(H: int, W: int, decay: Tensor) -> Tensor:
    """``(heads, H*W, H*W)``: ``decay[h] * (|dh| + |dw|)`` between every two positions of an ``H x W`` map."""
    grid = torch.stack(torch.meshgrid(torch.arange(H).to(decay), torch.arange(W).to(decay), indexing="ij"), dim=-1)
    grid = grid.reshape(H * W, 2)  # (H, W, 2) -> (N, 2)
    dist = (grid[:, None, :] - grid[None, :, :]).abs().sum(-1)  # (N, N)
    return dist * decay[:, None, None]


def decay_1d(n: int, decay: Tensor) -> Tensor:
    """``(heads, n, n)``: ``decay[h] * |i - j|`` along one axis of length ``n``."""
    idx = torch.arange(n).to(decay)
    return (idx[:, None] - idx[None, :]).abs() * decay[:, None, None]


def rotate_pairs(x: Tensor) -> Tensor:
    """Rotate each channel pair ``(a, b)`` of the last dimension to ``(-b, a)``."""
    return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)


class RetentionTables(NamedTuple):
    """Size-dependent inputs of MaSA for one stage: rotary tables ``(H, W, d)`` and the decay mask(s)."""

    sin: Tensor
    cos: Tensor
    masks: tuple[Tensor, ...]  # (mask_h (heads, H, H), mask_w (heads, W, W)) or (mask (heads, N, N),)


@trace_leaf
def retention_tables(x: Tensor, angle: Tensor, decay: Tensor, decomposed: bool) -> RetentionTables:
    """The tables for the ``(B, H, W, C)`` map ``x``, in its dtype and on its device (computed in float32, or float64
    for a float64 map, from the per-head ``angle`` and ``decay`` constants)."""
    H, W = x.shape[1], x.shape[2]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    angle, decay = angle.to(x.device, work), decay.to(x.device, work)
    pos = torch.arange(H * W, device=x.device, dtype=work)  # rotary position: the row-major index of the token
    phase = pos[:, None] * angle[None, :]  # (N, d)
    sin, cos = phase.sin().reshape(H, W, -1), phase.cos().reshape(H, W, -1)  # (N, d) -> (H, W, d)
    masks = (decay_1d(H, decay), decay_1d(W, decay)) if decomposed else (manhattan_decay(H, W, decay),)
    return RetentionTables(sin.to(x.dtype), cos.to(x.dtype), tuple(m.to(x.dtype) for m in masks))


class RMTRelPos(nn.Module):
    """Per-head spatial decay ``log(1 - 2**(-init - range * h / heads))`` and rotary angles; builds the tables."""

    def __init__(self, dim: int, num_heads: int, init_value: float, heads_range: float, decomposed: bool) -> None:
        super().__init__()
        self.decomposed = decomposed
        angle = 1.0 / (10000 ** torch.linspace(0, 1, dim // num_heads // 2))
        self.register_buffer("angle", angle.repeat_interleave(2))  # each frequency for a channel pair
        h = torch.arange(num_heads, dtype=torch.float)
        self.register_buffer("decay", torch.log(1 - 2 ** (-init_value - heads_range * h / num_heads)))
        self._tables: dict[tuple, RetentionTables] = {}  # eager cache by (H, W, device, dtype); not state

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._tables.clear()  # new constants: rebuild the tables
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor) -> RetentionTables:
        """The tables for the ``(B, H, W, C)`` map ``x``: built in the graph while tracing, cached in eager."""
        if is_tracing():
            return retention_tables(x, self.angle, self.decay, self.decomposed)
        key = (x.shape[1], x.shape[2], x.device, x.dtype)
        if key not in self._tables:
            with torch.inference_mode(False), torch.no_grad():  # tables made under inference_mode serve training
                self._tables[key] = retention_tables(x, self.angle, self.decay, self.decomposed)
        return self._tables[key]


class RMTDWConv(nn.Module):
    """Depthwise convolution on an NHWC map."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C) -> conv on NCHW -> (B, H, W, C)


class ManhattanSelfAttention(nn.Module):
    """MaSA on an NHWC map: rotary queries/keys, decayed softmax attention (whole map, or rows then columns),
    plus a depthwise 5x5 conv of the values (LCE)."""

    def __init__(self, dim: int, num_heads: int, decomposed: bool) -> None:
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"rmt: dim {dim} / num_heads {num_heads} must give an even head width")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.decomposed = decomposed
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.lepe = RMTDWConv(dim, 5)
        self.core = AttentionCore()
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, tables: RetentionTables) -> Tensor:
        B, H, W, C = x.shape
        n, d = self.num_heads, self.head_dim
        v = self.v_proj(x)
        lepe = self.lepe(v)
        q = self.q_proj(x).reshape(B, H, W, n, d).permute(0, 3, 1, 2, 4)  # (B, H, W, C) -> (B, n, H, W, d)
        k = self.k_proj(x).reshape(B, H, W, n, d).permute(0, 3, 1, 2, 4)
        q = q * tables.cos + rotate_pairs(q) * tables.sin
        k = k * tables.cos + rotate_pairs(k) * tables.sin
        v = v.reshape(B, H, W, n, d)
        if self.decomposed:
            mask_h, mask_w = tables.masks[0], tables.masks[1]  # (n, H, H), (n, W, W)
            # along each row: (B, n, H, W, d) -> (B * H, n, W, d)
            q_r, k_r = (t.transpose(1, 2).reshape(B * H, n, W, d) for t in (q, k))
            v = v.permute(0, 1, 3, 2, 4).reshape(B * H, n, W, d)  # (B, H, W, n, d) -> (B * H, n, W, d)
            v = self.core(q_r, k_r, v, mask_w, scale=self.scale, grid=(1, W))  # a query row
            # then along each column: (B, n, H, W, d) -> (B * W, n, H, d)
            q_c, k_c = (t.permute(0, 3, 1, 2, 4).reshape(B * W, n, H, d) for t in (q, k))
            v = v.reshape(B, H, n, W, d).permute(0, 3, 2, 1, 4).reshape(B * W, n, H, d)  # rows' output, by column
            x = self.core(q_c, k_c, v, mask_h, scale=self.scale, grid=(H, 1))  # a query column
            x = x.reshape(B, W, n, H, d).permute(0, 3, 1, 2, 4).reshape(B, H, W, C)  # -> (B, H, W, n * d)
        else:
            q, k = q.flatten(2, 3), k.flatten(2, 3)  # (B, n, H, W, d) -> (B, n, N, d)
            v = v.permute(0, 3, 1, 2, 4).flatten(2, 3)  # (B, H, W, n, d) -> (B, n, N, d)
            x = self.core(q, k, v, tables.masks[0], scale=self.scale)  # the whole map
            x = x.transpose(1, 2).reshape(B, H, W, C)  # (B, n, N, d) -> (B, H, W, C)
        return self.out_proj(x + lepe)


class RMTFeedForward(nn.Module):
    """fc1, GELU, a residual depthwise 3x3 conv, fc2 (on NHWC maps)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.dwconv = RMTDWConv(hidden_dim, 3)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.fc1(x))
        x = x + self.dwconv(x)
        return self.drop(self.fc2(x))


class RMTBlock(nn.Module):
    """Conditional position encoding (x + dw3x3(x)), then pre-norm MaSA and FFN, each residual (optional layerscale)."""

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, decomposed: bool, drop_path: float = 0.0,
                 layerscale: bool = False, ls_init: float = 1e-6, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.pos = RMTDWConv(dim, 3)
        self.retention_layer_norm = LayerNorm(dim)
        self.retention = ManhattanSelfAttention(dim, num_heads, decomposed)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.final_layer_norm = LayerNorm(dim)
        self.ffn = RMTFeedForward(dim, hidden_dim, proj_drop)
        self.layerscale = layerscale
        if layerscale:
            self.gamma_1 = nn.Parameter(torch.full((1, 1, 1, dim), ls_init))
            self.gamma_2 = nn.Parameter(torch.full((1, 1, 1, dim), ls_init))

    def forward(self, x: Tensor, tables: RetentionTables) -> Tensor:
        x = x + self.pos(x)
        y = self.retention(self.retention_layer_norm(x), tables)
        x = x + self.drop_path(self.gamma_1 * y if self.layerscale else y)
        y = self.ffn(self.final_layer_norm(x))
        return x + self.drop_path(self.gamma_2 * y if self.layerscale else y)


class RMTPatchMerging(nn.Module):
    """3x3 stride-2 convolution + BatchNorm on an NHWC map: halves H and W."""

    fuse_pairs = (("reduction", "norm"),)

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.reduction(x.permute(0, 3, 1, 2)))  # (B, H, W, C) -> (B, C', H/2, W/2)
        return x.permute(0, 2, 3, 1)  # -> (B, H/2, W/2, C')


class RMTStage(nn.Module):
    """One stage on an NHWC map: downsampling from the previous stage (not in the first), then MaSA blocks that share
    the stage's decay constants and its tables for the map size."""

    def __init__(self, in_dim: int | None, dim: int, depth: int, num_heads: int, init_value: float,
                 heads_range: float, hidden_dim: int, decomposed: bool, drop_path: list[float], layerscale: bool,
                 ls_init: float, proj_drop: float) -> None:
        super().__init__()
        self.downsample = RMTPatchMerging(in_dim, dim) if in_dim is not None else nn.Identity()
        self.relpos = RMTRelPos(dim, num_heads, init_value, heads_range, decomposed)
        self.blocks = nn.ModuleList([
            RMTBlock(dim, num_heads, hidden_dim, decomposed, drop_path[j], layerscale, ls_init, proj_drop)
            for j in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        tables = self.relpos(x)
        for block in self.blocks:
            x = block(x, tables)
        return x


class RMTStem(nn.Module):
    """Four 3x3 convs (C/2 stride 2, C/2, C stride 2, C) with BatchNorm, GELU between: stride 4, NHWC out."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, 3, 2, 1), nn.BatchNorm2d(dim // 2), nn.GELU(),
            nn.Conv2d(dim // 2, dim // 2, 3, 1, 1), nn.BatchNorm2d(dim // 2), nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 3, 1, 1), nn.BatchNorm2d(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H/4, W/4, dim)


class RMT(Backbone):
    """RMT: a 4-conv stem, four stages of MaSA blocks (decomposed in the early stages) with conv downsampling, a
    projection to ``projection`` channels (1x1 conv, BatchNorm, Swish), then average pool and Linear.

    Args:
        init_values, heads_ranges: per stage, the decay of head h is ``log(1 - 2**(-init - range * h / heads))``.
        decomposed: per stage, attention along rows then columns (the official ``chunkwise_recurrents``) rather than
            over the whole map.
        layerscales, ls_init: per stage, whether blocks scale their branches by a learned vector starting at ls_init.
        projection: channels of the final projection (``num_features``).
    """

    kind = "vit"
    has_attention = True
    min_input_size = 32
    input_multiple = 32
    first_conv = "patch_embed.proj.0"
    fuse_pairs = (("proj", "norm"),)  # Backbone.fuse folds the projection's BatchNorm into it

    def __init__(self, dims: tuple[int, ...] = (64, 128, 256, 512), depths: tuple[int, ...] = (2, 2, 8, 2),
                 num_heads: tuple[int, ...] = (4, 4, 8, 16), init_values: tuple[float, ...] = (2, 2, 2, 2),
                 heads_ranges: tuple[float, ...] = (4, 4, 6, 6), mlp_ratios: tuple[float, ...] = (3, 3, 3, 3),
                 decomposed: tuple[bool, ...] = (True, True, False, False),
                 layerscales: tuple[bool, ...] = (False, False, False, False), ls_init: float = 1e-6,
                 projection: int = 1024, *, in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        n = len(depths)
        per_stage = dict(dims=dims, num_heads=num_heads, init_values=init_values, heads_ranges=heads_ranges,
                         mlp_ratios=mlp_ratios, decomposed=decomposed, layerscales=layerscales)
        bad = {k: tuple(v) for k, v in per_stage.items() if len(v) != n}
        if bad:
            raise ValueError(f"rmt: {bad} must have one entry per stage, like depths {tuple(depths)}")
        self.in_chans = in_chans
        self.patch_embed = RMTStem(in_chans, dims[0])
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        # NOTE: every stage is built before the next (downsampling, then blocks), which creates the parameters in
        # the official order (blocks of stage i, then its downsampling), so a seeded init gives the same weights
        self.stages = nn.ModuleList([
            RMTStage(dims[i - 1] if i > 0 else None, dims[i], depths[i], num_heads[i], init_values[i],
                     heads_ranges[i], int(mlp_ratios[i] * dims[i]), decomposed[i], dpr[i], layerscales[i], ls_init,
                     proj_drop_rate) for i in range(n)])
        self.set_feature_info([FeatureInfo(dims[i], 4 * 2**i, f"stages.{i}") for i in range(n)])
        self.proj = nn.Conv2d(dims[-1], projection, 1)  # the official Linear at every position
        self.norm = nn.BatchNorm2d(projection)
        self.swish = nn.SiLU()
        self.init_head(projection, num_classes, drop_rate)  # average pool, dropout, Linear
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.patch_embed(x)  # (B, C, H, W) -> (B, H/4, W/4, dims[0])

    def stage_to_nchw(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)

    def forward_norm(self, x: Tensor) -> Tensor:
        """The official end of ``forward_features`` before pooling: projection, BatchNorm, Swish."""
        x = self.proj(x.permute(0, 3, 1, 2))  # (B, H, W, C) -> (B, projection, H, W)
        return self.swish(self.norm(x))

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours (idempotent); see the module docstring for the layout."""
        out = {}
        for k, v in state_dict.items():
            m = re.match(r"layers\.(\d+)\.(blocks|Relpos|downsample)\.(.*)", k)
            if m:
                i, part, rest = int(m[1]), m[2], m[3]
                if part == "downsample":  # ends stage i there, starts stage i + 1 here
                    i += 1
                k = f"stages.{i}.{part.lower()}.{rest}"
            elif k == "proj.weight" and v.ndim == 2:
                v = v[:, :, None, None]  # Linear (C', C) -> 1x1 conv (C', C, 1, 1)
            elif k in ("head.weight", "head.bias"):
                k = "head.fc." + k[len("head."):]
            out[k] = v
        return out


def _init_weights(m: nn.Module) -> None:
    init_linear(m, std=0.02)  # LayerNorms keep (1, 0); convs keep torch's default init, as the official code
    if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and not m.weight.is_meta:
        # NOTE: the projection (RMT's only 1x1 conv) is the official Linear, and is initialised as one
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


_README = "official README results table (ImageNet-1K, 224)"
_MACS = ("gmacs: the official model counted with visionzoo.profile (attention matmuls included); fvcore gives {fv}, "
         "the README {rd} G (lower; which ops its counter left out is not documented)")
_SIZES = "other multiples of 32: decay masks and rotary tables are recomputed per input size"
_S = dict(depths=(3, 4, 18, 4), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False))
_BL = dict(_S, depths=(4, 8, 25, 8), layerscales=(False, False, True, True))

# params_m: exact count of the official model (1000 classes)
VARIANTS = {
    "rmt_test":  Variant(dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                              heads_ranges=(1, 2, 4, 6), mlp_ratios=(2, 2, 2, 2),
                              layerscales=(False, False, True, True), projection=256),
                         params_m=0.582912, input_size=64),
    "rmt_tiny":  Variant(dict(), params_m=14.334216, gmacs=2.637,
                         paper=Paper(14, 2.5, 82.4, _README),
                         notes=f"official factory RMT_T3; {_MACS.format(fv=2.651, rd=2.5)}; {_SIZES}"),
    "rmt_small": Variant(_S, params_m=26.967240, gmacs=4.777,
                         paper=Paper(27, 4.5, 84.1, _README),
                         notes=f"official factory RMT_S; {_MACS.format(fv=4.80, rd=4.5)}; {_SIZES}"),
    "rmt_base":  Variant(dict(_BL, dims=(80, 160, 320, 512), num_heads=(5, 5, 10, 16), heads_ranges=(5, 5, 6, 6)),
                         params_m=54.154896, gmacs=10.373,
                         paper=Paper(54, 9.7, 85.0, _README),
                         notes=f"official factory RMT_M2; {_MACS.format(fv=10.414, rd=9.7)}; {_SIZES}"),
    "rmt_large": Variant(dict(_BL, dims=(112, 224, 448, 640), num_heads=(7, 7, 14, 20), heads_ranges=(6, 6, 6, 6)),
                         params_m=95.464864, gmacs=19.488,
                         paper=Paper(95, 18.2, 85.5, _README),
                         notes=f"official factory RMT_L6; {_MACS.format(fv=19.545, rd=18.2)}; {_SIZES}"),
}
register_family(RMT, VARIANTS, paper="arXiv:2309.11523", kind="vit", family="rmt")
