"""CrossViT, from "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification" (Chen, Fan,
Panda, ICCV 2021). https://arxiv.org/abs/2103.14899

Two ViT branches see the image at two patch sizes: a small-patch branch (patch 12, narrower) on the input and a
large-patch branch (patch 16, wider) on a bicubic resize of it (240 -> 224 px, 408 -> 384 px). Each multi-scale
block runs ViT blocks in each branch, then fuses them by cross-attention: a branch's class token, projected to the
other branch's width, is the only query over ``[itself, the other branch's patch tokens]`` (through
``layers.AttentionCore``, ``prefix_tokens=1``), and is projected back. The logits are the mean of two classifiers,
one per branch's class token (``CrossViTHead``, a ``ClassifierHead`` subclass).

The branches' ViT blocks are plain token sequences with a class token and global attention, so they are
``layers.TokenBlock`` s and take token reduction (each branch's blocks of each multi-scale block form one sequence
for the token tools; the cross-attention reads whatever patch tokens remain).

Differs from the paper: none. ``forward_features`` returns the two branches' class tokens after their final norms,
concatenated, ``(B, C_small + C_large)`` (the branches differ in width and token count, so no one token tensor holds
both; timm returns a list); ``features_only`` gives the large branch's patch map per multi-scale block. Inputs of
another size than the model was built for (multiples of ``input_multiple``) resize per branch by the same ratio and
resample the position tables; timm fixes the input size. Follows timm's ``crossvit.py`` (timm 1.0.31, Apache-2.0;
a port of IBM/CrossViT, Apache-2.0), whose names we keep (``*_240`` / ``*_408``: the input size, where the official
names say 224 / 384) and whose keys we keep except the heads: ``head.0`` / ``head.1`` -> ``head.fc`` /
``head.fc_large``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, resolve_indices
from visionzoo.layers import (
    AttentionCore,
    ClassifierHead,
    DropPath,
    LayerType,
    PreNormBlock,
    drop_path_rates,
    get_norm,
    init_linear,
    resample_abs_pos_embed,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["CrossViT"]


@trace_leaf
def resize_by(x: Tensor, scale: float) -> Tensor:
    """``x`` ``(B, C, H, W)`` bicubic-resized by ``scale`` (as is for 1.0); one opaque node under FX."""
    size = _branch_size(x.shape[-2], x.shape[-1], scale)
    if size == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


@trace_leaf
def pos_embed_for(pos_embed: Tensor, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """The position table (class row first) for the patch map ``x`` ``(B, C, H, W)``, resampled from
    ``grid_size`` when the grids differ."""
    return resample_abs_pos_embed(pos_embed, tuple(x.shape[-2:]), grid_size, num_prefix_tokens=1)


class CrossViTPatchEmbed(nn.Module):
    """A patch-size conv, or (the dagger models) three convs 7x7/4, 3x3, 3x3 with ReLUs, for patch 12 or 16."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, multi_conv: bool) -> None:
        super().__init__()
        if not multi_conv:
            self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
            return
        if patch_size not in (12, 16):
            raise ValueError(f"crossvit: multi_conv patch embedding is defined for patch sizes 12 and 16, got "
                             f"{patch_size}")
        s2, p2, s3 = (3, 0, 1) if patch_size == 12 else (2, 1, 2)
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 4, 7, stride=4, padding=3), nn.ReLU(inplace=True),
            nn.Conv2d(dim // 4, dim // 2, 3, stride=s2, padding=p2), nn.ReLU(inplace=True),
            nn.Conv2d(dim // 2, dim, 3, stride=s3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)  # (B, C, H, W) -> (B, D, H/p, W/p)


class CrossAttention(nn.Module):
    """Multi-head attention with the class token (row 0) as the only query over all tokens ``(B, N, C)``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.core = AttentionCore(prefix_tokens=1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.wq(x[:, :1]).reshape(B, 1, h, C // h).transpose(1, 2)  # (B, 1, C) -> (B, h, 1, d)
        k = self.wk(x).reshape(B, N, h, C // h).transpose(1, 2)  # (B, N, C) -> (B, h, N, d)
        v = self.wv(x).reshape(B, N, h, C // h).transpose(1, 2)
        x = self.core(q, k, v, scale=self.scale, grid=(0, 0))  # one query, the class token: no patch queries
        return self.proj(x.transpose(1, 2).reshape(B, 1, C))  # (B, h, 1, d) -> (B, 1, C)


class CrossAttentionBlock(nn.Module):
    """The class token plus cross-attention over ``[class, other branch's patches]``; returns the class token."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, drop_path: float, norm_layer: LayerType) -> None:
        super().__init__()
        self.norm1 = get_norm(norm_layer)(dim)
        self.attn = CrossAttention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :1] + self.drop_path(self.attn(self.norm1(x)))


def _proj(in_dim: int, out_dim: int, norm_layer: LayerType) -> nn.Sequential:
    return nn.Sequential(get_norm(norm_layer)(in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))


class MultiScaleBlock(nn.Module):
    """ViT blocks in each branch, then each branch's class token attends to the other branch's patch tokens."""

    def __init__(self, dims: tuple[int, ...], depth: tuple[int, ...], num_heads: tuple[int, ...],
                 mlp_ratio: tuple[float, ...], qkv_bias: bool, drop_path: list[float], norm_layer: LayerType) -> None:
        super().__init__()
        n = len(dims)
        self.blocks = nn.ModuleList([
            nn.Sequential(*[PreNormBlock(dims[b], num_heads[b], mlp_ratio[b], qkv_bias, drop_path[i], norm_layer,
                                         prefix_tokens=1) for i in range(depth[b])]) for b in range(n)])
        self.projs = nn.ModuleList([_proj(dims[b], dims[(b + 1) % n], norm_layer) for b in range(n)])
        self.fusion = nn.ModuleList([
            CrossAttentionBlock(dims[(b + 1) % n], num_heads[(b + 1) % n], qkv_bias, drop_path[-1], norm_layer)
            for b in range(n)])
        self.revert_projs = nn.ModuleList([_proj(dims[(b + 1) % n], dims[b], norm_layer) for b in range(n)])

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        xs = [blocks(x) for blocks, x in zip(self.blocks, xs)]
        n = len(xs)
        outs = []
        for b in range(n):
            cls = self.projs[b](xs[b][:, :1])  # (B, 1, C_b) -> (B, 1, C_other)
            cls = self.fusion[b](torch.cat([cls, xs[(b + 1) % n][:, 1:]], dim=1))  # attends to the other patches
            outs.append(torch.cat([self.revert_projs[b](cls), xs[b][:, 1:]], dim=1))  # back to C_b, own patches
        return outs


class CrossViTHead(ClassifierHead):
    """One classifier per branch class token (``fc``: small-patch branch, ``fc_large``), logits averaged.

    Reads the concatenated class tokens ``(B, C_small + C_large)``; ``pre_logits`` is that concatenation."""

    fc_names = ("fc", "fc_large")

    def __init__(self, dims: tuple[int, int], num_classes: int = 1000, drop_rate: float = 0.0) -> None:
        super().__init__(sum(dims), num_classes, "", drop_rate)
        self.pool_type = "token"  # what it reads: class tokens (pooled already, in forward_features)
        self.dims = tuple(dims)
        self.reset(num_classes)

    def reset(self, num_classes: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        for name, dim in zip(self.fc_names, self.dims):
            fc = nn.Linear(dim, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()
            init_linear(fc)
            setattr(self, name, fc.train(self.training))

    def forward_pre_logits(self, x: Tensor) -> Tensor:
        return self.drop(x)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.forward_pre_logits(x)
        if pre_logits or isinstance(self.fc, nn.Identity):  # no classifier: the concatenated class tokens
            return x
        small, large = x.split(self.dims, dim=1)  # (B, C_s + C_l) -> (B, C_s), (B, C_l)
        return (self.fc(small) + self.fc_large(large)) / 2


class CrossViT(Backbone):
    """Two ViT branches (two patch sizes) fused by class-token cross-attention, one classifier per branch.

    Args:
        img_size: the input size the small-patch branch is built for.
        img_scale: per branch, the ratio its input is resized by (timm's; ``(1.0, 224 / 240)``).
        patch_size, embed_dim, num_heads: per branch.
        depth: per multi-scale block, ``(small-branch blocks, large-branch blocks, 0)`` (the last entry: the
            fusion has no MLP, as in every released model).
        mlp_ratio: per branch (a third entry, unused, as in the official configs).
        multi_conv: the dagger models' three-conv patch embedding.
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    takes_patch_size = False
    no_weight_decay_keys = ("cls_token_0", "cls_token_1", "pos_embed_0", "pos_embed_1")
    position_keys = ("pos_embed_0", "pos_embed_1")
    first_conv = "patch_embed.0.proj"

    def __init__(self, img_size: int = 240, img_scale: tuple[float, float] = (1.0, 224 / 240),
                 patch_size: tuple[int, int] = (12, 16), embed_dim: tuple[int, int] = (192, 384),
                 depth: tuple[tuple[int, int, int], ...] = ((1, 4, 0),) * 3, num_heads: tuple[int, int] = (6, 6),
                 mlp_ratio: tuple[float, ...] = (4.0, 4.0, 1.0), multi_conv: bool = False, qkv_bias: bool = True, *,
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: LayerType = "ln") -> None:
        super().__init__()
        if len(patch_size) != 2 or len(embed_dim) != 2 or len(num_heads) != 2 or len(img_scale) != 2:
            raise ValueError("crossvit: patch_size, embed_dim, num_heads and img_scale take one entry per branch (2)")
        if any(d[-1] != 0 for d in depth):
            raise ValueError(f"crossvit: depth entries end in 0 (fusion without MLP, as released), got {depth}")
        self.in_chans = in_chans
        self.img_scale = tuple(img_scale)
        self.patch_size = tuple(patch_size)
        self.input_multiple = self.min_input_size = _input_multiple(self.img_scale, self.patch_size)
        sizes = [round(img_size * s) for s in self.img_scale]
        if img_size % self.input_multiple:
            raise ValueError(f"crossvit: img_size {img_size} must be a multiple of {self.input_multiple} (each "
                             f"branch's resized input a multiple of its patch size)")
        self.grid_sizes = [(s // p, s // p) for s, p in zip(sizes, patch_size)]
        self.patch_embed = nn.ModuleList([CrossViTPatchEmbed(p, in_chans, d, multi_conv)
                                          for p, d in zip(patch_size, embed_dim)])
        for b in range(2):
            setattr(self, f"cls_token_{b}", nn.Parameter(torch.zeros(1, 1, embed_dim[b])))
            n = self.grid_sizes[b][0] * self.grid_sizes[b][1]
            setattr(self, f"pos_embed_{b}", nn.Parameter(torch.zeros(1, 1 + n, embed_dim[b])))
        per_block = [max(d[:-1]) + d[-1] for d in depth]
        dpr = drop_path_rates(drop_path_rate, sum(sum(d[-2:]) for d in depth))
        starts = [sum(per_block[:i]) for i in range(len(depth))]
        self.blocks = nn.ModuleList([
            MultiScaleBlock(tuple(embed_dim), d, tuple(num_heads), tuple(mlp_ratio), qkv_bias,
                            dpr[s:s + k] + [0.0] * max(0, k - len(dpr[s:s + k])), norm_layer)
            for d, s, k in zip(depth, starts, per_block)])
        self.norm = nn.ModuleList([get_norm(norm_layer)(d) for d in embed_dim])
        large_reduction = round(patch_size[1] / self.img_scale[1])
        self.set_feature_info([FeatureInfo(embed_dim[1], large_reduction, f"blocks.{i}") for i in range(len(depth))])
        self.init_head(sum(embed_dim), num_classes, head=CrossViTHead(tuple(embed_dim), num_classes, drop_rate))
        for b in range(2):
            for p in (getattr(self, f"cls_token_{b}"), getattr(self, f"pos_embed_{b}")):
                if not p.is_meta:
                    nn.init.trunc_normal_(p, std=0.02)
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> list[Tensor]:
        """Image -> per branch, ``(B, 1 + N_b, C_b)`` tokens: resize, patchify, class token, position table."""
        xs = []
        for b, embed in enumerate(self.patch_embed):
            t = embed(resize_by(x, self.img_scale[b]))  # (B, C, H_b, W_b) -> (B, D, H_b/p, W_b/p)
            pos = pos_embed_for(getattr(self, f"pos_embed_{b}"), t, self.grid_sizes[b])
            cls = getattr(self, f"cls_token_{b}").expand(t.shape[0], -1, -1)
            xs.append(torch.cat([cls, t.flatten(2).transpose(1, 2)], dim=1) + pos)  # -> (B, 1 + N_b, D)
        return xs

    def stage_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward_features(self, x: Tensor) -> Tensor:
        """The two class tokens after their final norms, concatenated: ``(B, C_small + C_large)``."""
        self.check_input(x)
        xs = self.forward_stem(x)
        for block in self.blocks:
            xs = self.run_stage(block, xs)
        return torch.cat([norm(t[:, 0]) for norm, t in zip(self.norm, xs)], dim=1)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """The large-patch branch's patch tokens after the chosen multi-scale blocks, as ``(B, C_l, h, w)`` maps."""
        idx = resolve_indices(indices, len(self.blocks), self.name)
        self.check_input(x)
        h, w = _branch_size(x.shape[-2], x.shape[-1], self.img_scale[1])
        h, w = h // self.patch_size[1], w // self.patch_size[1]
        xs = self.forward_stem(x)
        outs = []
        for i, block in enumerate(self.blocks[:idx[-1] + 1]):
            xs = self.run_stage(block, xs)
            if i in idx:
                t = xs[1][:, 1:]
                outs.append(t.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2))  # (B, hw, C) -> (B, C, h, w)
        return outs

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """timm keys -> ours (``head.0.*`` -> ``head.fc.*``, ``head.1.*`` -> ``head.fc_large.*``); the official repo's
        ``pos_embed.0`` / ``cls_token.0`` -> ``pos_embed_0`` / ``cls_token_0``. Ours pass unchanged."""
        out = {}
        for k, v in state_dict.items():
            if k.startswith(("pos_embed.", "cls_token.")):
                k = k.replace(".", "_")
            elif k.startswith("head.0."):
                k = "head.fc." + k[len("head.0."):]
            elif k.startswith("head.1."):
                k = "head.fc_large." + k[len("head.1."):]
            out[k] = v
        return out


def _branch_size(H: int, W: int, scale: float) -> tuple[int, int]:
    if isinstance(H, Tensor):  # TorchScript's tracer hands sizes over as 0-dim tensors, which round() refuses
        H, W = int(H), int(W)
    return round(H * scale), round(W * scale)


def _input_multiple(scales: tuple[float, ...], patches: tuple[int, ...]) -> int:
    """The smallest side every branch resizes exactly (to an integer) and to a multiple of its patch size."""
    m = patches[0]
    while any(abs(m * s - round(m * s)) > 1e-6 or round(m * s) % p for s, p in zip(scales, patches)):
        m += patches[0]
    return m


def _init_weights(m: nn.Module) -> None:
    init_linear(m, std=0.02)


_T2 = "Table 2 of arXiv:2103.14899"
_T4 = "Table 4 of arXiv:2103.14899"
_S = (1.0, 224 / 240)
_S408 = (1.0, 384 / 408)
VARIANTS = {
    "crossvit_test":          Variant(dict(img_scale=(1.0, 64 / 72), embed_dim=(32, 64), depth=((2, 2, 0),) * 2,
                                           num_heads=(2, 2), mlp_ratio=(2.0, 2.0, 1.0)),
                                      params_m=0.391344, input_size=72),
    "crossvit_tiny_240":      Variant(dict(img_scale=_S, embed_dim=(96, 192), depth=((1, 4, 0),) * 3,
                                           num_heads=(3, 3), mlp_ratio=(4.0, 4.0, 1.0)),
                                      params_m=7.014800, gmacs=1.570, paper=Paper(6.9, 1.6, 73.4, _T2),
                                      input_size=240),
    "crossvit_small_240":     Variant(dict(img_scale=_S, embed_dim=(192, 384), depth=((1, 4, 0),) * 3,
                                           num_heads=(6, 6), mlp_ratio=(4.0, 4.0, 1.0)),
                                      params_m=26.856272, gmacs=5.630, paper=Paper(26.7, 5.6, 81.0, _T2),
                                      input_size=240),
    "crossvit_base_240":      Variant(dict(img_scale=_S, embed_dim=(384, 768), depth=((1, 4, 0),) * 3,
                                           num_heads=(12, 12), mlp_ratio=(4.0, 4.0, 1.0)),
                                      params_m=105.025232, gmacs=21.220, paper=Paper(104.7, 21.2, 82.2, _T2),
                                      input_size=240),
    "crossvit_9_240":         Variant(dict(img_scale=_S, embed_dim=(128, 256), depth=((1, 3, 0),) * 3,
                                           num_heads=(4, 4), mlp_ratio=(3.0, 3.0, 1.0)),
                                      params_m=8.553296, gmacs=1.849, paper=Paper(8.6, 1.8, 73.9, _T2),
                                      input_size=240),
    "crossvit_15_240":        Variant(dict(img_scale=_S, embed_dim=(192, 384), depth=((1, 5, 0),) * 3,
                                           num_heads=(6, 6), mlp_ratio=(3.0, 3.0, 1.0)),
                                      params_m=27.528464, gmacs=5.807, paper=Paper(27.4, 5.8, 81.5, _T2),
                                      input_size=240),
    "crossvit_18_240":        Variant(dict(img_scale=_S, embed_dim=(224, 448), depth=((1, 6, 0),) * 3,
                                           num_heads=(7, 7), mlp_ratio=(3.0, 3.0, 1.0)),
                                      params_m=43.271408, gmacs=9.053, paper=Paper(43.3, 9.0, 82.5, _T2),
                                      input_size=240),
    "crossvit_9_dagger_240":  Variant(dict(img_scale=_S, embed_dim=(128, 256), depth=((1, 3, 0),) * 3,
                                           num_heads=(4, 4), mlp_ratio=(3.0, 3.0, 1.0), multi_conv=True),
                                      params_m=8.776592, gmacs=1.987, paper=Paper(8.8, 2.0, 77.1, _T2),
                                      input_size=240),
    "crossvit_15_dagger_240": Variant(dict(img_scale=_S, embed_dim=(192, 384), depth=((1, 5, 0),) * 3,
                                           num_heads=(6, 6), mlp_ratio=(3.0, 3.0, 1.0), multi_conv=True),
                                      params_m=28.209008, gmacs=6.129, paper=Paper(28.2, 6.1, 82.3, _T2),
                                      input_size=240),
    "crossvit_15_dagger_408": Variant(dict(img_scale=_S408, embed_dim=(192, 384), depth=((1, 5, 0),) * 3,
                                           num_heads=(6, 6), mlp_ratio=(3.0, 3.0, 1.0), multi_conv=True),
                                      params_m=28.500080, gmacs=21.447, paper=Paper(28.5, 21.4, 83.5, _T4),
                                      input_size=408, crop_pct=1.0),
    "crossvit_18_dagger_240": Variant(dict(img_scale=_S, embed_dim=(224, 448), depth=((1, 6, 0),) * 3,
                                           num_heads=(7, 7), mlp_ratio=(3.0, 3.0, 1.0), multi_conv=True),
                                      params_m=44.266976, gmacs=9.495, paper=Paper(44.3, 9.5, 82.8, _T2),
                                      input_size=240),
    "crossvit_18_dagger_408": Variant(dict(img_scale=_S408, embed_dim=(224, 448), depth=((1, 6, 0),) * 3,
                                           num_heads=(7, 7), mlp_ratio=(3.0, 3.0, 1.0), multi_conv=True),
                                      params_m=44.606560, gmacs=32.474, paper=Paper(44.6, 32.4, 83.9, _T4),
                                      input_size=408, crop_pct=1.0),
}
register_family(CrossViT, VARIANTS, paper="arXiv:2103.14899", kind="vit", code="timm 1.0.31 timm/models/crossvit.py")
