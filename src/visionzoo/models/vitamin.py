"""ViTamin, from "ViTamin: Designing Scalable Vision Models in the Vision-language Era" (Chen et al., CVPR 2024).
https://arxiv.org/abs/2404.02132

A convolutional stem (two stages of pre-norm MBConv blocks, stride 8), a strided 3x3 conv to stride 16, then a
plain ViT without class token whose MLPs are GeGLU (``w2(gelu(w0(x)) * w1(x))`` after a LayerNorm of their own),
average pooling and a LayerNorm (timm's ``fc_norm``) before the classifier.

What the numbers mean: ViTamin is a CLIP image tower. The official models are trained contrastively on DataComp-1B
and every accuracy the paper and the official README report is ImageNet **zero-shot** top-1 of the CLIP model
(image tower plus a text tower), not supervised ImageNet-1k training; their parameter and MAC counts are the image
tower's (with its CLIP projection). Here the towers carry an ImageNet classifier (1000 classes) as timm builds them;
no supervised ImageNet result exists for them.

Differs from the paper: none in the image tower. Inputs of another size than the model was built for get a bicubic
resample of the position table (timm's ViTamin has a fixed input size). ``vitamin_large2_*`` (timm) are the same
architecture as ``vitamin_large_*`` with other CLIP weights (a larger text tower), so they are not registered twice.

Follows timm's ``vitamin.py`` (Apache-2.0; ported from the official Beckschen/ViTamin), whose state-dict keys we
keep except for the head: ours is ``head.fc`` and ``head.norm`` where timm has ``head`` and ``fc_norm``;
``ViTamin.remap`` translates them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, resolve_indices
from visionzoo.layers import (
    DropPath,
    LayerNorm,
    LayerNorm2d,
    PreNormBlock,
    drop_path_rates,
    is_meta,
    resample_abs_pos_embed,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["ViTamin"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@trace_leaf
def pos_embed_for(pos_embed: Tensor, grid: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """The ``(1, H*W, C)`` position table for an ``hw`` token grid: as is, or resampled from ``grid``."""
    return resample_abs_pos_embed(pos_embed, hw, grid, num_prefix_tokens=0)


class LayerNormGelu2d(LayerNorm2d):
    """LayerNorm over the channels of an NCHW map, then GELU (timm's ``LayerNormAct2d``)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(super().forward(x))


class ViTaminConvStem(nn.Module):
    """3x3/2 conv, LayerNorm + GELU, 3x3 conv."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, 2, 1)
        self.norm1 = LayerNormGelu2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class Downsample2d(nn.Module):
    """The shortcut of a strided MBConv block: 3x3/2 average pool, then a 1x1 conv when the width changes."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
        self.expand = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.expand(self.pool(x))


class MbConvLNBlock(nn.Module):
    """Pre-norm inverted bottleneck: LayerNorm, 1x1 expand, GELU, depthwise 3x3 (strided), GELU, 1x1, residual."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 1, expand_ratio: float = 4.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        mid = _make_divisible(out_dim * expand_ratio)
        if stride == 2:
            self.shortcut = Downsample2d(in_dim, out_dim)
        elif in_dim != out_dim:
            self.shortcut = nn.Conv2d(in_dim, out_dim, 1)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = LayerNorm2d(in_dim)
        self.conv1_1x1 = nn.Conv2d(in_dim, mid, 1)
        self.act1 = nn.GELU()
        self.conv2_kxk = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid)
        self.act2 = nn.GELU()
        self.conv3_1x1 = nn.Conv2d(mid, out_dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.shortcut(x)
        x = self.act2(self.conv2_kxk(self.act1(self.conv1_1x1(self.pre_norm(x)))))
        return self.drop_path(self.conv3_1x1(x)) + shortcut


class StridedConv(nn.Module):
    """LayerNorm over channels, then a 3x3/2 conv to the transformer width."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, 3, 2, 1)
        self.norm = LayerNorm2d(in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))


class MbConvStages(nn.Module):
    """Stem, two MBConv stages (each starts with a stride-2 block), a strided conv: an NCHW map at stride 16."""

    def __init__(self, in_chans: int, stem_width: int, dims: tuple[int, int], depths: tuple[int, int],
                 embed_dim: int) -> None:
        super().__init__()
        self.stem = ViTaminConvStem(in_chans, stem_width)
        ins = (stem_width, dims[0])
        self.stages = nn.Sequential(*[nn.Sequential(*[MbConvLNBlock(ins[s] if d == 0 else dims[s], dims[s],
                                                                    2 if d == 0 else 1) for d in range(depths[s])])
                                      for s in range(2)])
        self.pool = StridedConv(dims[1], embed_dim)


