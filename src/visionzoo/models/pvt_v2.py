"""PVT v2, from "PVT v2: Improved Baselines with Pyramid Vision Transformer" (Wang et al., 2022).
https://arxiv.org/abs/2106.13797

Differs from the paper: none. Overlapping patch embeddings (7x7 stride 4, then 3x3 stride 2), spatial-reduction
attention (a strided conv, or the linear SRA of ``pvt_v2_b2_li``: average pool to 7x7, 1x1 conv, LN, GELU), and a
convolutional feed-forward (fc1, 3x3 depthwise conv, GELU, fc2); a LayerNorm ends every stage; the head averages
the last map.

Input sizes: there is no position table, so no resampling: any input whose sides are multiples of 32 runs as is
(the convolutions pad, the spatial reduction strides over maps whose sides it divides; the linear SRA pools to 7x7
whatever the size).

Follows timm's ``pvt_v2.py`` (Apache-2.0), whose state-dict keys we keep except the classifier (``head.fc``, the
library's one head, where timm has ``head``). Checkpoints of timm and of the official code (whai362/PVT, v2 branch,
``classification/pvt_v2.py``, Apache-2.0), which names its modules ``patch_embed{1..4}``, ``block{1..4}``,
``norm{1..4}`` and ``mlp.dwconv.dwconv``, load through ``PyramidVisionTransformerV2.remap``.
"""
from __future__ import annotations

import math
import re

from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    DropPath,
    LayerType,
    SpatialReductionAttention,
    drop_path_rates,
    get_act,
    get_norm,
    init_linear,
    is_meta,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["PyramidVisionTransformerV2"]


class PVTv2PatchEmbed(nn.Module):
    """Overlapping patch embedding: a conv with padding ``kernel // 2``, then LayerNorm; NCHW in, NHWC out."""

    def __init__(self, kernel_size: int, stride: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(embed_dim)  # NOTE: torch's eps 1e-5 here, as the official code and timm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, C, H, W) -> (B, H', W', C')


class PVTv2Mlp(nn.Module):
    """fc1, (ReLU for linear SRA), 3x3 depthwise conv on the token map, GELU, fc2."""

    def __init__(self, dim: int, hidden: int, act_layer: LayerType = "gelu", drop: float = 0.0,
                 extra_relu: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.relu = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = get_act(act_layer)()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.relu(self.fc1(x))
        B, N, C = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(B, C, *size))  # (B, N, C) -> (B, C, H, W)
        x = self.drop(self.act(x.flatten(2).transpose(1, 2)))  # (B, C, H, W) -> (B, N, C)
        return self.drop(self.fc2(x))


class PVTv2Block(nn.Module):
    """Pre-norm block on tokens: x + SRA(norm1(x)), then x + ConvMLP(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, linear: bool = False,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: LayerType = "gelu", norm_layer: LayerType = "ln") -> None:
        super().__init__()
        norm = get_norm(norm_layer)
        self.norm1 = norm(dim)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, linear, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = PVTv2Mlp(dim, int(dim * mlp_ratio), act_layer, proj_drop, extra_relu=linear)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), size))
        return x + self.drop_path2(self.mlp(self.norm2(x), size))


class PVTv2Stage(nn.Module):
    """Optional 3x3 stride-2 patch embedding (NCHW in), blocks, LayerNorm; NCHW out.

    The first stage has no embedding of its own: it takes the stem's NHWC output, as in timm.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, num_heads: int, mlp_ratio: float,
                 sr_ratio: int, linear: bool = False, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, drop_path: list[float] | None = None, act_layer: LayerType = "gelu",
                 norm_layer: LayerType = "ln") -> None:
        super().__init__()
        self.downsample = PVTv2PatchEmbed(3, 2, in_dim, dim) if downsample else None
        drop_path = drop_path or [0.0] * depth
        self.blocks = nn.ModuleList([
            PVTv2Block(dim, num_heads, mlp_ratio, sr_ratio, linear, qkv_bias, attn_drop, proj_drop, drop_path[i],
                       act_layer, norm_layer) for i in range(depth)])
        self.norm = get_norm(norm_layer)(dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)  # (B, C, H, W) -> (B, H', W', C')
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)  # (B, H, W, C) -> (B, N, C)
        for block in self.blocks:
            x = block(x, (H, W))
        return self.norm(x).transpose(1, 2).reshape(B, C, H, W)  # (B, N, C) -> (B, C, H, W)


