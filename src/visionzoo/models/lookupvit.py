"""LookupViT, from "LookupViT: Compressing visual information to a limited number of tokens" (Koner, Jain, Jain,
Tresp, Paul, ECCV 2024). https://arxiv.org/abs/2407.12753

Two token sets: many lookup tokens (the patch grid) and a few compressed tokens (the patch grid resized to a small
fixed grid). Each block (the paper's section 3) (1) gathers: the compressed tokens cross-attend to the lookup
tokens; (2) refines: self-attention and a wide MLP on the compressed tokens only; (3) scatters: the lookup tokens
receive the refined compressed tokens through the transpose of step 1's attention matrix (multi-head bidirectional
cross-attention, MHBC: one attention map used both ways), then a narrow MLP.

No official code exists; this file is built from the paper's text (lucidrains' unofficial ``look_vit.py`` was read
as an aid only). Choices where the text we could read is silent, recorded in the variant notes: compressed tokens
come from a bilinear resize of the position-embedded lookup grid (no extra table); one width for both sets; the
lookup MLP ratio (``lookup_mlp_ratio``, 1.0 here against 4.0 for the compressed tokens); the classifier averages
the compressed tokens after a final norm. Both directions of MHBC compute from one map: step 1 runs through the
block's ``AttentionCore`` (so tools record, bias and quantise it), and step 3 takes the same probabilities from
``AttentionCore.probs`` (the fused path returns no probabilities, so ``q k^T`` is computed twice).

Blocks work on one tensor ``(B, M + N, D)``: the M compressed tokens, then the N lookup tokens of the patch grid,
so each block is a stage whose lookup part is an ``(H/p, W/p)`` map. The blocks are not ``TokenBlock`` s (two token
sets, the compressed one a resize of the grid), so token reduction does not apply.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, resolve_indices
from visionzoo.layers import (
    Attention,
    AttentionCore,
    ClassifierHead,
    DropPath,
    LayerType,
    Mlp,
    PatchEmbed,
    drop_path_rates,
    get_norm,
    init_linear,
    resample_abs_pos_embed,
    to_2tuple,
    trace_leaf,
)
from visionzoo.registry import Variant, register_family

__all__ = ["LookupViT"]


class BidirectionalCrossAttention(nn.Module):
    """MHBC: compressed queries attend to lookup keys (gather); the transposed map carries the compressed values
    back to the lookup tokens (scatter)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"lookupvit: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)  # on the compressed tokens
        self.kv = nn.Linear(dim, 2 * dim)  # keys and gather values, on the lookup tokens
        self.v_scatter = nn.Linear(dim, dim)  # scatter values, on the compressed tokens
        self.proj = nn.Linear(dim, dim)  # gather output
        self.proj_scatter = nn.Linear(dim, dim)  # scatter output
        self.core = AttentionCore()

    def _heads(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return x.reshape(B, N, -1, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # -> (n, B, h, N, d)

    def gather(self, compressed: Tensor, lookup: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """The gather output ``(B, M, D)``, with the queries and keys ``(B, h, M|N, d)`` the scatter reuses."""
        B, M, D = compressed.shape
        q = self._heads(self.q(compressed))[0]
        k, v = self._heads(self.kv(lookup)).unbind(0)
        x = self.core(q, k, v, scale=self.scale, grid=grid)
        return self.proj(x.transpose(1, 2).reshape(B, M, D)), q, k  # (B, h, M, d) -> (B, M, D)

    def scatter(self, compressed: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """The scatter output ``(B, N, D)``: ``A^T V_c`` with ``A`` the gather map ``(B, h, M, N)``."""
        B, N = k.shape[0], k.shape[2]
        probs = self.core.probs(q, k, scale=self.scale)  # (B, h, M, N)
        v = self._heads(self.v_scatter(compressed))[0]  # (B, h, M, d)
        x = probs.transpose(-2, -1) @ v  # (B, h, N, M) @ (B, h, M, d) -> (B, h, N, d)
        return self.proj_scatter(x.transpose(1, 2).reshape(B, N, -1))  # (B, h, N, d) -> (B, N, D)


class LookupViTHead(ClassifierHead):
    """The mean of the compressed tokens plus the mean of the lookup tokens, then the classifier."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float, num_compressed: int) -> None:
        super().__init__(in_features, num_classes, "avg", drop_rate)
        self.num_compressed = num_compressed

    def pool(self, x: Tensor) -> Tensor:
        return x[:, :self.num_compressed].mean(1) + x[:, self.num_compressed:].mean(1)  # (B, M + N, D) -> (B, D)


class LookupViTBlock(nn.Module):
    """Gather into the compressed tokens, refine them (self-attention + MLP), scatter back, narrow lookup MLP."""

    def __init__(self, dim: int, num_heads: int, num_compressed: int, compressed_grid: tuple[int, int],
                 mlp_ratio: float = 4.0, lookup_mlp_ratio: float = 1.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_layer: LayerType = "ln", act_layer: LayerType = "gelu") -> None:
        super().__init__()
        norm = get_norm(norm_layer)
        self.num_compressed = num_compressed
        self.compressed_grid = compressed_grid
        self.norm_c = norm(dim)
        self.norm_l = norm(dim)
        self.cross = BidirectionalCrossAttention(dim, num_heads)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.norm_c2 = norm(dim)
        self.norm_l3 = norm(dim)
        self.mlp_lookup = Mlp(dim, int(dim * lookup_mlp_ratio), act_layer=act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        c, lookup = x[:, :self.num_compressed], x[:, self.num_compressed:]  # (B, M + N, D) -> (B, M, D), (B, N, D)
        gathered, q, k = self.cross.gather(self.norm_c(c), self.norm_l(lookup), self.compressed_grid)
        c = c + self.drop_path(gathered)
        c = c + self.drop_path(self.attn(self.norm1(c), grid=self.compressed_grid))
        c = c + self.drop_path(self.mlp(self.norm2(c)))
        lookup = lookup + self.drop_path(self.cross.scatter(self.norm_c2(c), q, k))
        lookup = lookup + self.drop_path(self.mlp_lookup(self.norm_l3(lookup)))
        return torch.cat([c, lookup], dim=1)


@trace_leaf
def _pos_embed_for(pos_embed: Tensor, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """The ``(1, H*W, D)`` position table for the patch grid of ``x`` ``(B, H, W, D)``."""
    return resample_abs_pos_embed(pos_embed, tuple(x.shape[1:3]), grid_size, num_prefix_tokens=0)


class LookupViT(Backbone):
    """Patchify (lookup tokens), resize to a few compressed tokens, run LookupViT blocks, classify both token sets.

    Args:
        img_size: the input size the position table is built for; other sizes resample it on the fly.
        compressed_grid: the ``(h, w)`` grid of compressed tokens (fixed for every input size).
        lookup_mlp_ratio: hidden width of the lookup tokens' MLP, as a multiple of ``embed_dim``.
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    takes_patch_size = True
    min_input_size = 16
    input_multiple = 16
    no_weight_decay_keys = ("pos_embed",)
    first_conv = "patch_embed.proj"

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, compressed_grid: int | tuple[int, int] = 7, mlp_ratio: float = 4.0,
                 lookup_mlp_ratio: float = 1.0, qkv_bias: bool = True, *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, norm_layer: LayerType = "ln",
                 act_layer: LayerType = "gelu") -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"lookupvit: img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.compressed_grid = to_2tuple(compressed_grid)
        if min(self.compressed_grid) < 1:
            raise ValueError(f"lookupvit: compressed_grid must be positive, got {compressed_grid!r}")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.min_input_size = self.input_multiple = patch_size
        self.num_compressed = self.compressed_grid[0] * self.compressed_grid[1]
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC")
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            LookupViTBlock(embed_dim, num_heads, self.num_compressed, self.compressed_grid, mlp_ratio,
                           lookup_mlp_ratio, qkv_bias, dpr[i], norm_layer, act_layer) for i in range(depth)])
        self.norm = get_norm(norm_layer)(embed_dim)
        self.set_feature_info([FeatureInfo(embed_dim, patch_size, f"blocks.{i}") for i in range(depth)])
        head = LookupViTHead(embed_dim, num_classes, drop_rate, self.num_compressed)
        self.init_head(embed_dim, num_classes, head=head)
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> Tensor:
        """Image -> ``(B, M + N, D)``: M compressed tokens (a bilinear resize of the grid), then N lookup tokens."""
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, H/p, W/p, D)
        B, H, W, D = x.shape
        lookup = x.reshape(B, H * W, D) + _pos_embed_for(self.pos_embed, x, self.patch_embed.grid_size)
        grid = lookup.transpose(1, 2).reshape(B, D, H, W)  # (B, HW, D) -> (B, D, H, W)
        compressed = F.interpolate(grid, size=self.compressed_grid, mode="bilinear", align_corners=False)
        return torch.cat([compressed.flatten(2).transpose(1, 2), lookup], dim=1)  # -> (B, M + HW, D)

    def stage_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward_norm(self, x: Tensor) -> Tensor:
        """``forward_features`` gives all tokens ``(B, M + N, D)`` after this final norm: the compressed ones, then
        the lookup grid."""
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """The lookup tokens of the chosen blocks as ``(B, D, H/p, W/p)`` maps."""
        idx = resolve_indices(indices, len(self.blocks), self.name)
        self.check_input(x)
        H, W = x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1]
        x = self.forward_stem(x)
        outs = []
        for i, block in enumerate(self.blocks[:idx[-1] + 1]):
            x = self.run_stage(block, x)
            if i in idx:
                lookup = x[:, self.num_compressed:]
                outs.append(lookup.reshape(x.shape[0], H, W, -1).permute(0, 3, 1, 2))  # -> (B, D, H, W)
        return outs


def _init_weights(m: nn.Module) -> None:
    init_linear(m, std=0.02)


_NOTES = ("built from the paper's text (section 3: gather, refine, scatter with one attention map), no official "
          "code. Choices the text we could read leaves open: compressed tokens = bilinear resize of the "
          "position-embedded lookup grid; one width for both token sets; lookup MLP ratio 1.0; classifier on the "
          "mean of the normed compressed tokens plus that of the normed lookup tokens. The paper's "
          "variant table could not be read here, so only the "
          "test configuration is registered; other sizes are built with embed_dim/depth/num_heads/compressed_grid")
VARIANTS = {
    "lookupvit_test": Variant(dict(embed_dim=32, depth=2, num_heads=2, compressed_grid=2), params_m=0.101,
                              input_size=64, notes=_NOTES),
}
register_family(LookupViT, VARIANTS, paper="arXiv:2407.12753", kind="vit", code=None)
