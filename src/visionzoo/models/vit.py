"""ViT and DeiT: one plain Vision Transformer, with an optional distillation token.

ViT, from "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale" (Dosovitskiy et al.,
2021). https://arxiv.org/abs/2010.11929
DeiT, from "Training data-efficient image transformers & distillation through attention" (Touvron et al.,
2021). https://arxiv.org/abs/2012.12877

Differs from the papers: the tanh pre-logits layer that ViT uses only while pre-training is left out, as in the
released fine-tuned weights. A distilled model returns the mean of its two heads, in training as well, unless
``set_distilled_training(True)`` is called; then training returns ``(logits, logits_dist)``, as in timm (the
official DeiT code returns both in every training step). Inputs of another size than the model was built for
get a bicubic (antialiased) resample of the position table on the fly, as timm's ``dynamic_img_size``.

Follows timm's ``vision_transformer.py`` and ``deit.py`` (Apache-2.0), whose state-dict keys we keep except for the
head: ours is the library's one ``ClassifierHead`` (``head.fc``, ``head.norm``; DeiT's second classifier is
``head.fc_dist``), where timm has ``head``, ``fc_norm`` and ``head_dist``; ``VisionTransformer.remap`` translates
them. The official DeiT repo (facebookresearch/deit, Apache-2.0) builds its models from timm's VisionTransformer,
so its checkpoints are in timm's layout. The official ViT code is JAX (google-research/vision_transformer,
Apache-2.0); its ``.npz`` checkpoints are not read here.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, tokens_to_map
from visionzoo.layers import (
    ClassifierHead,
    LayerType,
    PatchEmbed,
    PreNormBlock,
    attn_types_per_block,
    drop_path_rates,
    get_norm,
    init_linear,
    resample_abs_pos_embed,
    trace_leaf,
)
from visionzoo.registry import INCEPTION_MEAN, INCEPTION_STD, Paper, Variant, register_family

__all__ = ["VisionTransformer"]

POOL_TYPES = ("token", "avg")


@trace_leaf
def pos_embed_for(pos_embed: Tensor, x: Tensor, grid_size: tuple[int, int], num_prefix_tokens: int) -> Tensor:
    """The position table for the patch grid of ``x`` ``(B, H, W, D)``: as is, or resampled from ``grid_size``.

    One opaque node under FX (the resample depends on the concrete grid)."""
    return resample_abs_pos_embed(pos_embed, tuple(x.shape[1:3]), grid_size, num_prefix_tokens=num_prefix_tokens)


class DeiTHead(ClassifierHead):
    """DeiT's two classifiers: ``fc`` on the class token, ``fc_dist`` on the distillation token, logits averaged.

    In training with ``distilled_training`` set, returns ``(logits, logits_dist)`` for a distillation loss.
    """

    fc_names = ("fc", "fc_dist")

    def __init__(self, in_features: int, num_classes: int = 1000, drop_rate: float = 0.0) -> None:
        super().__init__(in_features, num_classes, "token", drop_rate, prefix_tokens=2)
        self.fc_dist = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()
        self.distilled_training = False

    def forward_pre_logits(self, x: Tensor) -> Tensor:
        return (self.drop(x[:, 0]) + self.drop(x[:, 1])) / 2  # mean of the class and distillation tokens

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if pre_logits:
            return self.forward_pre_logits(x)
        x, x_dist = self.fc(self.drop(x[:, 0])), self.fc_dist(self.drop(x[:, 1]))  # (B, N, D) -> 2 x (B, classes)
        if self.distilled_training and self.training:
            return x, x_dist
        return (x + x_dist) / 2


class VisionTransformer(Backbone):
    """Patchify, prepend a class token (and a distillation token), add a learned position table, run blocks.

    Args:
        img_size: the input size the position table is built for; other sizes (multiples of ``patch_size``)
            resample it on the fly.
        distilled: add DeiT's distillation token and a second classifier (``head.fc_dist``); the logits are the
            mean of both.
        global_pool: ``"token"`` classifies the class token; ``"avg"`` averages the patch tokens, and then the
            final norm moves after the pooling (``head.norm``, timm's ``fc_norm``), as in timm.
        drop_rate: dropout before the classifier.
        attn_type: the attention of the blocks (``layers.linear_attention``): ``"softmax"`` (default),
            ``"transnormer"`` (block-diagonal softmax in the first half of the blocks, normalised linear attention
            in the rest), ``"retnet"`` (softmax with a Gaussian mixture logit mask), or one layer type
            (``"diag"``, ``"norm_linear"``, ``"gmm"``) for every block. Other than softmax, token tools refuse it.
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    takes_patch_size = True
    min_input_size = 16
    input_multiple = 16
    no_weight_decay_keys = ("pos_embed", "cls_token", "dist_token")
    first_conv = "patch_embed.proj"

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, distilled: bool = False,
                 global_pool: str = "token", *, in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_layer: LayerType = "ln", act_layer: LayerType = "gelu",
                 attn_type: str = "softmax") -> None:
        super().__init__()
        attn_types = attn_types_per_block(attn_type, depth)  # raises on an unknown attn_type
        if global_pool not in POOL_TYPES:
            raise ValueError(f"vit: global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
        if distilled and global_pool != "token":
            raise ValueError(f"vit: a distilled model reads the class and distillation tokens, so global_pool "
                             f"must be 'token', got {global_pool!r}")
        if img_size % patch_size:
            raise ValueError(f"vit: img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.min_input_size = self.input_multiple = patch_size
        self.global_pool = global_pool
        self.distilled = distilled
        self.num_prefix_tokens = 2 if distilled else 1

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, embed_dim))
        dpr = drop_path_rates(drop_path_rate, depth)
        self.attn_type = attn_type
        self.blocks = nn.Sequential(*[PreNormBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_layer,
                                                   act_layer, self.num_prefix_tokens, attn_types[i])
                                      for i in range(depth)])
        use_fc_norm = global_pool == "avg"
        norm = get_norm(norm_layer)
        self.norm = nn.Identity() if use_fc_norm else norm(embed_dim)
        self.set_feature_info([FeatureInfo(embed_dim, patch_size, f"blocks.{i}") for i in range(depth)])

        if distilled:
            self.init_head(embed_dim, num_classes, head=DeiTHead(embed_dim, num_classes, drop_rate))
        else:
            self.init_head(embed_dim, num_classes, drop_rate, norm_layer if use_fc_norm else None, global_pool,
                           prefix_tokens=self.num_prefix_tokens)
        self._init_tokens()
        self.apply(_init_weights)

    def _init_tokens(self) -> None:
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)

    # --- tokens -----------------------------------------------------------------------------------------
    def forward_stem(self, x: Tensor) -> Tensor:
        """Image ``(B, C, H, W)`` -> tokens ``(B, prefix + H/p * W/p, D)`` with position embeddings added."""
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, H/p, W/p, D)
        B, H, W, D = x.shape
        pos_embed = pos_embed_for(self.pos_embed, x, self.patch_embed.grid_size, self.num_prefix_tokens)
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(B, -1, -1))
        x = torch.cat([*prefix, x.reshape(B, H * W, D)], dim=1)  # (B, H', W', D) -> (B, prefix + H'W', D)
        return x + pos_embed

    def stage_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward_norm(self, x: Tensor) -> Tensor:
        """``forward_features`` gives tokens ``(B, N, D)`` after this final norm (the identity when
        ``global_pool="avg"``, as in timm)."""
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """Patch tokens of the chosen blocks (before the final norm) as ``(B, D, H/p, W/p)`` maps."""
        grid = x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1]
        return self.token_intermediates(x, indices, lambda t: tokens_to_map(t[:, self.num_prefix_tokens:], grid))

    # --- head -------------------------------------------------------------------------------------------
    @property
    def distilled_training(self) -> bool:
        return self.distilled and self.head.distilled_training

    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, return ``(logits, logits_dist)`` for a distillation loss instead of their mean."""
        if enable and not self.distilled:
            raise ValueError(f"{self.name}: set_distilled_training needs a model built with distilled=True")
        if self.distilled:
            self.head.distilled_training = enable

    # --- checkpoints ------------------------------------------------------------------------------------
    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """timm / official DeiT keys -> ours: ``head.*`` -> ``head.fc.*``, ``head_dist.*`` -> ``head.fc_dist.*``,
        ``fc_norm.*`` -> ``head.norm.*``. Keys already in our layout pass unchanged."""
        out = {}
        for k, v in state_dict.items():
            if k in ("head.weight", "head.bias"):
                k = "head.fc." + k.split(".")[1]
            elif k.startswith("head_dist."):
                k = "head.fc_dist." + k[len("head_dist."):]
            elif k.startswith("fc_norm."):
                k = "head.norm." + k[len("fc_norm."):]
            out[k] = v
        return out

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resample a checkpoint's position table made for another (square) grid to this model's grid."""
        pos = state_dict.get("pos_embed")
        if pos is not None and pos.ndim == 3 and pos.shape[1] != self.pos_embed.shape[1]:
            side = math.isqrt(pos.shape[1] - self.num_prefix_tokens)
            if side * side == pos.shape[1] - self.num_prefix_tokens:
                state_dict = dict(state_dict)
                state_dict["pos_embed"] = resample_abs_pos_embed(pos, self.patch_embed.grid_size, (side, side),
                                                                 num_prefix_tokens=self.num_prefix_tokens)
        return state_dict


