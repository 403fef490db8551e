"""DHVT, from "Bridging the Gap Between Vision Transformers and Convolutional Neural Networks on Small Datasets"
(Lu et al., NeurIPS 2022). https://arxiv.org/abs/2210.05958

A ViT with a class token and no position table whose three parts are replaced:

- SOPE (sequential overlapping patch embedding): a per-channel affine, log2(patch) 3x3 stride-2 convs with BatchNorm
  (GELU between them, and after the single conv at patch 2), a per-channel affine;
- HI-MHSA (head-interacting attention): per head, the mean of that head's channel group over the tokens becomes a
  "head token" (Linear to the full width, LayerNorm, GELU, a learned per-head embedding); the h head tokens join
  the sequence for one multi-head self-attention, and afterwards their mean is added to the class token;
- DAFF (dynamic aggregation feed-forward): on the patch tokens as a map, 1x1 conv + BN + GELU, a depthwise 3x3 conv +
  BN + GELU with a residual, 1x1 conv + BN; the class token skips the convs and is scaled channel-wise by a
  squeeze-excitation of the pooled output (Linear D -> D/4, GELU, Linear; no sigmoid, as in the official code).

The head tokens are placed right after the class token (the official code appends them): attention has no position
terms, so the output is the same, and the attention core then sees ``1 + heads`` prefix tokens ahead of the patch
grid. The blocks are not ``TokenBlock`` s: DAFF reshapes the patch tokens to their map inside every block, so merging
or dropping tokens (``visionzoo.tokens``) cannot apply.

Differs from the paper: none. The official code reshapes the tokens to a square map; here the map's height and width
are passed down, so non-square inputs work. SyncBatchNorm in SOPE is a BatchNorm2d (the same in eval and single-device
training). The CIFAR models have 100 classes officially: pass ``num_classes=100``.

Follows the official code, ArieSeirack/DHVT (``vision_transformer.py``, Apache-2.0), whose state-dict keys we keep
except for the classifier (``head`` -> ``head.fc``, ``DHVT.remap``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from visionzoo.backbone import Backbone, FeatureInfo, resolve_indices
from visionzoo.layers import (
    DAFF,
    SOPE,
    AttentionCore,
    DropPath,
    LayerNorm,
    drop_path_rates,
    head_tokens,
    init_linear,
    is_meta,
    square_grid,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["DHVT"]


class HIAttention(nn.Module):
    """Multi-head self-attention over class token, one head token per head, and the patch tokens."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.core = AttentionCore(prefix_tokens=1 + num_heads)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.act = nn.GELU()
        self.ht_proj = nn.Linear(self.head_dim, dim)
        self.ht_norm = nn.LayerNorm(self.head_dim)  # NOTE: eps 1e-5, as the official code
        self.pos_embed = nn.Parameter(torch.zeros(1, num_heads, dim))

    def head_tokens(self, x: Tensor) -> Tensor:
        """``(B, N, C)`` -> ``(B, heads, C)``: each head's channel group averaged over the tokens, lifted to ``C``."""
        return head_tokens(x, self.num_heads, self.ht_proj, self.ht_norm, self.act, self.pos_embed)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        B, N, C = x.shape
        h = self.num_heads
        x = torch.cat([x[:, :1], self.head_tokens(x), x[:, 1:]], dim=1)  # (B, 1 + h + N - 1, C)
        qkv = self.qkv(x).reshape(B, N + h, 3, h, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, M, 3, h, d) -> 3 x (B, h, M, d)
        drop = self.attn_drop.p if self.training else 0.0
        x = self.core(q, k, v, scale=self.scale, dropout_p=drop, grid=hw)
        x = self.proj(x.transpose(1, 2).reshape(B, N + h, C))  # (B, h, M, d) -> (B, M, C)
        cls = x[:, :1] + x[:, 1:1 + h].mean(1, keepdim=True)  # head tokens merged into the class token
        return self.proj_drop(torch.cat([cls, x[:, 1 + h:]], dim=1))


