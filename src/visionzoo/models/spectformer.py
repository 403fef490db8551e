"""SpectFormer, from "SpectFormer: Frequency and Attention is what you need in a Vision Transformer" (Patro,
Namboodiri, Agneeswaran, 2023). https://arxiv.org/abs/2304.06446

Two families, both with spectral gating blocks first (rfft2, times a learnable complex filter per channel, irfft2:
GFNet's global filter) and softmax attention blocks after:

- ``spectformer_h_*`` (``SpectFormer``): the hierarchical model of the official ``hierarchical_architecture``
  (Wave-ViT's layout, shared with SVT in ``layers/spectral_stages.py``): conv stem, four stages, spectral gating in
  stages 1-2, attention in stages 3-4, a class-attention head with token labeling's auxiliary classifier.
- ``spectformer_vit_*`` (``SpectFormerViT``): the plain ("vanilla") model: patch 16, a learned position table, the
  first 4 blocks spectral (``x + MLP(LN(filter(LN(x))))``, one residual), the others transformer blocks, LayerNorm,
  mean over tokens. Its attention blocks are ``TokenBlock`` s (token reduction works on them).

Differs from the official code (badripatro/SpectFormers; no licence file):
- The filters are built for ``img_size`` (224: 56x29 and 28x15 in SpectFormer-H, 14x8 in the vanilla model, the
  sizes the official code hard-codes) and resized bilinearly to another input's frequency grid on the fly; the
  official code runs only at 224. The vanilla position table is resampled as ViT's.
- The official vanilla ``Block_attention`` hard-codes 6 heads (its comment: 4 tiny, 6 small, 12 base), so as
  released the 256-wide T and 512-wide B cannot run; we use 4 (T), 6 (XS, S) and 8 (B, head dim 64: 12 does not
  divide 512). Heads carry no parameters.
- Training with token labeling (MixToken and the dense loss) is not reproduced: the hierarchical model returns the
  official inference output (class logits + 0.5 x max over tokens of the auxiliary logits) unless
  ``head.dense_training`` is set, then training returns ``(logits, patch_logits)``.
- Half and bfloat16 inputs are filtered in float32 and cast back (the official code keeps float32).

Export: the filters run ``torch.fft`` in eager mode and real DFT matrix products while tracing (``layers.spectral``).
MACs count the FFTs (5 N log2 N FLOPs per complex transform, half for real ones; ``visionzoo.profile``).
"""
from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, resolve_indices
from visionzoo.layers import (
    ClassAttentionHead,
    DropPath,
    LayerNorm,
    Mlp,
    PatchEmbed,
    PreNormBlock,
    SpectralGatingFilter,
    build_spectral_stages,
    conv_bn_relu_stem,
    drop_path_rates,
    init_linear,
    is_meta,
    remap_spectral_stages,
    resample_abs_pos_embed,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["SpectFormer", "SpectFormerViT"]


class SpectFormer(Backbone):
    """SpectFormer-H: conv stem, four stages (spectral gating in the first ``spectral_stages``, attention after),
    class-attention head.

    Args:
        img_size: the input size the spectral filters are built for (their grid is the stage's token grid).
        stem_hidden: channels of the conv stem.
        token_label: keep token labeling's auxiliary classifier (``head.aux_fc``), as the released models.
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    min_input_size = 32
    input_multiple = 32

    def __init__(self, dims: tuple[int, ...] = (64, 128, 320, 448), depths: tuple[int, ...] = (3, 4, 6, 3),
                 num_heads: tuple[int, ...] = (2, 4, 10, 14), mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
                 stem_hidden: int = 32, spectral_stages: int = 2, img_size: int = 224, token_label: bool = True, *,
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.stem = conv_bn_relu_stem(in_chans, stem_hidden)
        self.stages, infos = build_spectral_stages(dims, depths, num_heads, mlp_ratios, stem_hidden, img_size,
                                                   spectral_stages, SpectralGatingFilter, drop_path_rate, "spectformer")
        self.set_feature_info(infos)
        head = ClassAttentionHead(dims[-1], num_classes, num_heads[-1], mlp_ratios[-1], drop_rate, aux=token_label)
        self.init_head(dims[-1], num_classes, head=head)
        self.apply(_init_weights)

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours (``layers.remap_spectral_stages``); our own keys pass unchanged."""
        return remap_spectral_stages(state_dict)


@trace_leaf
def pos_embed_for(pos_embed: Tensor, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """The ``(1, N, D)`` position table as a ``(1, H, W, D)`` map for the patch grid of ``x`` ``(B, H, W, D)``."""
    H, W = x.shape[1:3]
    return resample_abs_pos_embed(pos_embed, (H, W), grid_size, num_prefix_tokens=0).reshape(1, H, W, -1)


class SpectFormerFilterBlock(nn.Module):
    """``x + MLP(LN(filter(LN(x))))`` on a channels-last map ``(B, H, W, C)``: one residual around both."""

    def __init__(self, dim: int, grid: tuple[int, int], mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.filter = SpectralGatingFilter(dim, grid)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.mlp(self.norm2(self.filter(self.norm1(x)))))


class SpectFormerViT(Backbone):
    """Vanilla SpectFormer: patchify, add a position table, ``spectral_layers`` filter blocks on the token map,
    transformer blocks on the tokens, LayerNorm, mean over tokens.

    Args:
        img_size: the input size the position table and the filters are built for; other sizes resample both.
        spectral_layers: how many blocks (the first ones) are spectral gating blocks (alpha in the paper).
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    takes_patch_size = True
    min_input_size = 16
    input_multiple = 16
    no_weight_decay_keys = ("pos_embed",)  # the official no_weight_decay (GFNet's)
    first_conv = "patch_embed.proj"

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, spectral_layers: int = 4, *, in_chans: int = 3,
                 num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"spectformer_vit: img_size {img_size} must be a multiple of patch_size {patch_size}")
        if not 0 <= spectral_layers <= depth:
            raise ValueError(f"spectformer_vit: spectral_layers must be in 0..depth ({depth}), got {spectral_layers}")
        self.in_chans = in_chans
        self.min_input_size = self.input_multiple = patch_size
        self.spectral_layers = spectral_layers
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC")
        grid = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            SpectFormerFilterBlock(embed_dim, grid, mlp_ratio, dpr[i]) if i < spectral_layers
            else PreNormBlock(embed_dim, num_heads, mlp_ratio, True, dpr[i]) for i in range(depth)])
        self.norm = LayerNorm(embed_dim)
        self.set_feature_info([FeatureInfo(embed_dim, patch_size, f"blocks.{i}") for i in range(depth)])
        self.init_head(embed_dim, num_classes, drop_rate, pool_type="avg")
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> Tensor:
        """Image ``(B, C, H, W)`` -> map ``(B, H/p, W/p, D)`` with position embeddings added."""
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, H', W', D)
        return self.pos_drop(x + pos_embed_for(self.pos_embed, x, self.patch_embed.grid_size))

    def stage_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def _run(self, x: Tensor, last: int) -> tuple[list[Tensor], tuple[int, int]]:
        """Outputs of blocks 0..last (maps ``(B, H, W, D)`` from filter blocks, tokens after) and the patch grid."""
        H, W = x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1]
        x = self.forward_stem(x)
        outs = []
        for i, block in enumerate(self.blocks[:last + 1]):
            if i == self.spectral_layers:
                x = x.flatten(1, 2)  # (B, H, W, D) -> (B, N, D): the attention blocks run on tokens
            x = self.run_stage(block, x)
            outs.append(x)
        return outs, (H, W)

    def forward_features(self, x: Tensor) -> Tensor:
        """Tokens ``(B, N, D)`` after the final norm."""
        self.check_input(x)
        outs, _ = self._run(x, len(self.blocks) - 1)
        x = outs[-1]
        if self.spectral_layers == len(self.blocks):
            x = x.flatten(1, 2)  # (B, H, W, D) -> (B, N, D)
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """The chosen blocks' outputs (before the final norm) as ``(B, D, H/p, W/p)`` maps."""
        idx = resolve_indices(indices, len(self.blocks), self.name)
        self.check_input(x)
        outs, (H, W) = self._run(x, idx[-1])
        maps = []
        for i in idx:
            y = outs[i]
            if i >= self.spectral_layers:
                y = y.reshape(y.shape[0], H, W, -1)  # (B, HW, D) -> (B, H, W, D)
            maps.append(y.permute(0, 3, 1, 2))  # (B, H, W, D) -> (B, D, H, W)
        return maps

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours: ``head.*`` -> ``head.fc.*``; the rest is the same."""
        return {re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k): v for k, v in state_dict.items()}

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resample a checkpoint's (square) position table made for another grid to this model's grid."""
        pos = state_dict.get("pos_embed")
        if pos is not None and pos.ndim == 3 and pos.shape[1] != self.pos_embed.shape[1]:
            side = math.isqrt(pos.shape[1])
            state_dict = dict(state_dict)
            state_dict["pos_embed"] = resample_abs_pos_embed(pos, self.patch_embed.grid_size, (side, side),
                                                             num_prefix_tokens=0)
        return state_dict


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d) and not is_meta(m):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    init_linear(m, std=0.02)


_H = "official hierarchical_architecture/README.md (224; token-labeling training)"
_V = "official vanilla_architecture/README.md (224)"
_CODE = "params: the official file (badripatro/SpectFormers@b6cf487) with 1000 classes; gmacs: fvcore on it at 224"
_FFT = ("; visionzoo.profile gives {ours}: it adds the rfft2/irfft2 that fvcore cannot see and skips the norms "
        "fvcore counts")
_HNOTE = _CODE + " (token labeling's aux head included, as released)" + _FFT
_VHEADS = "; the official code hard-codes 6 heads; we use {h} (no parameters)"

H_VARIANTS = {
    "spectformer_test": Variant(dict(dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                                     mlp_ratios=(2, 2, 2, 2), stem_hidden=8), params_m=0.282136, input_size=64,
                                notes="tiny config for tests (filter grids 16x9 and 8x5 at 64 px)"),
    "spectformer_h_s":  Variant(dict(), params_m=22.226928, gmacs=4.087, paper=Paper(22.2, 3.9, 84.3, _H),
                                notes=_HNOTE.format(ours=4.093)),
    "spectformer_h_b":  Variant(dict(dims=(64, 128, 320, 512), depths=(3, 4, 12, 3), num_heads=(2, 4, 10, 16),
                                     stem_hidden=64), params_m=33.052880, gmacs=6.638,
                                paper=Paper(33.1, 6.3, 85.0, _H), notes=_HNOTE.format(ours=6.638)),
    "spectformer_h_l":  Variant(dict(dims=(96, 192, 384, 512), depths=(3, 6, 18, 3), num_heads=(3, 6, 12, 16),
                                     stem_hidden=64), params_m=54.675792, gmacs=13.247,
                                paper=Paper(54.7, 12.7, 85.7, _H), notes=_HNOTE.format(ours=13.252)),
}
register_family(SpectFormer, H_VARIANTS, paper="arXiv:2304.06446", kind="vit", family="spectformer",
                code="badripatro/SpectFormers@b6cf487a0ea71eeb252d5ba0fc7410b3f5dbd256 "
                     "hierarchical_architecture/spectformer.py")

VIT_VARIANTS = {
    "spectformer_vit_test":   Variant(dict(embed_dim=64, depth=3, num_heads=2, spectral_layers=1), params_m=0.250216,
                                      input_size=64, notes="tiny config for tests (1 spectral + 2 attention blocks)"),
    "spectformer_vit_tiny":   Variant(dict(embed_dim=256, num_heads=4), params_m=9.158376, gmacs=1.847,
                                      paper=Paper(9, 1.8, 76.9, _V), crop_pct=0.9,
                                      notes=_CODE + _VHEADS.format(h=4) + _FFT.format(ours=1.844)),
    "spectformer_vit_xsmall": Variant(dict(embed_dim=384, num_heads=6), params_m=20.028520, gmacs=4.003,
                                      paper=Paper(22, 4.0, 80.2, _V), crop_pct=0.9,
                                      notes=_CODE + _FFT.format(ours=3.999)),
    "spectformer_vit_small":  Variant(dict(embed_dim=384, depth=19, num_heads=6), params_m=32.449768, gmacs=6.643,
                                      paper=Paper(32, 6.6, 81.7, _V), crop_pct=0.9,
                                      notes=_CODE + _FFT.format(ours=6.634) + "; trained with drop_path_rate 0.15"),
    "spectformer_vit_base":   Variant(dict(embed_dim=512, depth=19, num_heads=8), params_m=57.159656, gmacs=11.580,
                                      paper=Paper(57, 11.5, 82.1, _V), crop_pct=0.9,
                                      notes=_CODE + _VHEADS.format(h=8) + _FFT.format(ours=11.568)
                                      + "; trained with drop_path_rate 0.25"),
}
register_family(SpectFormerViT, VIT_VARIANTS, paper="arXiv:2304.06446", kind="vit", family="spectformer_vit",
                code="badripatro/SpectFormers@b6cf487a0ea71eeb252d5ba0fc7410b3f5dbd256 "
                     "vanilla_architecture/spectformer.py")
