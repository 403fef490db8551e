"""ConViT, from "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases" (d'Ascoli et al.,
ICML 2021). https://arxiv.org/abs/2103.10697

The first ``local_up_to_layer`` blocks use gated positional self-attention (GPSA): per head, a learned gate
``sigmoid(g)`` mixes content attention ``softmax(q k^T / sqrt(d))`` with positional attention
``softmax(pos_proj(r))``, where ``r = (dx, dy, dx^2 + dy^2)`` is the offset between key and query patches; the
positional heads start as a convolution-like local pattern (``local_init``). The content softmax is the attention
core's (``AttentionCore.probs``); the positional one is a plain softmax over a table of offsets (no queries or keys,
the same for every image); the core then applies the mixed map to the values in one call (as
``softmax(log(mixed))``, the mixed map itself, re-normalised as timm does), so ``record_attention`` records the map
GPSA really uses and the MACs are those of one attention. The class token joins after the GPSA blocks; the remaining
blocks are plain multi-head self-attention over ``[class, patches]`` and take token reduction
(``layers.TokenBlock``).

Differs from the paper: none. The GPSA blocks carry tokens as ``(B, H, W, C)`` maps (the relative offsets need
the grid), so other input sizes and non-square inputs work; timm fixes the input size. Follows timm's ``convit.py``
(timm 1.0.31, Apache-2.0; a port of facebookresearch/convit), whose keys we keep except ``head`` -> ``head.fc``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, resolve_indices
from visionzoo.layers import (
    AttentionCore,
    DropPath,
    LayerType,
    Mlp,
    PatchEmbed,
    PreNormBlock,
    drop_path_rates,
    get_norm,
    init_trunc_normal,
    resample_abs_pos_embed,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["ConViT"]


@trace_leaf
def rel_offsets(x: Tensor) -> Tensor:
    """``(N, N, 3)`` key-minus-query offsets ``(dx, dy, dx^2 + dy^2)`` between the patches of ``x`` ``(B, H, W, C)``,
    row-major, in ``x``'s dtype and device (one opaque node under FX)."""
    H, W = x.shape[1], x.shape[2]
    ys = torch.arange(H, device=x.device).repeat_interleave(W)
    xs = torch.arange(W, device=x.device).repeat(H)
    dx = (xs[None, :] - xs[:, None]).to(x.dtype)  # (N, N): column of the key minus column of the query
    dy = (ys[None, :] - ys[:, None]).to(x.dtype)
    return torch.stack([dx, dy, dx * dx + dy * dy], dim=-1)


