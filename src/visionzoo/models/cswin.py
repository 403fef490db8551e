"""CSWin Transformer, from "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows"
(Dong et al., CVPR 2022). https://arxiv.org/abs/2107.00652

Differs from the paper: none at 224 px. Parameter counts are those of the official code (CSWin-T builds 22.32 M;
the README rounds it to 23 M), recorded next to the paper's figures in the variant table.

Other input sizes (any multiple of 32) work without any size fixed at construction; the official code fixes each
stage's map at build time. Stages 1-3 split the heads (and channels) in two halves: one attends within vertical
stripes (full height, ``split_size`` wide), the other within horizontal stripes. A side that is not a multiple of
the stripe width is zero-padded at the bottom / right; the padded tokens are masked out as keys and are zeros for
the LePE convolution, so this is exactly attention in a narrower last stripe (padding, not an adapted split size).
A side shorter than the stripe width gives one stripe as wide as the map (the official code turns such a stage into
full attention, which computes the same thing). Stage 4 always attends over the whole map, as the official
``last_stage``. LePE is a depthwise 3x3 convolution of V inside each stripe, added to the attention output.

Follows microsoft/CSWin-Transformer ``models/cswin.py`` (MIT) and keeps its state-dict keys (``stage1_conv_embed``,
``stage1..4``, ``merge1..3``, ``norm``, ``head``), so the released checkpoints load as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import DropPath, LayerType, Mlp, drop_path_rates, get_norm, init_linear
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["CSWinTransformer"]


class LePEAttention(nn.Module):
    """Multi-head attention inside stripes (``axis`` 0: vertical, 1: horizontal, None: the whole map), plus LePE."""

    def __init__(self, dim: int, num_heads: int, split_size: int, axis: int | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.split_size = split_size
        self.axis = axis
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def stripe(self, H: int, W: int) -> tuple[int, int]:
        """Height and width of one stripe on an ``H x W`` map."""
        if self.axis is None:
            return H, W
        if self.axis == 0:
            return H, min(self.split_size, W)
        return min(self.split_size, H), W

    def forward(self, qkv: Tensor) -> Tensor:
        """``qkv``: ``(B, H, W, 3, C)`` -> ``(B, H, W, C)``."""
        B, H, W, _, C = qkv.shape
        sh, sw = self.stripe(H, W)
        pad_h, pad_w = -H % sh, -W % sw
        if pad_h or pad_w:
            qkv = F.pad(qkv, (0, 0, 0, 0, 0, pad_w, 0, pad_h))  # -> (B, Hp, Wp, 3, C)
        nh, nw = (H + pad_h) // sh, (W + pad_w) // sw
        qkv = qkv.view(B, nh, sh, nw, sw, 3, C).permute(5, 0, 1, 3, 2, 4, 6)  # -> (3, B, nh, nw, sh, sw, C)
        q, k, v = qkv.reshape(3, B * nh * nw, sh * sw, C).unbind(0)  # 3 x (B * nS, N, C)
        lepe = self.get_v(v.transpose(1, 2).reshape(-1, C, sh, sw))  # (B * nS, N, C) -> (B * nS, C, sh, sw)
        lepe = lepe.flatten(2).transpose(1, 2)  # -> (B * nS, N, C)
        q, k, v = (t.view(-1, sh * sw, self.num_heads, C // self.num_heads).transpose(1, 2)
                   for t in (q, k, v))  # -> (B * nS, heads, N, C / heads)
        mask = None
        if pad_h or pad_w:
            real = torch.ones(H, W, dtype=torch.bool, device=qkv.device)
            real = F.pad(real, (0, pad_w, 0, pad_h))  # (H, W) -> (Hp, Wp); False on padding
            mask = real.view(nh, sh, nw, sw).transpose(1, 2).reshape(nh * nw, 1, 1, sh * sw)  # keys of each stripe
            mask = mask.repeat(B, 1, 1, 1)  # -> (B * nS, 1, 1, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x.transpose(1, 2).reshape(-1, sh * sw, C) + lepe  # (B * nS, heads, N, d) -> (B * nS, N, C)
        x = x.view(B, nh, nw, sh, sw, C).transpose(2, 3).reshape(B, nh * sh, nw * sw, C)  # -> (B, Hp, Wp, C)
        return x[:, :H, :W]


class CSWinBlock(nn.Module):
    """Pre-norm block on an NHWC map: cross-shaped window attention (or full attention), then an MLP."""

    def __init__(self, dim: int, num_heads: int, split_size: int, full_attention: bool, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, drop_path: float = 0.0, act_layer: LayerType = "gelu",
                 norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        norm = get_norm(norm_layer)
        self.norm1 = norm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if full_attention:
            self.attns = nn.ModuleList([LePEAttention(dim, num_heads, split_size, None)])
        else:
            self.attns = nn.ModuleList([LePEAttention(dim // 2, num_heads // 2, split_size, axis) for axis in (0, 1)])
        self.proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, H, W, 3, C)  # (B, H, W, 3C) -> (B, H, W, 3, C)
        if len(self.attns) == 1:
            attn = self.attns[0](qkv)
        else:  # the first half of the channels (and heads) in vertical stripes, the second in horizontal ones
            half = C // 2
            attn = torch.cat([self.attns[0](qkv[..., :half]), self.attns[1](qkv[..., half:])], dim=-1)
        x = x + self.drop_path(self.proj(attn))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CSWinMerge(nn.Module):
    """3x3 stride-2 convolution then LayerNorm, on NHWC maps: halves H and W."""

    def __init__(self, dim: int, out_dim: int, norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = get_norm(norm_layer)(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x.permute(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W) -> (B, C', H/2, W/2)
        return self.norm(x.permute(0, 2, 3, 1))  # -> (B, H/2, W/2, C')


class CSWinToNHWC(nn.Module):
    """Permute an NCHW map to NHWC (sits between the stem conv and its LayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)


