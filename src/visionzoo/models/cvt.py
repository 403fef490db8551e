"""CvT, from "CvT: Introducing Convolutions to Vision Transformers" (Wu et al., 2021). https://arxiv.org/abs/2103.15808

Differs from the paper: none. Three stages, each a convolutional token embedding (an overlapping strided conv and
a LayerNorm) and transformer blocks whose queries, keys and values come from a convolutional projection: a 3x3
depthwise conv and a BatchNorm on the token map (stride 2 for keys and values), then a linear layer. The last stage
carries a class token, which skips the convolutions and is what the head reads. As in the official code, the
attention logits are scaled by ``dim ** -0.5`` (the whole width, not the head width), the MLPs use QuickGELU
(``x * sigmoid(1.702 x)``) and every LayerNorm has eps 1e-5.

Input sizes: CvT has no position table, so there is nothing to resample: any input whose sides are multiples of 16
(the total stride of the three token embeddings) runs as is. The model has three stages, so ``features_only`` gives
strides 4, 8 and 16. ``forward_features`` returns the last stage's tokens ``(B, 1 + H/16 * W/16, C)``, class
token first, after the final norm; ``fuse()`` folds every projection BatchNorm into its depthwise conv.

Follows the official microsoft/CvT ``lib/models/cls_cvt.py`` and ``experiments/imagenet/cvt/*.yaml`` (MIT); timm has
no CvT. Our keys are the official ones with the stages in one list and the library's head: ``stages.{0,1,2}`` (the
official ``stage{0,1,2}``), ``norm``, ``head.fc`` (``head``); ``ConvolutionalVisionTransformer.remap`` translates
the released checkpoints.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    AttentionCore,
    LastStageClassTokenMixin,
    LayerType,
    MapTokenBlock,
    drop_path_rates,
    get_norm,
    init_linear,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["ConvolutionalVisionTransformer", "QuickGELU"]


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU, ``x * sigmoid(1.702 x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class CvTConvEmbed(nn.Module):
    """Convolutional token embedding: a strided, padded conv, then LayerNorm over channels; NCHW in and out."""

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: int, padding: int,
                 norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride=stride, padding=padding)
        self.norm = get_norm(norm_layer)(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, C, H, W) -> (B, H', W', C')
        return x.permute(0, 3, 1, 2)  # -> (B, C', H', W')


def conv_projection(dim: int, kernel_size: int, stride: int) -> nn.Sequential:
    """Depthwise conv (no bias) and BatchNorm, as an ``nn.Sequential`` so that ``fuse()`` folds the pair."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=kernel_size // 2, groups=dim, bias=False),
        bn=nn.BatchNorm2d(dim)))


class CvTAttention(nn.Module):
    """Multi-head attention over convolutional projections of the token map; prefix tokens skip the convs."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, kernel_size: int = 3, stride_q: int = 1,
                 stride_kv: int = 2, num_prefix_tokens: int = 0, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cvt: stage width {dim} must be divisible by its num_heads {num_heads}")
        self.num_heads = num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = dim ** -0.5  # NOTE: the whole width, as the official code (not dim // num_heads)
        self.conv_proj_q = conv_projection(dim, kernel_size, stride_q)
        self.conv_proj_k = conv_projection(dim, kernel_size, stride_kv)
        self.conv_proj_v = conv_projection(dim, kernel_size, stride_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.core = AttentionCore(num_prefix_tokens)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def project(self, conv: nn.Module, linear: nn.Linear, prefix: Tensor, x: Tensor) -> Tensor:
        """Prefix tokens and the conv-projected map ``x`` ``(B, C, H, W)``, through ``linear``; ``(B, h, N', d)``."""
        t = torch.cat([prefix, conv(x).flatten(2).transpose(1, 2)], dim=1)  # (B, C, H', W') -> (B, prefix + H'W', C)
        return linear(t).reshape(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)  # -> (B, h, N', d)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """``x``: tokens ``(B, prefix + H*W, C)`` of an ``(H, W)`` map."""
        B, N, C = x.shape
        prefix, x = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        x = x.transpose(1, 2).reshape(B, C, *size)  # (B, HW, C) -> (B, C, H, W)
        q = self.project(self.conv_proj_q, self.proj_q, prefix, x)
        k = self.project(self.conv_proj_k, self.proj_k, prefix, x)
        v = self.project(self.conv_proj_v, self.proj_v, prefix, x)
        drop = self.attn_drop if self.training else 0.0
        conv = self.conv_proj_q.conv
        grid = tuple((n + 2 * pad - kern) // st + 1 for n, pad, kern, st in zip(size, conv.padding, conv.kernel_size,
                                                                                 conv.stride))  # query map (H, W)
        x = self.core(q, k, v, scale=self.scale, dropout_p=drop, grid=grid)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, h, N, d) -> (B, N, C)
        return self.proj_drop(self.proj(x))