class PyramidVisionTransformerV2(Backbone):
    """PVT v2: overlapping patch embeddings, spatial-reduction attention and conv feed-forwards in four stages.

    Args:
        linear: linear SRA (pool to 7x7 before the keys and values) and a ReLU in the feed-forward: ``b2_li``.
        norm_layer: the blocks' and stages' norm (LayerNorm eps 1e-6); patch embeddings and reductions keep
            torch's LayerNorm (eps 1e-5), as the official code and timm.
    """

    kind = "vit"
    has_attention = True
    min_input_size = 32
    input_multiple = 32
    first_conv = "patch_embed.proj"

    def __init__(self, embed_dims: tuple[int, ...] = (64, 128, 320, 512), depths: tuple[int, ...] = (3, 4, 6, 3),
                 num_heads: tuple[int, ...] = (1, 2, 5, 8), mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
                 sr_ratios: tuple[int, ...] = (8, 4, 2, 1), linear: bool = False, qkv_bias: bool = True, *,
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0, act_layer: LayerType = "gelu",
                 norm_layer: LayerType = "ln") -> None:
        super().__init__()
        n = len(depths)
        if not len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(sr_ratios) == n:
            raise ValueError(f"pvt_v2: embed_dims {tuple(embed_dims)}, depths {tuple(depths)}, num_heads "
                             f"{tuple(num_heads)}, mlp_ratios {tuple(mlp_ratios)} and sr_ratios {tuple(sr_ratios)} "
                             f"need one entry per stage")
        self.in_chans = in_chans
        self.min_input_size = self.input_multiple = 4 * 2 ** (n - 1)
        self.patch_embed = PVTv2PatchEmbed(7, 4, in_chans, embed_dims[0])
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        stages, infos, in_dim = [], [], embed_dims[0]
        for i, dim in enumerate(embed_dims):
            stages.append(PVTv2Stage(in_dim, dim, depths[i], i > 0, num_heads[i], mlp_ratios[i], sr_ratios[i], linear,
                                     qkv_bias, attn_drop_rate, proj_drop_rate, dpr[i], act_layer, norm_layer))
            infos.append(FeatureInfo(dim, 4 * 2**i, f"stages.{i}"))
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.set_feature_info(infos)
        self.init_head(embed_dims[-1], num_classes, drop_rate)
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.patch_embed(x)  # (B, C, H, W) -> (B, H/4, W/4, embed_dims[0])

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official whai362/PVT and timm keys -> ours: the official per-stage prefixes move under ``stages.i`` (timm's
        layout), and the classifier ``head.*`` (both layouts) becomes ``head.fc.*``. Our own keys pass unchanged."""
        out = {}
        for k, v in state_dict.items():
            k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
            k = re.sub(r"^patch_embed1\.", "patch_embed.", k)
            k = re.sub(r"^patch_embed(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.downsample.", k)
            k = re.sub(r"^block(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.", k)
            k = re.sub(r"^norm(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.norm.", k)
            out[k.replace("mlp.dwconv.dwconv.", "mlp.dwconv.")] = v
        return out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d) and not is_meta(m):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
        nn.init.zeros_(m.bias)
    init_linear(m, std=0.02)


_README = "official classification/README.md, PVTv2 table (params, top-1)"
_GF = "GFLOPs: the paper's, via a third-party compilation (refs_vits), matched by timm's GMACs"
_NOTES = ("timm weights: .in1k (official releases v2 pvt_v2_*.pth load through remap); gmacs: timm's count at 224, "
          "= fvcore on the official model; any multiple of 32 runs as is (no position table)")

# params_m: exact count of timm's (and of the official) model with 1000 classes.
VARIANTS = {
    "pvt_v2_test":  Variant(dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                                 mlp_ratios=(2, 2, 2, 2)), params_m=0.222904, input_size=64, crop_pct=0.9),
    "pvt_v2_b0":    Variant(dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)), params_m=3.666760, gmacs=0.572,
                            paper=Paper(3.7, 0.6, 70.5, f"{_README}; {_GF}"), crop_pct=0.9, notes=_NOTES),
    "pvt_v2_b1":    Variant(dict(depths=(2, 2, 2, 2)), params_m=14.009000, gmacs=2.12,
                            paper=Paper(14.0, 2.1, 78.7, f"{_README}; {_GF}"), crop_pct=0.9, notes=_NOTES),
    "pvt_v2_b2":    Variant(dict(depths=(3, 4, 6, 3)), params_m=25.362856, gmacs=4.046,
                            paper=Paper(25.4, 4.0, 82.0, f"{_README}; {_GF}"), crop_pct=0.9, notes=_NOTES),
    "pvt_v2_b2_li": Variant(dict(depths=(3, 4, 6, 3), linear=True), params_m=22.553512, gmacs=3.91,
                            paper=Paper(22.6, 3.9, 82.1, f"{_README}; {_GF}"), crop_pct=0.9, notes=_NOTES),
    "pvt_v2_b3":    Variant(dict(depths=(3, 4, 18, 3)), params_m=45.238696, gmacs=6.925,
                            paper=Paper(45.2, 6.9, 83.1, f"{_README}; {_GF}"), crop_pct=0.9, notes=_NOTES),
    "pvt_v2_b4":    Variant(dict(depths=(3, 8, 27, 3)), params_m=62.556072, gmacs=10.139,
                            paper=Paper(62.6, 10.1, 83.6, f"{_README}; {_GF}"), crop_pct=0.9, notes=_NOTES),
    "pvt_v2_b5":    Variant(dict(depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)), params_m=81.956008, gmacs=11.762,
                            paper=Paper(82.0, 11.8, 83.8, f"{_README}; {_GF}"), crop_pct=0.9, notes=_NOTES),
}
register_family(PyramidVisionTransformerV2, VARIANTS, paper="arXiv:2106.13797", kind="vit", family="pvt_v2")