class CSWinTransformer(Backbone):
    """CSWin Transformer: a 7x7 stride-4 conv stem, then four stages of cross-shaped window attention.

    Args:
        embed_dim: channels of the first stage; each later stage doubles them.
        num_heads: heads per stage; stages 1-3 give half of them to each stripe direction, so they must be even.
        split_size: stripe width per stage (the last stage always attends over the whole map).
        proj_drop_rate: dropout inside the MLPs (the official ``drop_rate``); ``drop_rate`` is the head dropout.
        norm_layer: LayerNorm with the torch default eps 1e-5, as the official code.
    """

    kind = "vit"
    min_input_size = 32
    input_multiple = 32
    first_conv = "stage1_conv_embed.0"
    classifier = "head"

    def __init__(self, embed_dim: int = 64, depths: tuple[int, ...] = (1, 2, 21, 1),
                 num_heads: tuple[int, ...] = (2, 4, 8, 16), split_size: tuple[int, ...] = (1, 2, 7, 7),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 act_layer: LayerType = "gelu", norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        for arg, val in (("depths", depths), ("num_heads", num_heads), ("split_size", split_size)):
            if len(val) != 4:
                raise ValueError(f"cswin: {arg} needs one entry per stage (4), got {tuple(val)}")
        dims = [embed_dim * 2**i for i in range(4)]
        for i, (d, h) in enumerate(zip(dims, num_heads, strict=True)):
            if i < 3 and (h % 2 or d % h):
                raise ValueError(f"cswin: stage {i + 1} splits its heads over two stripe directions, so num_heads "
                                 f"must be even and divide the width {d}; got num_heads={tuple(num_heads)}")
            if d % h:
                raise ValueError(f"cswin: stage width {d} is not divisible by num_heads {h}")
        if min(split_size) < 1:
            raise ValueError(f"cswin: split_size entries must be >= 1, got {tuple(split_size)}")
        self.in_chans = in_chans
        self.stage1_conv_embed = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 7, stride=4, padding=2), CSWinToNHWC(),
                                               get_norm(norm_layer)(embed_dim))
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        infos = []
        for i in range(4):
            if i > 0:
                self.add_module(f"merge{i}", CSWinMerge(dims[i - 1], dims[i], norm_layer))
            blocks = [CSWinBlock(dims[i], num_heads[i], split_size[i], i == 3, mlp_ratio, qkv_bias, proj_drop_rate,
                                 dpr[i][j], act_layer, norm_layer) for j in range(depths[i])]
            self.add_module(f"stage{i + 1}", nn.ModuleList(blocks))
            infos.append(FeatureInfo(dims[i], 4 * 2**i, f"stage{i + 1}"))
        self.set_feature_info(infos)
        self.norm = get_norm(norm_layer)(dims[-1])
        self.init_linear_head(dims[-1], num_classes, drop_rate)
        self.apply(init_linear)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stage1_conv_embed(x)  # (B, C, H, W) -> (B, H/4, W/4, embed_dim)

    def stage_modules(self) -> list[nn.Module]:
        # NOTE: views built per call, so the official keys (merge_i beside stage_i+1) stay as they are
        stages = [nn.Sequential(*self.stage1)]
        stages += [nn.Sequential(getattr(self, f"merge{i}"), *getattr(self, f"stage{i + 1}")) for i in (1, 2, 3)]
        return stages

    def stage_to_nchw(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)

    def forward_norm(self, x: Tensor) -> Tensor:
        return self.norm(x).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


