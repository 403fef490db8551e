"""PVT, from "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without Convolutions" (Wang et
al., 2021). https://arxiv.org/abs/2102.12122

Differs from the paper: none. Four stages, each a non-overlapping patch embedding (4x4, then 2x2) with a LayerNorm,
a learned absolute position table and blocks of spatial-reduction attention; the last stage also carries a class
token, which the head reads after the final norm.

Input sizes: the position tables are made for the grids of ``img_size``. Any other input whose sides are multiples
of 32 gets every table resampled on the fly, bilinearly and without antialiasing (the class token's row is kept),
as the official classification and detection code do; a checkpoint made for another ``img_size`` is resampled the
same way when it is loaded. ``forward_features`` returns the last stage's tokens ``(B, 1 + H/32 * W/32, C)``, class
token first, as plain ViTs do; ``forward_intermediates`` gives each stage's map without the class token (which
still takes part in the last stage's attention).

Follows the official whai362/PVT ``classification/pvt.py`` (Apache-2.0); timm has no PVT v1. Each stage is one
module here (``stages.i``: ``patch_embed``, ``pos_embed``, ``blocks``, and ``cls_token`` in the last), then ``norm``
and the classifier ``head.fc``; ``PyramidVisionTransformer.remap`` translates the official flat keys
(``patch_embed{1..4}``, ``pos_embed{1..4}``, ``block{1..4}``, ``cls_token``, ``head``).
"""
from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    LastStageClassTokenMixin,
    LayerType,
    MapTokenBlock,
    PatchEmbed,
    SpatialReductionAttention,
    drop_path_rates,
    get_norm,
    init_linear,
    resample_abs_pos_embed,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["PyramidVisionTransformer"]


@trace_leaf
def stage_pos_embed(pos_embed: Tensor, size: tuple[int, int], grid: tuple[int, int], prefix: int) -> Tensor:
    """A stage's position table for an ``(H, W)`` map: as it is for its own ``grid``, bilinearly resampled (no
    antialias, the prefix rows kept) for any other size. One opaque node under FX: it needs the concrete size."""
    return resample_abs_pos_embed(pos_embed, size, grid, num_prefix_tokens=prefix, interpolation="bilinear",
                                  antialias=False)