class ViTaminEmbed(nn.Module):
    """timm's ``HybridEmbed`` holder (``patch_embed.backbone``) of the convolutional stages."""

    def __init__(self, backbone: MbConvStages) -> None:
        super().__init__()
        self.backbone = backbone


class GeGluMlp(nn.Module):
    """LayerNorm, then ``w2(gelu(w0(x)) * w1(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = LayerNorm(dim)
        self.w0 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        return self.w2(self.act(self.w0(x)) * self.w1(x))


class ViTamin(Backbone):
    """MBConv stages to stride 16, then GeGLU transformer blocks over the tokens, average pool, norm, classifier.

    Args:
        conv_dims, conv_depths: widths and depths of the two MBConv stages (stride 4 and 8).
        img_size: the input size the position table is built for; other sizes resample it.
        pos_embed: a learned position table (ViTamin-XL has none).
    """

    kind = "hybrid"
    has_attention = True
    takes_img_size = True
    min_input_size = 16
    input_multiple = 16
    no_weight_decay_keys = ("pos_embed",)
    first_conv = "patch_embed.backbone.stem.conv1"

    def __init__(self, conv_dims: tuple[int, int] = (64, 128), conv_depths: tuple[int, int] = (2, 4),
                 stem_width: int = 64, embed_dim: int = 384, depth: int = 14, num_heads: int = 6,
                 mlp_ratio: float = 2.0, img_size: int = 224, pos_embed: bool = True, *, in_chans: int = 3,
                 num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if len(conv_dims) != 2 or len(conv_depths) != 2 or min(conv_depths) < 1:
            raise ValueError(f"vitamin: conv_dims and conv_depths need two entries (depths >= 1), got {conv_dims} "
                             f"and {conv_depths}")
        if img_size % 16:
            raise ValueError(f"vitamin: img_size must be a multiple of 16 (the stride of the stem), got {img_size}")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.grid_size = (img_size // 16, img_size // 16)
        self.patch_embed = ViTaminEmbed(MbConvStages(in_chans, stem_width, conv_dims, conv_depths, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim)) \
            if pos_embed else None
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[PreNormBlock(embed_dim, num_heads, drop_path=dpr[i],  # with a GeGLU MLP
                                                   mlp=GeGluMlp(embed_dim, int(embed_dim * mlp_ratio)))
                                      for i in range(depth)])
        convs = [FeatureInfo(d, 4 * 2 ** i, f"patch_embed.backbone.stages.{i}") for i, d in enumerate(conv_dims)]
        self.set_feature_info(convs + [FeatureInfo(embed_dim, 16, f"blocks.{i}") for i in range(depth)])
        self.init_head(embed_dim, num_classes, drop_rate, "ln", "avg")
        if self.pos_embed is not None and not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    def stage_modules(self) -> list[nn.Module]:
        return [*self.patch_embed.backbone.stages, *self.blocks]

    def _tokens(self, x: Tensor) -> Tensor:
        """The stride-8 map ``(B, C, H, W)`` -> tokens ``(B, H/2 * W/2, D)`` with the position table added."""
        x = self.patch_embed.backbone.pool(x)
        hw = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, D, H, W) -> (B, HW, D)
        if self.pos_embed is not None:
            x = x + pos_embed_for(self.pos_embed, self.grid_size, hw)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """Tokens ``(B, N, D)`` after the last block (timm's ViTamin has no norm there: it is in the head)."""
        self.check_input(x)
        conv = self.patch_embed.backbone
        x = conv.stem(x)
        for stage in conv.stages:
            x = self.run_stage(stage, x)
        x = self._tokens(x)
        for block in self.blocks:
            x = self.run_stage(block, x)
        return x

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """NCHW outputs of the chosen stages: the two MBConv stages (stride 4, 8), then each block (stride 16)."""
        stages = self.stage_modules()
        idx = resolve_indices(indices, len(stages), self.name)
        self.check_input(x)
        H, W = math.ceil(x.shape[-2] / 16), math.ceil(x.shape[-1] / 16)
        x = self.patch_embed.backbone.stem(x)
        outs = []
        for i, stage in enumerate(stages[:idx[-1] + 1]):
            if i == 2:
                x = self._tokens(x)
            x = self.run_stage(stage, x)
            if i in idx:
                outs.append(x if i < 2 else x.transpose(1, 2).reshape(x.shape[0], -1, H, W))  # (B, HW, D) -> NCHW
        return outs

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """timm keys -> ours: ``head.*`` -> ``head.fc.*``, ``fc_norm.*`` -> ``head.norm.*``. Keys already in our
        layout pass unchanged."""
        out = {}
        for k, v in state_dict.items():
            if k in ("head.weight", "head.bias"):
                k = "head.fc." + k.split(".")[1]
            elif k.startswith("fc_norm."):
                k = "head.norm." + k[len("fc_norm."):]
            out[k] = v
        return out

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resample a checkpoint's position table made for another (square) grid to this model's grid."""
        pos = state_dict.get("pos_embed")
        if self.pos_embed is not None and pos is not None and pos.ndim == 3 and pos.shape[1] != self.pos_embed.shape[1]:
            side = math.isqrt(pos.shape[1])
            if side * side == pos.shape[1]:
                state_dict = dict(state_dict)
                state_dict["pos_embed"] = pos_embed_for(pos, (side, side), self.grid_size)
        return state_dict


def _make_divisible(v: float, divisor: int = 8) -> int:
    """``v`` rounded to the nearest multiple of ``divisor``, never below 90% of ``v`` (timm's ``make_divisible``)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _init_weights(m: nn.Module) -> None:
    if is_meta(m):
        return
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):  # timm's ViTamin conv init: normal, fan-out
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_SRC = "official README (Beckschen/ViTamin, ViTamin/README.md): image-tower params and MACs; top-1 = CLIP zero-shot"
_XSRC = _SRC + " (XL: the top-level README, 40B seen samples)"
_NOTE = ("top-1 is CLIP ImageNet zero-shot accuracy (DataComp-1B pre-training, {seen} seen samples), not supervised "
         "ImageNet-1k; params_m is timm's tower with a 1000-class head (the paper's count has the CLIP projection); "
         "gmacs: timm's model counted with the attention matmuls (torch FlopCounter, TIMM_FUSED_ATTN=0), which the "
         "official MACs leave out (e.g. small: 5.47 G without them)")
_S = dict(conv_dims=(64, 128), stem_width=64, embed_dim=384, depth=14, num_heads=6)
_B = dict(conv_dims=(128, 256), stem_width=128, embed_dim=768, depth=14, num_heads=12)
_L = dict(conv_dims=(160, 320), stem_width=160, embed_dim=1024, depth=31, num_heads=16)
_XL = dict(conv_dims=(192, 384), stem_width=192, embed_dim=1152, depth=32, num_heads=16, pos_embed=False)


def _v(args: dict, params_m: float, gmacs: float, paper: Paper, size: int, seen: str) -> Variant:
    return Variant(args, params_m=params_m, gmacs=gmacs, paper=paper, input_size=size,
                   crop_pct=0.9 if size == 224 else 1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                   notes=_NOTE.format(seen=seen))


VARIANTS = {
    "vitamin_test":       Variant(dict(conv_dims=(16, 32), conv_depths=(1, 1), stem_width=16, embed_dim=64, depth=2,
                                       num_heads=2), params_m=0.182312, input_size=64, mean=OPENAI_CLIP_MEAN,
                                  std=OPENAI_CLIP_STD),
    "vitamin_small_224":  _v(_S, 22.262696, 5.888, Paper(22.0, 5.50, 62.2, _SRC), 224, "1.28B"),
    "vitamin_base_224":   _v(_B, 87.901032, 22.623, Paper(87.5, 21.8, 68.9, _SRC), 224, "1.28B"),
    "vitamin_large_224":  _v(_L, 333.556616, 74.924, Paper(333.3, 72.6, 80.8, _SRC), 224, "12.8B"),
    "vitamin_large_256":  _v(_L, 333.618056, 98.835, Paper(333.4, 94.8, 81.2, _SRC), 256, "12.8B + 0.2B at 256"),
    "vitamin_large_336":  _v(_L, 333.807496, 175.438, Paper(333.6, 163.4, 81.6, _SRC), 336, "12.8B + 0.2B at 336"),
    "vitamin_large_384":  _v(_L, 333.945736, 234.08, Paper(333.7, 213.4, 81.8, _SRC), 384, "12.8B + 0.2B at 384"),
    "vitamin_xlarge_256": _v(_XL, 435.879976, 129.942, Paper(436.1, 125.3, 82.3, _XSRC), 256, "40B"),
    "vitamin_xlarge_336": _v(_XL, 435.879976, 229.859, Paper(436.1, 215.9, 82.7, _XSRC), 336, "40B + 1B at 336"),
    "vitamin_xlarge_384": _v(_XL, 435.879976, 305.957, Paper(436.1, 281.9, 82.9, _XSRC), 384, "40B + 1B at 384"),
}
register_family(ViTamin, VARIANTS, paper="arXiv:2404.02132", kind="hybrid", code="timm 1.0.31 timm/models/vitamin.py")