def _init_weights(m: nn.Module) -> None:
    init_linear(m, std=0.02)


_I21K = "timm weights: augreg_in21k_ft_in1k (arXiv:2106.10270)"
_T1 = "paper Table 1 (params)"
_AUGREG = "not in the ViT paper; official README, AugReg table (I21k pre-training, fine-tuned at 384)"
VIT_VARIANTS = {
    "vit_test":              Variant(dict(embed_dim=64, depth=2, num_heads=2), params_m=0.215464, input_size=64),
    "vit_tiny_patch16_224":  Variant(dict(embed_dim=192, depth=12, num_heads=3), params_m=5.717416, gmacs=1.26,
                                     paper=Paper(None, None, 78.22, _AUGREG, img_size=384),
                                     mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_pct=0.9, notes=_I21K),
    "vit_small_patch16_224": Variant(dict(embed_dim=384, depth=12, num_heads=6), params_m=22.050664, gmacs=4.61,
                                     paper=Paper(None, None, 83.73, _AUGREG, img_size=384),
                                     mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_pct=0.9, notes=_I21K),
    "vit_base_patch16_224":  Variant(dict(embed_dim=768, depth=12, num_heads=12), params_m=86.567656, gmacs=17.58,
                                     paper=Paper(86, None, 81.2, f"{_T1}; official README (I21k, fine-tuned at 224)"),
                                     mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_pct=0.9,
                                     notes="timm weights: augreg2_in21k_ft_in1k"),
    "vit_large_patch16_224": Variant(dict(embed_dim=1024, depth=24, num_heads=16), params_m=304.326632, gmacs=61.6,
                                     paper=Paper(307, None, 82.7, f"{_T1}; official README (I21k, fine-tuned at 224)"),
                                     mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_pct=0.9, notes=_I21K),
    "vit_base_patch16_384":  Variant(dict(embed_dim=768, depth=12, num_heads=12), params_m=86.859496, gmacs=55.54,
                                     paper=Paper(86, None, 83.97, f"{_T1}; Table 5 (I21k pre-training, 384)"),
                                     input_size=384, mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_pct=1.0,
                                     notes=_I21K + "; official README AugReg top-1 at 384: 85.49"),
    "vit_large_patch16_384": Variant(dict(embed_dim=1024, depth=24, num_heads=16), params_m=304.715752, gmacs=191.21,
                                     paper=Paper(307, None, 85.15, f"{_T1}; Table 5 (I21k pre-training, 384)"),
                                     input_size=384, mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_pct=1.0,
                                     notes=_I21K + "; official README AugReg top-1 at 384: 85.59"),
    "vit_base_patch32_224":  Variant(dict(patch_size=32, embed_dim=768, depth=12, num_heads=12), params_m=88.224232,
                                     gmacs=4.41, paper=Paper(None, None, 83.59, _AUGREG, img_size=384),
                                     mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_pct=0.9, notes=_I21K),
}
register_family(VisionTransformer, VIT_VARIANTS, paper="arXiv:2010.11929", kind="vit", family="vit")