_README = "official README table"
_SIZES = "other multiples of 32: stripes zero-padded at the bottom/right with the padding masked out (no resizing)"
_CODE = "params_m and gmacs are the official code's (fvcore counts the same ops)"

# params_m: exact count of the official model file (CSWin_<dim>_<depths>_<size>_224 factories) with 1000 classes;
# gmacs: fvcore on the official code at 224 (refs_vits.json), which counts the attention matmuls as we do.
VARIANTS = {
    "cswin_test":  Variant(dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8), split_size=(1, 2, 3, 7)),
                           params_m=0.495736, input_size=64, crop_pct=0.9,
                           notes="tiny test config; split 3 in stage 3 pads its 4x4 map to two stripes"),
    "cswin_tiny":  Variant(dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16)),
                           params_m=22.320552, gmacs=4.341, crop_pct=0.9,
                           paper=Paper(23, 4.3, 82.8, f"{_README} (ImageNet-1K)"),
                           notes=f"official CSWin_64_12211_tiny_224; the code builds 22.32 M, the README says 23 M; "
                                 f"{_CODE}; {_SIZES}"),
    "cswin_small": Variant(dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16)),
                           params_m=34.643304, gmacs=6.827, crop_pct=0.9,
                           paper=Paper(35, 6.9, 83.6, f"{_README} (ImageNet-1K)"),
                           notes=f"official CSWin_64_24322_small_224; {_CODE}; {_SIZES}"),
    "cswin_base":  Variant(dict(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32)),
                           params_m=77.382184, gmacs=14.995, crop_pct=0.9,
                           paper=Paper(78, 15.0, 84.2, f"{_README} (ImageNet-1K; 85.5 at 384 with split 12)"),
                           notes=f"official CSWin_96_24322_base_224; {_CODE}; {_SIZES}"),
    "cswin_large": Variant(dict(embed_dim=144, depths=(2, 4, 32, 2), num_heads=(6, 12, 24, 24)),
                           params_m=173.262664, gmacs=33.19, crop_pct=0.9,
                           paper=Paper(173, 31.5, 86.5, f"{_README} (ImageNet-22K -> 1K)"),
                           notes=f"official CSWin_144_24322_large_224 (last stage 24 heads, not 48); the README's "
                                 f"31.5 G is below what the code computes (33.19 G by fvcore, ours the same); "
                                 f"{_SIZES}"),
}
register_family(CSWinTransformer, VARIANTS, paper="arXiv:2107.00652", kind="vit", family="cswin")
