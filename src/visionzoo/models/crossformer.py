"""CrossFormer, from "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention" (Wang et al.,
ICLR 2022). https://arxiv.org/abs/2108.00154

Differs from the paper: none at the size a model is built for (``img_size``). Blocks alternate short-distance
attention (SDA: adjacent G x G groups) and long-distance attention (LDA: the tokens at the same position modulo an
interval I form a group). A dynamic position bias (DPB), a small MLP on each relative offset, gives the attention
bias for any group shape. The official classification code (v1) builds every stage for ``img_size`` and sets
I = H / G there (8, 4, 2 at 224 px); we fix I the same way at construction (rounded up when G does not divide H).

Other input sizes (any multiple of 32) follow the official detection / segmentation backbone of the same repository
(``models/crossformer_backbone.py``): the interval stays fixed, each block zero-pads its map at the bottom / right
to a multiple of G (SDA) or of I (LDA, whose groups then are (H_pad / I) x (W_pad / I)), masks the padded tokens
out as keys and crops them again; a map whose shorter side is at most G is one SDA group of that side.

Follows cheerss/CrossFormer (MIT) ``models/crossformer.py`` at commit f20000d (the v1 code; the repository's HEAD is
CrossFormer++). Our stage i (``stages.i``) is the merge into it (``downsample``, the official ``layers.{i-1}.
downsample`` at the end of the previous stage), then its ``blocks``; with ``patch_embed.projs``, ``norm`` and the
classifier ``head.fc``. ``CrossFormer.remap`` translates the official keys (``layers.i.blocks``,
``layers.i.downsample``, ``head``); the official checkpoints also store the DPB offset and index tables as buffers,
which we build on the fly for every group shape, so remap drops them.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    AttentionCore,
    DropPath,
    LayerType,
    Mlp,
    drop_path_rates,
    get_norm,
    init_linear,
    is_tracing,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["CrossFormer"]


def split_dims(dim: int, n: int) -> list[int]:
    """Channels of each of ``n`` cross-scale convs summing to ``dim``: dim/2, dim/4, ..., the last two equal."""
    return [dim // 2 ** (i + 1) for i in range(n - 1)] + [dim // 2 ** (n - 1)]


def relative_offsets(gh: int, gw: int, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """All relative offsets of a ``gh x gw`` group, ``((2gh-1)(2gw-1), 2)`` in ``dtype`` (the default float dtype
    when None), and the ``(N, N)`` index of each (query, key) pair's offset into them."""
    dh = torch.arange(1 - gh, gh, device=device, dtype=dtype or torch.get_default_dtype())
    dw = torch.arange(1 - gw, gw, device=device, dtype=dtype or torch.get_default_dtype())
    offsets = torch.stack(torch.meshgrid(dh, dw, indexing="ij")).flatten(1).t()  # -> (M, 2)
    coords = torch.stack(torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device),
                                        indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, 1) - (2, 1, N) -> (2, N, N)
    return offsets, (rel[0] + gh - 1) * (2 * gw - 1) + (rel[1] + gw - 1)


def group_layout(H: int, W: int, group_size: int, interval: int, long_distance: bool) -> tuple[bool, int, int, int]:
    """How an ``H x W`` map is grouped: ``(lda, size, pad_h, pad_w)``. SDA cuts ``size`` x ``size`` tiles, LDA gathers
    the tokens that agree modulo ``size`` (the interval); a map whose shorter side is at most G is one SDA group of
    that side; the map is zero-padded at the bottom / right to a multiple of ``size``."""
    lda, size = long_distance, group_size
    if min(H, W) <= size:  # one SDA group as large as the shorter side (the whole map when square)
        lda, size = False, min(H, W)
    elif lda:
        size = interval
    return lda, size, -H % size, -W % size