class PVTStage(nn.Module):
    """Patch embedding, the learned position table (and the class token in the last stage), then the blocks of
    spatial-reduction attention. NCHW in; NCHW out, or ``(map, class token (B, 1, C))`` for the last stage."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_dim: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, sr_ratio: int, class_token: bool = False, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, drop_path: list[float] | None = None,
                 act_layer: LayerType = "gelu", norm_layer: LayerType = "ln") -> None:
        super().__init__()
        drop_path = drop_path or [0.0] * depth
        self.patch_embed = PatchEmbed(img_size, patch_size, in_dim, dim, norm_layer=nn.LayerNorm, output_fmt="NHWC")
        self.grid = self.patch_embed.grid_size
        self.num_prefix_tokens = int(class_token)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + self.num_prefix_tokens, dim))
        self.pos_drop = nn.Dropout(proj_drop)
        self.blocks = nn.ModuleList([
            MapTokenBlock(dim, SpatialReductionAttention(dim, num_heads, sr_ratio, qkv_bias=qkv_bias,
                                                         attn_drop=attn_drop, proj_drop=proj_drop,
                                                         prefix_tokens=self.num_prefix_tokens),
                          mlp_ratio, proj_drop, drop_path[j], act_layer, norm_layer)
            for j in range(depth)])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, H', W', C')
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)  # (B, H', W', C') -> (B, N, C')
        pos = stage_pos_embed(self.pos_embed, (H, W), self.grid, self.num_prefix_tokens)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # -> (B, 1 + N, C')
        x = self.pos_drop(x + pos)
        for block in self.blocks:
            x = block(x, (H, W))
        if self.cls_token is None:
            return x.transpose(1, 2).reshape(B, C, H, W)  # (B, N, C') -> (B, C', H', W')
        return x[:, 1:].transpose(1, 2).reshape(B, C, H, W), x[:, :1]


class PyramidVisionTransformer(LastStageClassTokenMixin, Backbone):
    """PVT: four stages of patch embedding, position table and spatial-reduction attention; class-token head.

    Args:
        img_size: the input size the position tables are made for; other multiples of 32 resample them.
        mlp_ratios, sr_ratios: per stage; ``sr_ratios[i]`` is the side reduction of stage i's keys and values.
        norm_layer: the blocks' and the final norm (LayerNorm eps 1e-6); the patch embeddings and the reductions
            keep torch's LayerNorm (eps 1e-5), as the official code.
        proj_drop_rate: dropout after the position tables, the attention projection and the MLPs (the official
            ``drop_rate``); ``drop_rate`` is the dropout before the classifier, as elsewhere in the library.
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    takes_patch_size = True
    min_input_size = 32
    input_multiple = 32
    no_weight_decay_keys = ("cls_token",)
    first_conv = "stages.0.patch_embed.proj"

    def __init__(self, img_size: int = 224, patch_size: int = 4, embed_dims: tuple[int, ...] = (64, 128, 320, 512),
                 depths: tuple[int, ...] = (2, 2, 2, 2), num_heads: tuple[int, ...] = (1, 2, 5, 8),
                 mlp_ratios: tuple[float, ...] = (8, 8, 4, 4), sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
                 qkv_bias: bool = True, *, in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 act_layer: LayerType = "gelu", norm_layer: LayerType = "ln") -> None:
        super().__init__()
        n = len(depths)
        if not len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(sr_ratios) == n:
            raise ValueError(f"pvt: embed_dims {tuple(embed_dims)}, depths {tuple(depths)}, num_heads "
                             f"{tuple(num_heads)}, mlp_ratios {tuple(mlp_ratios)} and sr_ratios {tuple(sr_ratios)} "
                             f"need one entry per stage")
        if sr_ratios[-1] != 1:
            raise ValueError(f"pvt: the last stage carries the class token, so its sr_ratio must be 1, got "
                             f"sr_ratios={tuple(sr_ratios)}")
        self.in_chans = in_chans
        self.num_stages = n
        self.embed_dim = embed_dims[-1]
        self.min_input_size = self.input_multiple = patch_size * 2 ** (n - 1)
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        self.stages = nn.ModuleList()
        infos, in_dim, size = [], in_chans, img_size
        for i, dim in enumerate(embed_dims):
            stage = PVTStage(size, patch_size if i == 0 else 2, in_dim, dim, depths[i], num_heads[i], mlp_ratios[i],
                             sr_ratios[i], i == n - 1, qkv_bias, attn_drop_rate, proj_drop_rate, dpr[i], act_layer,
                             norm_layer)
            self.stages.append(stage)
            infos.append(FeatureInfo(dim, patch_size * 2**i, f"stages.{i}"))
            in_dim, size = dim, stage.grid
        self.set_feature_info(infos)
        self.norm = get_norm(norm_layer)(self.embed_dim)
        self.init_head(self.embed_dim, num_classes, drop_rate, pool_type="token")
        self._init_tokens()
        self.apply(_init_weights)

    @property
    def grids(self) -> list[tuple[int, int]]:
        """The token grid of each stage at ``img_size`` (the grids the position tables are made for)."""
        return [stage.grid for stage in self.stages]

    def _init_tokens(self) -> None:
        last = self.stages[-1]
        if last.cls_token.is_meta:
            return
        for stage in self.stages:
            nn.init.trunc_normal_(stage.pos_embed, std=0.02)
        nn.init.trunc_normal_(last.cls_token, std=0.02)

    def forward_stem(self, x: Tensor) -> Tensor:
        return x  # every stage embeds its own patches

    # --- checkpoints ------------------------------------------------------------------------------------
    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official whai362/PVT keys (the pre-seams visionzoo layout too) -> ours; our own keys pass unchanged.

        ``patch_embed{i}.*``, ``pos_embed{i}``, ``block{i}.*`` -> ``stages.{i-1}.patch_embed.*``, ``.pos_embed``,
        ``.blocks.*``; ``cls_token`` -> ``stages.{last}.cls_token``; ``head.{weight,bias}`` -> ``head.fc.*``.
        """
        numbers = [int(m[1]) for k in state_dict if (m := re.match(r"^(?:patch_embed|pos_embed|block)(\d+)", k))]
        out = {}
        for k, v in state_dict.items():
            k = re.sub(r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.patch_embed.", k)
            k = re.sub(r"^pos_embed(\d+)$", lambda m: f"stages.{int(m[1]) - 1}.pos_embed", k)
            k = re.sub(r"^block(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.", k)
            k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
            if k == "cls_token" and numbers:
                k = f"stages.{max(numbers) - 1}.cls_token"
            out[k] = v
        return out

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resample position tables made for another (square) input size to this model's grids."""
        state_dict = dict(state_dict)
        for i, stage in enumerate(self.stages):
            key, prefix = f"stages.{i}.pos_embed", stage.num_prefix_tokens
            pos = state_dict.get(key)
            if pos is None or pos.ndim != 3 or pos.shape == stage.pos_embed.shape:
                continue
            side = math.isqrt(pos.shape[1] - prefix)
            if side * side == pos.shape[1] - prefix:
                state_dict[key] = resample_abs_pos_embed(pos, stage.grid, (side, side), num_prefix_tokens=prefix,
                                                         interpolation="bilinear", antialias=False)
        return state_dict


def _init_weights(m: nn.Module) -> None:
    init_linear(m, std=0.02)


_README = "official classification/README.md, PVTv1 table (params, top-1)"
_GF = f"{_README}; GFLOPs: the paper's, as quoted by CrossViT Table 3 (refs_vits)"
_NOTES = ("official weights: whai362/PVT releases v2 pvt_{tiny,small,medium,large}.pth (official layout); gmacs: "
          "fvcore on the official model, attention matmuls included; other multiples of 32 resample the position "
          "tables bilinearly")

# params_m: exact count of the official classification/pvt.py models with 1000 classes.
VARIANTS = {
    "pvt_test":   Variant(dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                               mlp_ratios=(2, 2, 2, 2)), params_m=0.199624, input_size=64),
    "pvt_tiny":   Variant(dict(depths=(2, 2, 2, 2)), params_m=13.229288, gmacs=1.944,
                          paper=Paper(13.2, 1.9, 75.1, _GF),
                          notes=_NOTES),
    "pvt_small":  Variant(dict(depths=(3, 4, 6, 3)), params_m=24.485864, gmacs=3.834,
                          paper=Paper(24.5, 3.8, 79.8, _GF),
                          notes=_NOTES),
    "pvt_medium": Variant(dict(depths=(3, 4, 18, 3)), params_m=44.208104, gmacs=6.686,
                          paper=Paper(44.2, 6.7, 81.2, _GF),
                          notes=_NOTES),
    "pvt_large":  Variant(dict(depths=(3, 8, 27, 3)), params_m=61.369320, gmacs=9.851,
                          paper=Paper(61.4, 9.8, 81.7, _GF),
                          notes=_NOTES),
}
register_family(PyramidVisionTransformer, VARIANTS, paper="arXiv:2102.12122", kind="vit", family="pvt")
