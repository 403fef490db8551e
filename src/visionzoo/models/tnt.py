"""TNT, from "Transformer in Transformer" (Han et al., NeurIPS 2021). https://arxiv.org/abs/2103.00112

Each 16x16 patch is a "sentence" of 4x4 "visual words" (pixels): an inner transformer mixes the words of each
patch, their concatenation is projected and added to the patch token, and an outer transformer mixes the patch
tokens (with a class token). Both attentions are softmax attention through ``layers.AttentionCore``: the inner one
is a windowed call (the words of one patch, ``grid`` = 4x4, the windows tiling the map at stride 4), the outer one
is global over the patch tokens.

No token reduction: every block adds the word stream of each patch to that patch's token, so the outer tokens
cannot be merged or dropped without breaking the word-to-patch correspondence; TNT has no ``TokenBlock`` and
``visionzoo.tokens`` refuses it with that reason.

Differs from the paper: none. Follows timm's ``tnt.py`` (timm 1.0.31, Apache-2.0; the non-legacy pixel embedding,
which is the official huawei-noah/Efficient-AI-Backbones one), whose keys we keep except ``head`` -> ``head.fc``.
``TNT.remap`` also reads the official checkpoints' names (``outer_pos``, ``inner_attn``, ...). Inputs of another size
than the model was built for get a bicubic resample of the patch position table.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, tokens_to_map
from visionzoo.layers import (
    AttentionCore,
    DropPath,
    LayerType,
    Mlp,
    drop_path_rates,
    get_norm,
    init_trunc_normal,
    resample_abs_pos_embed,
    trace_leaf,
)
from visionzoo.registry import INCEPTION_MEAN, INCEPTION_STD, Paper, Variant, register_family

__all__ = ["TNT"]


@trace_leaf
def _patch_pos_for(pos: Tensor, grid: tuple[int, int], built: tuple[int, int]) -> Tensor:
    """The patch position table for a ``grid`` of patches, resampled from the ``built`` grid when they differ."""
    return resample_abs_pos_embed(pos, tuple(grid), built, num_prefix_tokens=1)


class TNTAttention(nn.Module):
    """Multi-head attention with a joint q/k projection and a separate full-width v projection (timm's layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, prefix_tokens: int = 0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"tnt: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.core = AttentionCore(prefix_tokens)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        B, N, C = x.shape
        q, k = self.qk(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, N, C) -> (B, h, N, d)
        x = self.core(q, k, v, scale=self.scale, grid=grid)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # (B, h, N, d) -> (B, N, C)


class TNTBlock(nn.Module):
    """Inner block on the words, words -> patch token, outer block on the patch tokens; ``(words, patches)`` in/out."""

    def __init__(self, inner_dim: int, dim: int, num_pixel: int, pixel_grid: tuple[int, int], num_heads_inner: int,
                 num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float, norm_layer: LayerType,
                 act_layer: LayerType, word_stride: int = 4) -> None:
        super().__init__()
        norm = get_norm(norm_layer)
        self.pixel_grid = pixel_grid
        self.norm_in = norm(inner_dim)
        self.attn_in = TNTAttention(inner_dim, num_heads_inner, qkv_bias)
        self.attn_in.core.query_reduction = word_stride  # the words sit at this stride, not the block's (explain)
        self.norm_mlp_in = norm(inner_dim)
        self.mlp_in = Mlp(inner_dim, inner_dim * 4, act_layer=act_layer)
        self.norm1_proj = norm(inner_dim * num_pixel)
        self.proj = nn.Linear(inner_dim * num_pixel, dim, bias=False)
        self.norm2_proj = norm(dim)
        self.norm_out = norm(dim)
        self.attn_out = TNTAttention(dim, num_heads, qkv_bias, prefix_tokens=1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm_mlp = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        pixels, patches = x  # (B * N, words, c), (B, 1 + N, C)
        pixels = pixels + self.drop_path(self.attn_in(self.norm_in(pixels), grid=self.pixel_grid))
        pixels = pixels + self.drop_path(self.mlp_in(self.norm_mlp_in(pixels)))
        B, N1, _ = patches.shape
        words = self.norm1_proj(pixels.reshape(B, N1 - 1, -1))  # (B * N, words, c) -> (B, N, words * c)
        patches = torch.cat([patches[:, :1], patches[:, 1:] + self.norm2_proj(self.proj(words))], dim=1)
        patches = patches + self.drop_path(self.attn_out(self.norm_out(patches)))
        patches = patches + self.drop_path(self.mlp(self.norm_mlp(patches)))
        return pixels, patches


class TNTPixelEmbed(nn.Module):
    """Cut the image into patches, embed each with a strided 7x7 conv into a small grid of words."""

    def __init__(self, patch_size: int, in_chans: int, inner_dim: int, stride: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, inner_dim, kernel_size=7, padding=3, stride=stride)

    def forward(self, x: Tensor, pixel_pos: Tensor) -> Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # -> (B, H/p, W/p, C, p, p)
        x = self.proj(x.reshape(-1, C, p, p)) + pixel_pos  # (B * N, C, p, p) -> (B * N, c, p/s, p/s)
        return x.flatten(2).transpose(1, 2)  # (B * N, c, h, w) -> (B * N, h * w, c)


class TNT(Backbone):
    """Transformer in Transformer: word (pixel) and sentence (patch) streams, one TNT block each step.

    Args:
        img_size: the input size the patch position table is built for; other sizes (multiples of ``patch_size``)
            resample it on the fly.
        inner_dim: width of the words; ``first_stride``: stride of the word conv (words per patch side =
            ``patch_size / first_stride``).
        num_heads_inner, num_heads: heads of the inner (word) and outer (patch) attention.
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    takes_patch_size = True
    min_input_size = 16
    input_multiple = 16
    no_weight_decay_keys = ("patch_pos", "pixel_pos", "cls_token")
    position_keys = ("patch_pos", "pixel_pos")
    first_conv = "pixel_embed.proj"
    no_token_reduction_reason = ("each block adds the word (pixel) stream of every patch to that patch's token, so "
                                 "the patch tokens cannot be merged or dropped")

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, inner_dim: int = 48,
                 depth: int = 12, num_heads_inner: int = 4, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, first_stride: int = 4, *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, norm_layer: LayerType = nn.LayerNorm,
                 act_layer: LayerType = "gelu") -> None:
        super().__init__()
        if img_size % patch_size or patch_size % first_stride:
            raise ValueError(f"tnt: img_size {img_size} must be a multiple of patch_size {patch_size}, and "
                             f"patch_size a multiple of first_stride {first_stride}")
        self.in_chans = in_chans
        self.patch_size = self.min_input_size = self.input_multiple = patch_size
        self.grid_size = (img_size // patch_size,) * 2
        num_patches = self.grid_size[0] * self.grid_size[1]
        side = math.ceil(patch_size / first_stride)
        num_pixel = side * side
        norm = get_norm(norm_layer)

        self.pixel_embed = TNTPixelEmbed(patch_size, in_chans, inner_dim, first_stride)
        self.norm1_proj = norm(num_pixel * inner_dim)
        self.proj = nn.Linear(num_pixel * inner_dim, embed_dim)
        self.norm2_proj = norm(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_pos = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pixel_pos = nn.Parameter(torch.zeros(1, inner_dim, side, side))
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            TNTBlock(inner_dim, embed_dim, num_pixel, (side, side), num_heads_inner, num_heads, mlp_ratio, qkv_bias,
                     dpr[i], norm_layer, act_layer, first_stride) for i in range(depth)])
        self.norm = norm(embed_dim)
        self.set_feature_info([FeatureInfo(embed_dim, patch_size, f"blocks.{i}") for i in range(depth)])
        self.init_head(embed_dim, num_classes, drop_rate, pool_type="token", prefix_tokens=1)
        for p in (self.cls_token, self.patch_pos, self.pixel_pos):
            if not p.is_meta:
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image -> (words ``(B * N, words, c)``, patch tokens ``(B, 1 + N, C)`` with class token and positions)."""
        B, _, H, W = x.shape
        pixels = self.pixel_embed(x, self.pixel_pos)
        N = pixels.shape[0] // B
        patches = self.norm2_proj(self.proj(self.norm1_proj(pixels.reshape(B, N, -1))))  # -> (B, N, C)
        patches = torch.cat([self.cls_token.expand(B, -1, -1), patches], dim=1)  # -> (B, 1 + N, C)
        grid = (H // self.patch_size, W // self.patch_size)
        return pixels, patches + _patch_pos_for(self.patch_pos, grid, self.grid_size)

    def stage_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward_features(self, x: Tensor) -> Tensor:
        """Patch tokens ``(B, 1 + N, C)`` after the final norm."""
        self.check_input(x)
        state = self.forward_stem(x)
        for block in self.blocks:
            state = self.run_stage(block, state)
        return self.norm(state[1])

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """Patch tokens of the chosen blocks (before the final norm) as ``(B, C, H/p, W/p)`` maps."""
        grid = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return self.token_intermediates(x, indices, lambda state: tokens_to_map(state[1][:, 1:], grid))  # outer

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """timm keys (``head.*``) and the official ones (``outer_pos``, ``inner_attn``, ``patch_embed``, ...) -> ours.
        Keys already in our layout pass unchanged."""
        renames = (("outer_pos", "patch_pos"), ("inner_pos", "pixel_pos"), ("patch_embed", "pixel_embed"),
                   ("proj_norm1", "norm1_proj"), ("proj_norm2", "norm2_proj"), ("inner_norm1", "norm_in"),
                   ("inner_attn", "attn_in"), ("inner_norm2", "norm_mlp_in"), ("inner_mlp", "mlp_in"),
                   ("outer_norm1", "norm_out"), ("outer_attn", "attn_out"), ("outer_norm2", "norm_mlp"),
                   ("outer_mlp", "mlp"))
        official = "outer_pos" in state_dict
        out = {}
        for k, v in state_dict.items():
            if k == "outer_tokens":
                continue
            if official:
                for old, new in renames:
                    k = k.replace(old, new)
                if k == "pixel_pos" and v.ndim == 3:  # (1, words, c) -> (1, c, side, side)
                    side = math.isqrt(v.shape[1])
                    v = v.transpose(1, 2).reshape(1, -1, side, side)
            if k in ("head.weight", "head.bias"):
                k = "head.fc." + k.split(".")[1]
            out[k] = v
        return out

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resample a checkpoint's patch position table made for another square grid to this model's grid."""
        pos = state_dict.get("patch_pos")
        if pos is not None and pos.ndim == 3 and pos.shape[1] != self.patch_pos.shape[1]:
            state_dict = {**state_dict, "patch_pos": resample_abs_pos_embed(pos, self.grid_size, num_prefix_tokens=1)}
        return state_dict


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        init_trunc_normal(m, std=0.02)


_SRC = "official tnt_pytorch/readme.md table (huawei-noah/Efficient-AI-Backbones)"
VARIANTS = {
    "tnt_test":          Variant(dict(embed_dim=64, inner_dim=8, depth=2, num_heads=2, num_heads_inner=2),
                                 params_m=0.194664, input_size=64),
    "tnt_s_patch16_224": Variant(dict(embed_dim=384, inner_dim=24, depth=12, num_heads=6), params_m=23.768584,
                                 gmacs=5.245, paper=Paper(23.8, 5.2, 81.5, _SRC), mean=INCEPTION_MEAN,
                                 std=INCEPTION_STD, crop_pct=0.9),
    "tnt_b_patch16_224": Variant(dict(embed_dim=640, inner_dim=40, depth=12, num_heads=10), params_m=65.428680,
                                 gmacs=14.096, paper=Paper(65.6, 14.1, 82.9, _SRC), mean=INCEPTION_MEAN,
                                 std=INCEPTION_STD, crop_pct=0.9),
}
register_family(TNT, VARIANTS, paper="arXiv:2103.00112", kind="vit", code="timm 1.0.31 timm/models/tnt.py")