def group_map(x: Tensor, lda: bool, size: int) -> Tensor:
    """``(B, Hp, Wp, C)`` -> ``(B, a, b, gh, gw, C)``: SDA cuts ``size`` x ``size`` tiles (a x b of them); LDA gathers
    the tokens whose coordinates agree modulo ``size`` (a = b = size groups)."""
    B, Hp, Wp, C = x.shape
    x = x.view(B, Hp // size, size, Wp // size, size, C)
    return x.permute(0, 2, 4, 1, 3, 5) if lda else x.permute(0, 1, 3, 2, 4, 5)


# NOTE: the helpers below look at the concrete map size (grouping, padding, tables); under torch.fx each is one opaque
# node run on real values, elsewhere a plain call.
@trace_leaf
def to_groups(x: Tensor, group_size: int, interval: int, long_distance: bool) -> Tensor:
    """An NHWC map ``(B, H, W, C)`` -> its zero-padded groups ``(B * nG, gh * gw, C)``."""
    B, H, W, C = x.shape
    lda, size, pad_h, pad_w = group_layout(H, W, group_size, interval, long_distance)
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x  # -> (B, Hp, Wp, C)
    groups = group_map(x, lda, size)  # -> (B, a, b, gh, gw, C)
    return groups.reshape(-1, groups.shape[3] * groups.shape[4], C)  # -> (B * nG, N, C)


@trace_leaf
def from_groups(groups: Tensor, x: Tensor, group_size: int, interval: int, long_distance: bool) -> Tensor:
    """Groups ``(B * nG, N, C)`` made by ``to_groups`` from the map ``x`` -> an NHWC map of ``x``'s size (cropped)."""
    B, H, W, C = x.shape
    lda, size, pad_h, pad_w = group_layout(H, W, group_size, interval, long_distance)
    Hp, Wp = H + pad_h, W + pad_w
    gh, gw = (Hp // size, Wp // size) if lda else (size, size)
    out = groups.view(B, Hp // gh, Wp // gw, gh, gw, C)
    perm = (0, 3, 1, 4, 2, 5) if lda else (0, 1, 3, 2, 4, 5)  # back to (B, Hp / .., .., Wp / .., .., C)
    out = out.permute(perm).reshape(B, Hp, Wp, C)
    return out[:, :H, :W] if pad_h or pad_w else out


@trace_leaf
def group_tables(x: Tensor, group_size: int, interval: int, long_distance: bool
                 ) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """For the map ``x``: the group's relative offsets ``(M, 2)`` in ``x``'s dtype and device, the ``(N * N,)``
    index of each (query, key) pair into them, and the group shape ``(gh, gw)``."""
    _, H, W, _ = x.shape
    lda, size, pad_h, pad_w = group_layout(H, W, group_size, interval, long_distance)
    gh, gw = ((H + pad_h) // size, (W + pad_w) // size) if lda else (size, size)
    offsets, index = relative_offsets(gh, gw, device=x.device, dtype=x.dtype)
    return offsets, index.view(-1), (gh, gw)


@trace_leaf
def add_padding_mask(bias: Tensor, x: Tensor, group_size: int, interval: int, long_distance: bool) -> Tensor:
    """The attention bias ``(1, heads, N, N)`` as it is when the map ``x`` needs no padding; otherwise with the padded
    keys masked out, per group: ``(B * nG, heads, N, N)``."""
    B, H, W, _ = x.shape
    lda, size, pad_h, pad_w = group_layout(H, W, group_size, interval, long_distance)
    if not (pad_h or pad_w):
        return bias
    real = F.pad(x.new_zeros(1, H, W, 1), (0, 0, 0, pad_w, 0, pad_h), value=1.0)  # 1 on padding
    groups = group_map(real, lda, size)  # -> (1, a, b, gh, gw, 1)
    nG, N = groups.shape[1] * groups.shape[2], groups.shape[3] * groups.shape[4]
    mask = groups.reshape(nG, N) * torch.finfo(bias.dtype).min  # -> (nG, N)
    bias = bias + mask[:, None, None, :]  # -> (nG, heads, N, N)
    return bias.expand(B, -1, -1, -1, -1).reshape(B * nG, -1, N, N)  # -> (B * nG, heads, N, N)


class DynamicPosBias(nn.Module):
    """MLP from a relative offset (dy, dx) to one attention bias per head: Linear, 2 x (LN, ReLU, Linear), LN, ReLU,
    Linear."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.pos_dim = dim // 4
        self.pos_proj = nn.Linear(2, self.pos_dim)
        self.pos1 = self._layer(self.pos_dim)
        self.pos2 = self._layer(self.pos_dim)
        self.pos3 = self._layer(num_heads)

    def _layer(self, out_dim: int) -> nn.Sequential:
        return nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(), nn.Linear(self.pos_dim, out_dim))

    def forward(self, offsets: Tensor) -> Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))  # (M, 2) -> (M, heads)


class CrossFormerAttention(nn.Module):
    """Multi-head self-attention inside groups, with the dynamic position bias as the additive bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.pos = DynamicPosBias(dim // 4, num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.core = AttentionCore()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self, offsets: Tensor, index: Tensor, N: int) -> Tensor:
        """The DPB of every (query, key) pair of a group of ``N`` tokens: ``(1, heads, N, N)``."""
        bias = self.pos(offsets)[index].view(N, N, -1)  # (M, heads) -> (N, N, heads)
        return bias.permute(2, 0, 1).unsqueeze(0)  # -> (1, heads, N, N)

    def forward(self, x: Tensor, bias: Tensor, group: tuple[int, int] | None = None) -> Tensor:
        """``x``: ``(B * nG, N, C)`` groups of shape ``group``; ``bias``: broadcastable to ``(B * nG, heads, N, N)``."""
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B', N, 3, h, d) -> 3 x (B', h, N, d)
        drop = self.attn_drop if self.training else 0.0
        x = self.core(q, k, v, bias.to(q.dtype), dropout_p=drop, grid=group).transpose(1, 2)  # -> (B', N, h, d)
        x = x.reshape(B_, N, C)  # (B', N, h, d) -> (B', N, C)
        return self.proj_drop(self.proj(x))


class CrossFormerBlock(nn.Module):
    """Pre-norm block on an NHWC map: SDA or LDA group attention, then an MLP, each residual."""

    def __init__(self, dim: int, num_heads: int, group_size: int, interval: int, long_distance: bool,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: LayerType = "gelu", norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        self.group_size = group_size
        self.interval = interval
        self.long_distance = long_distance
        norm = get_norm(norm_layer)
        self.norm1 = norm(dim)
        self.attn = CrossFormerAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)

    def group_attention(self, x: Tensor) -> Tensor:
        """Attention inside the (zero-padded) groups of the NHWC map ``x``; padded keys are masked out, padded
        queries cropped."""
        layout = (self.group_size, self.interval, self.long_distance)
        if not is_tracing():  # where recorded maps sit on the image (visionzoo.explain); LDA groups are dilated
            self.attn.core.partition = "grid" if group_layout(x.shape[1], x.shape[2], *layout)[0] else "block"
        groups = to_groups(x, *layout)  # (B, H, W, C) -> (B * nG, N, C)
        offsets, index, group = group_tables(x, *layout)
        bias = add_padding_mask(self.attn.position_bias(offsets, index, groups.shape[1]), x, *layout)
        return from_groups(self.attn(groups, bias, group), x, *layout)  # -> (B, H, W, C)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.group_attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def cross_scale_convs(in_dim: int, out_dim: int, kernels: tuple[int, ...], stride: int) -> nn.ModuleList:
    """Convs of several (even) kernel sizes and one stride whose outputs, concatenated, have ``out_dim`` channels."""
    return nn.ModuleList([nn.Conv2d(in_dim, d, k, stride=stride, padding=(k - stride) // 2)
                          for k, d in zip(kernels, split_dims(out_dim, len(kernels)), strict=True)])


class CrossFormerPatchEmbed(nn.Module):
    """Cross-scale embedding of the image: the convs' outputs concatenated along channels, then LayerNorm."""

    def __init__(self, in_chans: int, dim: int, kernels: tuple[int, ...], norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        self.projs = cross_scale_convs(in_chans, dim, kernels, kernels[0])
        self.norm = get_norm(norm_layer)(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([proj(x) for proj in self.projs], dim=1)  # (B, C, H, W) -> (B, dim, H/s, W/s)
        return self.norm(x.permute(0, 2, 3, 1))  # -> (B, H/s, W/s, dim)


class CrossFormerMerge(nn.Module):
    """Cross-scale patch merging on an NHWC map: LayerNorm, then stride-2 convs concatenated to twice the width."""

    def __init__(self, dim: int, kernels: tuple[int, ...], norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        self.norm = get_norm(norm_layer)(dim)
        self.reductions = cross_scale_convs(dim, 2 * dim, kernels, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        return torch.cat([conv(x) for conv in self.reductions], dim=1).permute(0, 2, 3, 1)  # -> (B, H/2, W/2, 2C)


class CrossFormerStage(nn.Module):
    """The cross-scale merge of the previous stage's map (none in the first stage), then alternating SDA / LDA
    blocks; NHWC in and out."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, group_size: int, interval: int,
                 merge_size: tuple[int, ...] | None = None, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, drop_path: list[float] | None = None,
                 act_layer: LayerType = "gelu", norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        drop_path = drop_path or [0.0] * depth
        self.downsample = CrossFormerMerge(in_dim, merge_size, norm_layer) if merge_size else None
        self.blocks = nn.ModuleList([
            CrossFormerBlock(dim, num_heads, group_size, interval, j % 2 == 1, mlp_ratio, qkv_bias, attn_drop,
                             proj_drop, drop_path[j], act_layer, norm_layer) for j in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)  # (B, H, W, C) -> (B, H/2, W/2, 2C)
        for block in self.blocks:
            x = block(x)
        return x


class CrossFormer(Backbone):
    """CrossFormer: a cross-scale patch embedding, then four stages of alternating SDA / LDA blocks.

    Args:
        img_size: the input size the LDA intervals are fixed for (I = ceil(H / G) there); other multiples of 32
            work by padding, as the official detection backbone.
        patch_size: kernel sizes of the cross-scale patch embedding (stride = the first one).
        merge_size: kernel sizes of the cross-scale patch merging before stages 1..3 (stride 2).
        group_size: the group side G per stage.
        proj_drop_rate: dropout in attention projections and MLPs (the official ``drop_rate``); ``drop_rate`` is
            the head dropout.
        norm_layer: LayerNorm with the torch default eps 1e-5, as the official code.
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    takes_patch_size = True
    min_input_size = 32
    input_multiple = 32
    first_conv = "patch_embed.projs.0"  # the smallest of the cross-scale kernels; the others are adapted too

    def __init__(self, img_size: int = 224, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
                 num_heads: tuple[int, ...] = (3, 6, 12, 24), group_size: tuple[int, ...] = (7, 7, 7, 7),
                 patch_size: tuple[int, ...] = (4, 8, 16, 32),
                 merge_size: tuple[tuple[int, ...], ...] = ((2, 4), (2, 4), (2, 4)), mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, *, in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 act_layer: LayerType = "gelu", norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        n = len(depths)
        if len(num_heads) != n or len(group_size) != n or len(merge_size) != n - 1:
            raise ValueError(f"crossformer: depths {tuple(depths)}, num_heads {tuple(num_heads)} and group_size "
                             f"{tuple(group_size)} need one entry per stage and merge_size one per stage after the "
                             f"first, got {len(merge_size)}")
        dims = [embed_dim * 2**i for i in range(n)]
        for d, h in zip(dims, num_heads, strict=True):
            if d % h or d < 16:
                raise ValueError(f"crossformer: stage width {d} must be >= 16 (the position-bias MLP has d/16 "
                                 f"channels) and divisible by its num_heads {h}")
        for k in (*patch_size, *(k for m in merge_size for k in m)):
            if k % 2:
                raise ValueError(f"crossformer: kernel sizes must be even (padding (k - stride) / 2), got {k} in "
                                 f"patch_size={tuple(patch_size)} / merge_size={tuple(merge_size)}")
        stride = patch_size[0]
        self.in_chans = in_chans
        self.min_input_size = self.input_multiple = stride * 2 ** (n - 1)
        self.patch_embed = CrossFormerPatchEmbed(in_chans, embed_dim, tuple(patch_size), norm_layer)
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        self.stages = nn.ModuleList()
        infos = []
        for i in range(n):
            resolution = img_size // (stride * 2**i)
            interval = max(1, math.ceil(resolution / group_size[i]))
            # NOTE: stage i builds its merge before its blocks: the order (and so the seeded init) of the official
            # code, which builds that merge at the end of stage i - 1
            self.stages.append(CrossFormerStage(
                dims[i - 1] if i else embed_dim, dims[i], depths[i], num_heads[i], group_size[i], interval,
                tuple(merge_size[i - 1]) if i else None, mlp_ratio, qkv_bias, attn_drop_rate, proj_drop_rate, dpr[i],
                act_layer, norm_layer))
            infos.append(FeatureInfo(dims[i], stride * 2**i, f"stages.{i}"))
        self.set_feature_info(infos)
        self.norm = get_norm(norm_layer)(dims[-1])
        self.init_head(dims[-1], num_classes, drop_rate)
        self.apply(init_linear)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.patch_embed(x)  # (B, C, H, W) -> (B, H/4, W/4, embed_dim)

    def stage_to_nchw(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)

    def forward_norm(self, x: Tensor) -> Tensor:
        return self.norm(x).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official v1 keys (the pre-seams visionzoo layout too) -> ours; our own keys pass unchanged.

        ``layers.{i}.blocks.*`` -> ``stages.{i}.blocks.*``; ``layers.{i}.downsample.*`` (the merge at the end of
        stage i) -> ``stages.{i+1}.downsample.*``; ``head.{weight,bias}`` -> ``head.fc.*``; the persistent DPB tables
        (``attn.biases``, ``attn.relative_position_index``), which we rebuild for every group shape, are dropped.
        """
        out = {}
        for k, v in state_dict.items():
            if k.endswith((".attn.biases", ".relative_position_index")):
                continue
            k = re.sub(r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks.", k)
            k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.", k)
            out[re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)] = v
        return out


_README = "official README ImageNet-1K table (v1)"
_SIZES = "other multiples of 32: groups zero-padded, padding masked (the official detection backbone)"
_CODE = "params_m and gmacs are the v1 code's (fvcore; equal to the README's rounded figures)"

# params_m: exact count of the official v1 model (commit f20000d, configs/*_patch4_group7_224.yaml) with 1000 classes;
# gmacs: fvcore on the same code at 224 (refs_vits.json). crop_pct 0.875: the v1 eval resizes to 256/224 x img_size.
VARIANTS = {
    "crossformer_test":  Variant(dict(embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 4, 8)),
                                 params_m=0.526814, input_size=64,
                                 notes="tiny test config; at 64 px stages 0-1 pad their 16x16 / 8x8 maps (G = 7)"),
    "crossformer_tiny":  Variant(dict(embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16)),
                                 params_m=27.776794, gmacs=2.87, paper=Paper(27.8, 2.9, 81.5, _README),
                                 notes=f"official cros_tiny_patch4_group7_224; {_CODE}; {_SIZES}"),
    "crossformer_small": Variant(dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
                                 params_m=30.657394, gmacs=4.925, paper=Paper(30.7, 4.9, 82.5, _README),
                                 notes=f"official small_patch4_group7_224; {_CODE}; {_SIZES}"),
    "crossformer_base":  Variant(dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
                                 params_m=51.971554, gmacs=9.188, paper=Paper(52.0, 9.2, 83.4, _README),
                                 notes=f"official cros_base_patch4_group7_224; {_CODE}; {_SIZES}"),
    "crossformer_large": Variant(dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
                                 params_m=91.971184, gmacs=16.146, paper=Paper(92.0, 16.1, 84.0, _README),
                                 notes=f"official large_patch4_group7_224; {_CODE}; {_SIZES}"),
}
register_family(CrossFormer, VARIANTS, paper="arXiv:2108.00154", kind="vit", family="crossformer")