class CvTStage(nn.Module):
    """Token embedding, optional class token, blocks: a map ``(B, C, H, W)`` -> a map ``(B, C', H', W')``, or
    ``(map, class token (B, 1, C'))`` for a stage with a class token."""

    def __init__(self, in_chans: int, dim: int, depth: int, num_heads: int, patch_size: int, patch_stride: int,
                 patch_padding: int, cls_token: bool, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, drop_path: list[float] | None = None,
                 act_layer: LayerType = QuickGELU, norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        self.patch_embed = CvTConvEmbed(in_chans, dim, patch_size, patch_stride, patch_padding, norm_layer)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_drop = nn.Dropout(proj_drop)
        drop_path = drop_path or [0.0] * depth
        self.blocks = nn.ModuleList([
            MapTokenBlock(dim, CvTAttention(dim, num_heads, qkv_bias, num_prefix_tokens=int(cls_token),
                                            attn_drop=attn_drop, proj_drop=proj_drop),
                          mlp_ratio, proj_drop, drop_path[i], act_layer, norm_layer) for i in range(depth)])

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # -> (B, 1 + HW, C)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x, (H, W))
        if self.cls_token is None:
            return x.transpose(1, 2).reshape(B, C, H, W)  # (B, HW, C) -> (B, C, H, W)
        return x[:, 1:].transpose(1, 2).reshape(B, C, H, W), x[:, :1]


class ConvolutionalVisionTransformer(LastStageClassTokenMixin, Backbone):
    """CvT: three stages of convolutional token embedding and convolutional-projection attention; class-token head.

    Args:
        patch_sizes, patch_strides, patch_paddings: the token embedding conv of each stage.
        drop_path_rate: stochastic depth of the last stage, rising linearly from 0 over its blocks; the official
            configs keep the earlier stages at 0 (``DROP_PATH_RATE: [0, 0, r]``), and so do we.
        proj_drop_rate: dropout after the token embeddings, the attention projection and the MLPs (the official
            ``DROP_RATE``); ``drop_rate`` is the dropout before the classifier, as elsewhere in the library.
    """

    kind = "hybrid"
    has_attention = True
    min_input_size = 16
    input_multiple = 16
    no_weight_decay_keys = ("cls_token",)
    first_conv = "stages.0.patch_embed.proj"

    def __init__(self, embed_dims: tuple[int, ...] = (64, 192, 384), depths: tuple[int, ...] = (1, 2, 10),
                 num_heads: tuple[int, ...] = (1, 3, 6), patch_sizes: tuple[int, ...] = (7, 3, 3),
                 patch_strides: tuple[int, ...] = (4, 2, 2), patch_paddings: tuple[int, ...] = (2, 1, 1),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, act_layer: LayerType = QuickGELU,
                 norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        n = len(depths)
        if not len(embed_dims) == len(num_heads) == len(patch_sizes) == len(patch_strides) == len(patch_paddings) == n:
            raise ValueError(f"cvt: embed_dims {tuple(embed_dims)}, depths {tuple(depths)}, num_heads "
                             f"{tuple(num_heads)} and patch_sizes/strides/paddings need one entry per stage")
        self.in_chans = in_chans
        self.num_stages = n
        self.embed_dim = embed_dims[-1]
        stride, infos, stages, in_dim = 1, [], [], in_chans
        for i, dim in enumerate(embed_dims):
            dpr = drop_path_rates(drop_path_rate, depths[i]) if i == n - 1 else None
            stages.append(CvTStage(in_dim, dim, depths[i], num_heads[i], patch_sizes[i], patch_strides[i],
                                   patch_paddings[i], i == n - 1, mlp_ratio, qkv_bias, attn_drop_rate, proj_drop_rate,
                                   dpr, act_layer, norm_layer))
            stride *= patch_strides[i]
            infos.append(FeatureInfo(dim, stride, f"stages.{i}"))
            in_dim = dim
        self.stages = nn.ModuleList(stages)
        self.min_input_size = self.input_multiple = stride
        self.set_feature_info(infos)
        self.norm = get_norm(norm_layer)(self.embed_dim)
        self.init_head(self.embed_dim, num_classes, drop_rate, pool_type="token", prefix_tokens=1)
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> Tensor:
        return x  # every stage embeds its own tokens

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official microsoft/CvT keys -> ours: ``stage{i}.*`` -> ``stages.{i}.*``, ``head.*`` -> ``head.fc.*``. Keys
        already in our layout pass unchanged."""
        out = {}
        for k, v in state_dict.items():
            first, _, rest = k.partition(".")
            if first.startswith("stage") and first[5:].isdigit():
                k = f"stages.{first[5:]}.{rest}"
            elif k in ("head.weight", "head.bias"):
                k = f"head.fc.{rest}"
            out[k] = v
        return out


def _init_weights(m: nn.Module) -> None:
    init_linear(m, std=0.02)
    if isinstance(m, CvTStage) and m.cls_token is not None and not m.cls_token.is_meta:
        nn.init.trunc_normal_(m.cls_token, std=0.02)


_README = "official README.md"
_NOTES = ("official weights: CvT-13-224x224-IN-1k.pth etc. (official layout); gmacs: fvcore on the official model "
          "(attention matmuls counted; fvcore also counts the BatchNorms, we do not); "
          "any multiple of 16 runs as is (no position table)")

# params_m: exact count of the official cls_cvt.py model (experiments/imagenet/cvt/*.yaml) with 1000 classes.
VARIANTS = {
    "cvt_test": Variant(dict(embed_dims=(16, 32, 64), depths=(1, 1, 1), num_heads=(1, 2, 4)), params_m=0.160584,
                        input_size=64),
    "cvt_13":   Variant(dict(depths=(1, 2, 10)), params_m=19.997480, gmacs=4.585,
                        paper=Paper(20, 4.5, 81.6, f"{_README}, ImageNet-1k table; 83.0 at 384"),
                        notes=_NOTES),
    "cvt_21":   Variant(dict(depths=(1, 4, 16)), params_m=31.622696, gmacs=7.206,
                        paper=Paper(32, 7.1, 82.5, f"{_README}, ImageNet-1k table; 83.3 at 384"),
                        notes=_NOTES),
    "cvt_w24":  Variant(dict(embed_dims=(192, 768, 1024), depths=(2, 2, 20), num_heads=(3, 12, 16)),
                        params_m=277.196392, gmacs=194.487, input_size=384, crop_pct=1.0,
                        paper=Paper(277, 193.2, 87.6, f"{_README}, ImageNet-22k table (22k pre-training, 1k "
                                                      f"fine-tuning at 384; the abstract says 87.7)"),
                        notes=f"{_NOTES}; weights: CvT-w24-384x384-IN-22k.pth (test: resize to 384, no crop)"),
}
register_family(ConvolutionalVisionTransformer, VARIANTS, paper="arXiv:2103.15808", kind="hybrid", family="cvt")
