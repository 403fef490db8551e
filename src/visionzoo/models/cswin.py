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

Follows microsoft/CSWin-Transformer ``models/cswin.py`` (MIT). Its flat layout (``stage1_conv_embed``,
``stage1..4``, ``merge1..3``, ``norm``, ``head``) becomes ours, with stage modules: ``stem``, ``stages.i.downsample``
(the official ``merge{i}``), ``stages.i.blocks`` (``stage{i+1}``), ``norm``, ``head.fc``; ``CSWinTransformer.remap``
translates the released checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import AttentionCore, DropPath, LayerType, Mlp, drop_path_rates, get_norm, init_linear, trace_leaf
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["CSWinTransformer"]


def stripe_size(H: int, W: int, split_size: int, axis: int | None) -> tuple[int, int]:
    """Height and width of one stripe on an ``H x W`` map (``axis`` 0: vertical, 1: horizontal, None: the whole map)."""
    if axis is None:
        return H, W
    if axis == 0:
        return H, min(split_size, W)
    return min(split_size, H), W


@trace_leaf
def pad_to_stripes(qkv: Tensor, split_size: int, axis: int | None) -> tuple[Tensor, Tensor | None, int, int]:
    """Zero-pad ``qkv`` ``(B, H, W, 3, C)`` at the bottom / right to whole stripes; returns the padded tensor, the key
    mask ``(B * nS, 1, 1, N)`` (``False`` on padding; ``None`` when nothing was padded) and the stripe size.

    One node under FX (stripes and padding depend on the concrete size)."""
    B, H, W = qkv.shape[:3]
    sh, sw = stripe_size(H, W, split_size, axis)
    pad_h, pad_w = -H % sh, -W % sw
    if not (pad_h or pad_w):
        return qkv, None, sh, sw
    qkv = F.pad(qkv, (0, 0, 0, 0, 0, pad_w, 0, pad_h))  # -> (B, Hp, Wp, 3, C)
    Hp, Wp = H + pad_h, W + pad_w
    rows = torch.arange(Hp, device=qkv.device) < H
    cols = torch.arange(Wp, device=qkv.device) < W
    real = rows[:, None] & cols[None, :]  # (Hp, Wp); False on padding
    mask = real.view(Hp // sh, sh, Wp // sw, sw).transpose(1, 2).reshape(-1, 1, 1, sh * sw)  # keys of each stripe
    return qkv, mask.repeat(B, 1, 1, 1), sh, sw  # -> (B * nS, 1, 1, N)


class LePEAttention(nn.Module):
    """Multi-head attention inside stripes (``axis`` 0: vertical, 1: horizontal, None: the whole map), plus LePE."""

    def __init__(self, dim: int, num_heads: int, split_size: int, axis: int | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.split_size = split_size
        self.axis = axis
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.core = AttentionCore()

    def forward(self, qkv: Tensor) -> Tensor:
        """``qkv``: ``(B, H, W, 3, C)`` -> ``(B, H, W, C)``."""
        B, H, W, _, C = qkv.shape
        qkv, mask, sh, sw = pad_to_stripes(qkv, self.split_size, self.axis)  # -> (B, Hp, Wp, 3, C)
        nh, nw = qkv.shape[1] // sh, qkv.shape[2] // sw
        qkv = qkv.reshape(B, nh, sh, nw, sw, 3, C).permute(5, 0, 1, 3, 2, 4, 6)  # -> (3, B, nh, nw, sh, sw, C)
        q, k, v = qkv.reshape(3, B * nh * nw, sh * sw, C).unbind(0)  # 3 x (B * nS, N, C)
        lepe = self.get_v(v.transpose(1, 2).reshape(-1, C, sh, sw))  # (B * nS, N, C) -> (B * nS, C, sh, sw)
        lepe = lepe.flatten(2).transpose(1, 2)  # -> (B * nS, N, C)
        q, k, v = (t.reshape(-1, sh * sw, self.num_heads, C // self.num_heads).transpose(1, 2)
                   for t in (q, k, v))  # -> (B * nS, heads, N, C / heads)
        x = self.core(q, k, v, mask, grid=(sh, sw))
        x = x.transpose(1, 2).reshape(-1, sh * sw, C) + lepe  # (B * nS, heads, N, d) -> (B * nS, N, C)
        x = x.reshape(B, nh, nw, sh, sw, C).transpose(2, 3).reshape(B, nh * sh, nw * sw, C)  # -> (B, Hp, Wp, C)
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


class CSWinStage(nn.Module):
    """A merge (stages after the first; the official ``merge{i}``), then the stage's blocks, on NHWC maps."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, split_size: int, downsample: bool,
                 full_attention: bool, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 drop_path: list[float] | None = None, act_layer: LayerType = "gelu",
                 norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        self.downsample = CSWinMerge(in_dim, dim, norm_layer) if downsample else nn.Identity()
        drop_path = drop_path or [0.0] * depth
        self.blocks = nn.Sequential(*[CSWinBlock(dim, num_heads, split_size, full_attention, mlp_ratio, qkv_bias,
                                                 proj_drop, drop_path[j], act_layer, norm_layer) for j in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


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
    has_attention = True
    min_input_size = 32
    input_multiple = 32

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
        self.stem = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 7, stride=4, padding=2), CSWinToNHWC(),
                                  get_norm(norm_layer)(embed_dim))
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        self.stages = nn.ModuleList([
            CSWinStage(dims[max(i - 1, 0)], dims[i], depths[i], num_heads[i], split_size[i], i > 0, i == 3,
                       mlp_ratio, qkv_bias, proj_drop_rate, dpr[i], act_layer, norm_layer) for i in range(4)])
        self.set_feature_info([FeatureInfo(dims[i], 4 * 2**i, f"stages.{i}") for i in range(4)])
        self.norm = get_norm(norm_layer)(dims[-1])
        self.init_head(dims[-1], num_classes, drop_rate)
        self.apply(init_linear)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(x)  # (B, C, H, W) -> (B, H/4, W/4, embed_dim)

    def stage_to_nchw(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)

    def forward_norm(self, x: Tensor) -> Tensor:
        return self.norm(x).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official microsoft/CSWin-Transformer keys -> ours: ``stage1_conv_embed`` -> ``stem``, ``stage{i}`` ->
        ``stages.{i-1}.blocks``, ``merge{i}`` -> ``stages.{i}.downsample``, ``head`` -> ``head.fc``. Keys already
        in our layout pass unchanged."""
        out = {}
        for k, v in state_dict.items():
            first, _, rest = k.partition(".")
            if first == "stage1_conv_embed":
                k = f"stem.{rest}"
            elif first in ("stage1", "stage2", "stage3", "stage4"):
                k = f"stages.{int(first[-1]) - 1}.blocks.{rest}"
            elif first in ("merge1", "merge2", "merge3"):
                k = f"stages.{first[-1]}.downsample.{rest}"
            elif k in ("head.weight", "head.bias"):
                k = f"head.fc.{rest}"
            out[k] = v
        return out


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