@trace_leaf
def pos_embed_for(pos_embed: Tensor, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """The ``(1, H, W, C)`` position table for ``x`` ``(B, H, W, C)``: as built, or resampled from ``grid_size``."""
    H, W = x.shape[1], x.shape[2]
    return resample_abs_pos_embed(pos_embed, (H, W), grid_size, num_prefix_tokens=0).reshape(1, H, W, -1)


class GPSA(nn.Module):
    """Gated positional self-attention over a ``(B, H, W, C)`` map: a per-head gated mix of content and positional
    attention maps, applied to the values."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 locality_strength: float = 1.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.locality_strength = locality_strength
        self.attn_drop = attn_drop
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.core = AttentionCore()
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
        self.gating_param = nn.Parameter(torch.ones(num_heads))

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        N = H * W
        tokens = x.reshape(B, N, C)
        q, k = self.qk(tokens).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.v(tokens).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # -> (B, h, N, d)
        content = self.core.probs(q, k, scale=self.scale)  # (B, h, N, N)
        pos_logits = self.pos_proj(rel_offsets(x)).permute(2, 0, 1).unsqueeze(0)  # (N, N, h) -> (1, h, N, N)
        positional = pos_logits.softmax(dim=-1)  # a learned function of the offsets alone: no queries or keys
        gate = torch.sigmoid(self.gating_param).view(1, -1, 1, 1)
        mixed = (1.0 - gate) * content + gate * positional
        # the core applies the mixed map to the values: softmax(log(mixed)) is the mixed map, re-normalised
        drop = self.attn_drop if self.training else 0.0
        blank = v.new_zeros(B, self.num_heads, N, 1)  # the mixed map enters as the whole logit: no q.k term
        x = self.core(blank, blank, v, mixed.log(), scale=1.0, dropout_p=drop, grid=(H, W))
        return self.proj(x.transpose(1, 2).reshape(B, H, W, C))  # (B, h, N, d) -> (B, H, W, C)

    @torch.no_grad()
    def local_init(self) -> None:
        """Values start as the identity and each positional head as one offset of a sqrt(heads) x sqrt(heads)
        kernel (the paper's convolutional initialisation)."""
        self.v.weight.copy_(torch.eye(self.v.weight.shape[0]))
        ks = int(self.num_heads ** 0.5)
        center = (ks - 1) / 2 if ks % 2 == 0 else ks // 2
        for h1 in range(ks):
            for h2 in range(ks):
                pos = h1 + ks * h2
                self.pos_proj.weight[pos, 2] = -1
                self.pos_proj.weight[pos, 1] = 2 * (h1 - center)
                self.pos_proj.weight[pos, 0] = 2 * (h2 - center)
        self.pos_proj.weight.mul_(self.locality_strength)


class GPSABlock(nn.Module):
    """Pre-norm block with GPSA over a ``(B, H, W, C)`` map: x + gpsa(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 locality_strength: float, norm_layer: LayerType, act_layer: LayerType) -> None:
        super().__init__()
        norm = get_norm(norm_layer)
        self.norm1 = norm(dim)
        self.attn = GPSA(dim, num_heads, qkv_bias, locality_strength=locality_strength)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConViT(Backbone):
    """Patchify, add a learned position table, GPSA blocks on the patch map, then a class token and MHSA blocks.

    Args:
        img_size: the input size the position table is built for; other sizes (multiples of ``patch_size``)
            resample it on the fly.
        embed_dim: total width (timm's ``embed_dim`` is per head: ours is timm's times ``num_heads``).
        local_up_to_layer: how many leading blocks use GPSA; the class token joins after them.
        locality_strength: scale of the positional heads' local initialisation.
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    takes_patch_size = True
    min_input_size = 16
    input_multiple = 16
    no_weight_decay_keys = ("pos_embed", "cls_token")
    first_conv = "patch_embed.proj"

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 16, mlp_ratio: float = 4.0, qkv_bias: bool = False, local_up_to_layer: int = 10,
                 locality_strength: float = 1.0, *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, norm_layer: LayerType = "ln",
                 act_layer: LayerType = "gelu") -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"convit: img_size {img_size} must be a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"convit: embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if not 0 <= local_up_to_layer <= depth:
            raise ValueError(f"convit: local_up_to_layer must be in 0..depth ({depth}), got {local_up_to_layer}")
        self.in_chans = in_chans
        self.patch_size = self.min_input_size = self.input_multiple = patch_size
        self.local_up_to_layer = local_up_to_layer
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            GPSABlock(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], locality_strength, norm_layer, act_layer)
            if i < local_up_to_layer else
            PreNormBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_layer, act_layer, prefix_tokens=1)
            for i in range(depth)])
        self.norm = get_norm(norm_layer)(embed_dim)
        self.set_feature_info([FeatureInfo(embed_dim, patch_size, f"blocks.{i}") for i in range(depth)])
        self.init_head(embed_dim, num_classes, drop_rate, pool_type="token", prefix_tokens=1)
        for p in (self.cls_token, self.pos_embed):
            if not p.is_meta:
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(_init_weights)
        for m in self.modules():
            if isinstance(m, GPSA) and not m.v.weight.is_meta:
                m.local_init()

    def forward_stem(self, x: Tensor) -> Tensor:
        """Image -> patch map ``(B, H/p, W/p, C)`` with the position table added."""
        x = self.patch_embed(x)
        return x + pos_embed_for(self.pos_embed, x, self.patch_embed.grid_size)

    def stage_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def _run(self, x: Tensor, upto: int, take: list[int] | None = None) -> tuple[Tensor, list[Tensor]]:
        """Blocks ``0..upto``; the class token joins before block ``local_up_to_layer``. Also returns the patch maps
        ``(B, C, H, W)`` of blocks in ``take``."""
        B, H, W, C = x.shape
        outs = []
        for i, block in enumerate(self.blocks[:upto + 1]):
            if i == self.local_up_to_layer:
                x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, H * W, C)], dim=1)  # -> (B, 1 + N, C)
            x = self.run_stage(block, x)
            if take is not None and i in take:
                patches = x if i < self.local_up_to_layer else x[:, 1:].reshape(B, H, W, C)
                outs.append(patches.permute(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)
        return x, outs

    def forward_features(self, x: Tensor) -> Tensor:
        """Tokens ``(B, 1 + N, C)`` after the final norm."""
        self.check_input(x)
        x, _ = self._run(self.forward_stem(x), len(self.blocks) - 1)
        if self.local_up_to_layer == len(self.blocks):  # every block is GPSA: the class token joins at the end
            B, H, W, C = x.shape
            x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, H * W, C)], dim=1)
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """Patch tokens of the chosen blocks (before the final norm) as ``(B, C, H/p, W/p)`` maps."""
        idx = resolve_indices(indices, len(self.blocks), self.name)
        self.check_input(x)
        return self._run(self.forward_stem(x), idx[-1], idx)[1]

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """timm / official keys -> ours: ``head.*`` -> ``head.fc.*``; the unsaved ``rel_indices`` buffers are
        dropped. Keys already in our layout pass unchanged."""
        out = {}
        for k, v in state_dict.items():
            if k.endswith("rel_indices"):
                continue
            if k in ("head.weight", "head.bias"):
                k = "head.fc." + k.split(".")[1]
            out[k] = v
        return out

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resample a checkpoint's position table made for another square grid to this model's grid."""
        pos = state_dict.get("pos_embed")
        if pos is not None and pos.ndim == 3 and pos.shape[1] != self.pos_embed.shape[1]:
            grid = self.patch_embed.grid_size
            state_dict = {**state_dict, "pos_embed": resample_abs_pos_embed(pos, grid, num_prefix_tokens=0)}
        return state_dict


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        init_trunc_normal(m, std=0.02)


_COUNT = "counted here from timm 1.0.31's port of the official code (params; fvcore GMACs), not the paper's table"
_NV = "paper Table 1 figures not read from a stored copy of the paper here: left empty rather than recalled"
VARIANTS = {
    "convit_test":  Variant(dict(embed_dim=64, depth=3, num_heads=4, local_up_to_layer=1), params_m=0.264848,
                            input_size=64),
    "convit_tiny":  Variant(dict(embed_dim=192, num_heads=4), params_m=5.710512, gmacs=1.257,
                            paper=Paper(None, None, 73.116, "official README (facebookresearch/convit), Acc@1"),
                            notes=_NV),
    "convit_small": Variant(dict(embed_dim=432, num_heads=9), params_m=27.777322, gmacs=5.757,
                            paper=Paper(27.8, 5.76, None, _COUNT), notes=_NV),
    "convit_base":  Variant(dict(embed_dim=768, num_heads=16), params_m=86.540040, gmacs=17.524,
                            paper=Paper(86.5, 17.5, None, _COUNT), notes=_NV),
}
register_family(ConViT, VARIANTS, paper="arXiv:2103.10697", kind="vit", code="timm 1.0.31 timm/models/convit.py")