_README = "official README_deit.md"
_CROSSVIT = "top-1: official README_deit.md; params, FLOPs: DeiT paper values quoted in CrossViT Table 2"
DEIT_VARIANTS = {
    "deit_test":                        Variant(dict(embed_dim=64, depth=2, num_heads=2, distilled=True),
                                                params_m=0.280592, input_size=64),
    "deit_tiny_patch16_224":            Variant(dict(embed_dim=192, depth=12, num_heads=3), params_m=5.717416,
                                                gmacs=1.26, paper=Paper(5.7, 1.3, 72.2, _CROSSVIT), crop_pct=0.9),
    "deit_small_patch16_224":           Variant(dict(embed_dim=384, depth=12, num_heads=6), params_m=22.050664,
                                                gmacs=4.61, paper=Paper(22.1, 4.6, 79.9, _CROSSVIT), crop_pct=0.9),
    "deit_base_patch16_224":            Variant(dict(embed_dim=768, depth=12, num_heads=12), params_m=86.567656,
                                                gmacs=17.58, paper=Paper(86.6, 17.6, 81.8, _CROSSVIT), crop_pct=0.9),
    "deit_base_patch16_384":            Variant(dict(embed_dim=768, depth=12, num_heads=12), params_m=86.859496,
                                                gmacs=55.54, paper=Paper(87, None, 82.9, _README), input_size=384,
                                                crop_pct=1.0),
    "deit_tiny_distilled_patch16_224":  Variant(dict(embed_dim=192, depth=12, num_heads=3, distilled=True),
                                                params_m=5.910800, gmacs=1.27, paper=Paper(6, None, 74.5, _README),
                                                crop_pct=0.9),
    "deit_small_distilled_patch16_224": Variant(dict(embed_dim=384, depth=12, num_heads=6, distilled=True),
                                                params_m=22.436432, gmacs=4.63, paper=Paper(22, None, 81.2, _README),
                                                crop_pct=0.9),
    "deit_base_distilled_patch16_224":  Variant(dict(embed_dim=768, depth=12, num_heads=12, distilled=True),
                                                params_m=87.338192, gmacs=17.68, paper=Paper(87, None, 83.4, _README),
                                                crop_pct=0.9),
    "deit_base_distilled_patch16_384":  Variant(dict(embed_dim=768, depth=12, num_heads=12, distilled=True),
                                                params_m=87.630032, gmacs=55.65, paper=Paper(88, None, 85.2, _README),
                                                input_size=384, crop_pct=1.0, notes="1000 training epochs"),
}
register_family(VisionTransformer, DEIT_VARIANTS, paper="arXiv:2012.12877", kind="vit", family="deit")