class DHVTBlock(nn.Module):
    """x + HI-MHSA(norm1(x)), then x + DAFF(norm2(x)), on ``(B, 1 + H*W, C)`` with the patch map ``hw``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = HIAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = DAFF(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        if hw is None:
            hw = square_grid(x)
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x), hw))


class DHVT(Backbone):
    """SOPE patch embedding, a class token, DHVT blocks (HI-MHSA + DAFF), a final norm, the class-token head.

    Args:
        patch_size: 16 (ImageNet), 4 or 2 (CIFAR): SOPE has log2(patch_size) strided convs.
        drop_rate: dropout in the attention projection, the position-free token dropout and before the classifier.
    """

    kind = "vit"
    has_attention = True
    takes_patch_size = True
    min_input_size = 16
    input_multiple = 16
    no_weight_decay_keys = ("cls_token",)
    first_conv = "patch_embed.proj.0.0"

    def __init__(self, patch_size: int = 16, embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads or (patch_size == 16 and embed_dim % 8) or embed_dim % 4:
            raise ValueError(f"dhvt: embed_dim {embed_dim} must divide by num_heads ({num_heads}), by 4 (DAFF's "
                             f"squeeze) and by 8 at patch 16 (SOPE's first width)")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.min_input_size = self.input_multiple = patch_size
        self.patch_embed = SOPE(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([DHVTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                               dpr[i]) for i in range(depth)])
        self.norm = LayerNorm(embed_dim)
        self.set_feature_info([FeatureInfo(embed_dim, patch_size, f"blocks.{i}") for i in range(depth)])
        self.init_head(embed_dim, num_classes, drop_rate, pool_type="token", prefix_tokens=1)
        if not self.cls_token.is_meta:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            for block in self.blocks:
                nn.init.trunc_normal_(block.attn.pos_embed, std=0.02)
        self.apply(_init_weights)

    def stage_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def _run(self, x: Tensor, upto: int, keep: list[int]) -> tuple[Tensor, list[Tensor]]:
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, D, H/p, W/p)
        B, D, H, W = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + HW, D)
        x = self.pos_drop(x)
        outs = []
        for i, block in enumerate(self.blocks[:upto + 1]):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, (H, W), use_reentrant=False)
            else:
                x = block(x, (H, W))
            if i in keep:
                outs.append(x[:, 1:].transpose(1, 2).reshape(B, D, H, W))  # (B, HW, D) -> (B, D, H, W)
        return x, outs

    def forward_features(self, x: Tensor) -> Tensor:
        """Tokens ``(B, 1 + N, D)`` (class token first) after the final norm."""
        self.check_input(x)
        x, _ = self._run(x, len(self.blocks) - 1, [])
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """Patch tokens of the chosen blocks (before the final norm) as ``(B, D, H/p, W/p)`` maps."""
        idx = resolve_indices(indices, len(self.blocks), self.name)
        self.check_input(x)
        return self._run(x, idx[-1], idx)[1]

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours: ``head.*`` -> ``head.fc.*``. Keys already in our layout pass unchanged."""
        return {("head.fc." + k.split(".")[1] if k in ("head.weight", "head.bias") else k): v
                for k, v in state_dict.items()}


def _init_weights(m: nn.Module) -> None:
    init_linear(m, std=0.02)
    if isinstance(m, nn.LayerNorm) and not is_meta(m):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


_T4 = "paper Table 4 (CIFAR-100, from scratch); params/GMACs: official README"
_T3 = "paper Table 3 (ImageNet-1k); official README (updated)"
_CIFAR = ("CIFAR-100 model (32 px); the official head has 100 classes (official count {n} M with it; params_m is "
          "with the library's default 1000-class head): create_model(..., num_classes=100)")
_CIFAR_CFG = dict(input_size=32, crop_pct=1.0, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
VARIANTS = {
    "dhvt_test":           Variant(dict(patch_size=16, embed_dim=32, depth=2, num_heads=2), params_m=0.070946,
                                   input_size=64),
    "dhvt_tiny":           Variant(dict(embed_dim=192, num_heads=3), params_m=6.267334, gmacs=1.369,
                                   paper=Paper(6.2, 1.4, 77.6, _T3 + ": 77.6 (paper Table 3: 76.5)")),
    "dhvt_small":          Variant(dict(embed_dim=384, num_heads=6), params_m=24.040606, gmacs=5.062,
                                   paper=Paper(24.0, 5.1, 82.3, _T3)),
    "dhvt_tiny_cifar_p4":  Variant(dict(patch_size=4, embed_dim=192, num_heads=4), params_m=6.18235, gmacs=0.392,
                                   paper=Paper(6.0, 0.4, None, _T4 + "; CIFAR-100 top-1 80.93"),
                                   notes=_CIFAR.format(n=6.009), **_CIFAR_CFG),
    "dhvt_small_cifar_p4": Variant(dict(patch_size=4, embed_dim=384, num_heads=8), params_m=23.77195, gmacs=1.538,
                                   paper=Paper(23.4, 1.5, None, _T4 + "; CIFAR-100 top-1 82.91"),
                                   notes=_CIFAR.format(n=23.425), **_CIFAR_CFG),
    "dhvt_tiny_cifar_p2":  Variant(dict(patch_size=2, embed_dim=192, num_heads=4), params_m=6.018862, gmacs=1.722,
                                   paper=Paper(5.8, 1.4, None, _T4 + "; CIFAR-100 top-1 83.54"),
                                   notes=_CIFAR.format(n=5.845) + "; the paper's 1.4 G MACs predate the README's fix "
                                   "of the counter (fvcore on the official file: 1.72 G)", **_CIFAR_CFG),
    "dhvt_small_cifar_p2": Variant(dict(patch_size=2, embed_dim=384, num_heads=8), params_m=23.113198, gmacs=6.23,
                                   paper=Paper(22.8, 5.6, None, _T4 + "; CIFAR-100 top-1 85.68"),
                                   notes=_CIFAR.format(n=22.767) + "; fvcore on the official file: 6.23 G MACs",
                                   **_CIFAR_CFG),
}
register_family(DHVT, VARIANTS, paper="arXiv:2210.05958", kind="vit",
                code="ArieSeirack/DHVT@a86fedab5a58 vision_transformer.py")
