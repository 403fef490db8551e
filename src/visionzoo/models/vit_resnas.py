"""ViT-ResNAS, from "Searching for Efficient Multi-Stage Vision Transformers" (Liao, Karaman, Sze, 2021).
https://arxiv.org/abs/2109.00642

A multi-stage ViT ("ViT-Res"): a convolutional patch stem (three 3x3 conv-BN-ReLU with a residual over the last two,
then a 7x7 stride-7 projection: patch 14), a class token and a position table, then three stages of pre-norm
transformer blocks whose heads (head dim 32 / 48 / 64 per stage) and MLP widths vary per block, as found by the
paper's evolutionary search. Between stages a residual spatial reduction: LayerNorm, then a 3x3 stride-2 conv on the
token map plus a new position table, and a Linear on the class token; the residual path average-pools the map 2x2
and zero-pads both to the wider width. The class token is carried through every stage and classified.

Differs from the official code (yilunliao/vit-search, MIT): the super-network machinery (channel and layer drop,
masked LayerNorm with masks) is not needed by the searched networks and is left out. The released training adds a
patch-token classifier (``patch_output``, for ShiftTokenMixup): it is ``head.patch_fc`` here (its parameters are
in the official count); inference uses the class token only, as the official code does, and with
``head.patch_training`` set training returns ``(logits, patch_logits)``. Inputs of another size than ``img_size``
(a multiple of 56) get the position tables resampled (bicubic), where the official code runs only at 224.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    Attention,
    ClassifierHead,
    DropPath,
    LayerNorm,
    Mlp,
    drop_path_rates,
    init_linear,
    is_meta,
    resample_abs_pos_embed,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["ViTResNAS"]


@trace_leaf
def pos_embed_for(pos_embed: Tensor, x: Tensor, grid_size: tuple[int, int], prefix: int) -> Tensor:
    """The ``(1, prefix + h*w, C)`` table for the ``(B, C, H, W)`` map ``x``: as is, or resampled from ``grid_size``."""
    return resample_abs_pos_embed(pos_embed, tuple(x.shape[2:]), grid_size, num_prefix_tokens=prefix)


def _tokens(fmap: Tensor, cls: Tensor) -> Tensor:
    return torch.cat([cls, fmap.flatten(2).transpose(1, 2)], dim=1)  # (B, C, H, W) -> (B, 1 + HW, C)


def _split(x: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """Tokens ``(B, 1 + HW, C)`` -> the ``(B, C, H, W)`` map (H, W of ``like``) and the class token ``(B, 1, C)``."""
    fmap = x[:, 1:].transpose(1, 2).reshape(x.shape[0], x.shape[2], like.shape[2], like.shape[3])
    return fmap, x[:, :1]


class ViTResNASConvBnAct(nn.Module):
    """Conv 3x3 (no bias), BatchNorm, ReLU."""

    fuse_pairs = (("conv", "bn"),)

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class ViTResNASStem(nn.Module):
    """conv1 (stride 2), conv2 + conv3 with a residual, then a ``patch/2``-sized projection: stride ``patch``."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 14, mid_chans: int = 24) -> None:
        super().__init__()
        self.conv1 = ViTResNASConvBnAct(in_chans, mid_chans, 2)
        self.conv2 = ViTResNASConvBnAct(mid_chans, mid_chans)
        self.conv3 = ViTResNASConvBnAct(mid_chans, mid_chans)
        self.conv_proj = nn.Conv2d(mid_chans, dim, patch_size // 2, stride=patch_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return self.conv_proj(x + self.conv3(self.conv2(x)))


class ViTResNASReduction(nn.Module):
    """Residual spatial reduction of the map (2x) and the class token, widening ``in_dim`` -> ``dim``."""

    def __init__(self, in_dim: int, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        if dim < in_dim:
            raise ValueError(f"vit_resnas: a reduction widens the tokens; got {in_dim} -> {dim} channels")
        self.grid = grid  # the output grid at the build size, for the position table
        self.norm = LayerNorm(in_dim)
        self.patch_reduce = nn.Conv2d(in_dim, dim, 3, stride=2, padding=1)
        self.patch_pool = nn.AvgPool2d(2, 2)
        self.token_transform = nn.Linear(in_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        self.pad = dim - in_dim

    def forward(self, fmap: Tensor, cls: Tensor) -> tuple[Tensor, Tensor]:
        x = self.norm(_tokens(fmap, cls))
        normed_map, normed_cls = _split(x, fmap)
        y = self.patch_reduce(normed_map)  # (B, C, H, W) -> (B, C', H/2, W/2)
        pos = pos_embed_for(self.pos_embed, y, self.grid, 0).transpose(1, 2)  # (1, HW, C') -> (1, C', HW)
        y = y + pos.reshape(1, y.shape[1], y.shape[2], y.shape[3])
        y = y + F.pad(self.patch_pool(fmap), (0, 0, 0, 0, 0, self.pad))  # residual, zero-padded channels
        cls = self.token_transform(normed_cls) + F.pad(cls, (0, self.pad))
        return y, cls


class ViTResNASBlock(nn.Module):
    """Pre-norm transformer block with ``heads x head_dim`` attention width and ``hidden`` MLP width."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, hidden: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True, head_dim=head_dim, prefix_tokens=1)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTResNASStage(nn.Module):
    """Optional reduction, then blocks over the class token and the map's tokens; ``(map, cls)`` in and out."""

    def __init__(self, in_dim: int, dim: int, heads: tuple[int, ...], head_dim: int, hidden: tuple[int, ...],
                 grid: tuple[int, int], drop_path: list[float], reduce: bool) -> None:
        super().__init__()
        self.downsample = ViTResNASReduction(in_dim, dim, grid) if reduce else None
        self.blocks = nn.ModuleList([ViTResNASBlock(dim, h, head_dim, m, dp)
                                     for h, m, dp in zip(heads, hidden, drop_path)])

    def forward(self, x: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        fmap, cls = x
        if self.downsample is not None:
            fmap, cls = self.downsample(fmap, cls)
        t = _tokens(fmap, cls)
        for block in self.blocks:
            t = block(t)
        return _split(t, fmap)


class ViTResNASHead(ClassifierHead):
    """LayerNorm and ``fc`` on the class token; ``patch_fc`` classifies the patch tokens when ``patch_training`` is
    set in training (ShiftTokenMixup's target), returning ``(logits, patch_logits)``."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0, patch_output: bool = True) -> None:
        super().__init__(in_features, num_classes, "token", drop_rate, norm_layer="ln", prefix_tokens=1)
        self.fc_names = ("fc", "patch_fc") if patch_output else ("fc",)
        self.patch_fc = (nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()) \
            if patch_output else None
        self.patch_training = False

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if self.patch_fc is not None and self.patch_training and self.training and not pre_logits:
            x = self.drop(self.norm(x))
            return self.fc(x[:, 0]), self.patch_fc(x[:, 1:])
        return super().forward(x, pre_logits)


class ViTResNAS(Backbone):
    """Multi-stage ViT with residual spatial reductions and searched per-block widths.

    Args:
        dims: token width per stage.
        num_heads, mlp_hidden: per stage, one entry per block (the searched values).
        head_dims: attention head width per stage.
        img_size: the input size the position tables are built for (other multiples of 56 resample them).
        stem_chans: channels of the conv stem.
        patch_output: build the patch-token classifier ``head.patch_fc`` (the released training's ShiftTokenMixup
            head; in the official count). It runs only in training with ``head.patch_training`` set.
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    min_input_size = 56
    input_multiple = 56
    no_weight_decay_keys = ("cls_token",)  # the official no_weight_decay: its class token only
    first_conv = "patch_embed.conv1.conv"

    def __init__(self, dims: tuple[int, ...] = (176, 352, 704),
                 num_heads: tuple[tuple[int, ...], ...] = ((3, 3, 3, 4, 4), (10, 8, 8, 8, 10, 10), (10, 10, 10, 8, 8)),
                 mlp_hidden: tuple[tuple[int, ...], ...] = ((704, 576, 640, 576, 704), (1408, 1408, 1280, 1408, 1280,
                                                            1024), (2560, 1792, 2816, 2816, 2560)),
                 head_dims: tuple[int, ...] = (32, 48, 64), img_size: int = 224, patch_size: int = 14,
                 stem_chans: int = 24, patch_output: bool = True, *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        n = len(dims)
        if not len(num_heads) == len(mlp_hidden) == len(head_dims) == n or any(
                len(h) != len(m) for h, m in zip(num_heads, mlp_hidden)):
            raise ValueError(f"vit_resnas: dims {tuple(dims)}, num_heads, mlp_hidden and head_dims need one entry per "
                             f"stage, and num_heads/mlp_hidden one per block: got {num_heads} and {mlp_hidden}")
        if img_size % (patch_size * 2 ** (n - 1)):
            raise ValueError(f"vit_resnas: img_size {img_size} must be a multiple of {patch_size * 2 ** (n - 1)}")
        self.in_chans = in_chans
        self.min_input_size = self.input_multiple = patch_size * 2 ** (n - 1)
        self.patch_embed = ViTResNASStem(in_chans, dims[0], patch_size, stem_chans)
        side = img_size // patch_size
        self.grid_size = (side, side)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[0]))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + side * side, dims[0]))
        dpr = drop_path_rates(drop_path_rate, tuple(len(h) for h in num_heads))
        stages, infos, in_dim = [], [], dims[0]
        for i, dim in enumerate(dims):
            grid = (side // 2**i, side // 2**i)
            stages.append(ViTResNASStage(in_dim, dim, num_heads[i], head_dims[i], mlp_hidden[i], grid, dpr[i], i > 0))
            infos.append(FeatureInfo(dim, patch_size * 2**i, f"stages.{i}"))
            in_dim = dim
        self.stages = nn.ModuleList(stages)
        self.set_feature_info(infos)
        self.init_head(dims[-1], num_classes, head=ViTResNASHead(dims[-1], num_classes, drop_rate, patch_output))
        for p in [self.cls_token, self.pos_embed] + [s.downsample.pos_embed for s in stages if s.downsample]:
            if not p.is_meta:
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image -> ``(map (B, C, H/14, W/14), class token (B, 1, C))``, position table added to both."""
        fmap = self.patch_embed(x)
        t = _tokens(fmap, self.cls_token.expand(x.shape[0], -1, -1))
        return _split(t + pos_embed_for(self.pos_embed, fmap, self.grid_size, 1), fmap)

    def stage_to_nchw(self, x: tuple[Tensor, Tensor]) -> Tensor:
        return x[0]

    def forward_norm(self, x: tuple[Tensor, Tensor]) -> Tensor:
        """The last stage's class token and map tokens ``(B, 1 + HW, C)``; the norm is the head's (on the class
        token; LayerNorm is per token, so that equals the official norm over all tokens)."""
        return _tokens(*x)

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours: the flat ``blocks.k`` (transformer blocks and reductions in network order) ->
        ``stages.s.blocks.j`` / ``stages.s.downsample``; ``tokens`` -> ``cls_token``; ``norm`` -> ``head.norm``;
        ``cls_head`` / ``patch_head`` -> ``head.fc`` / ``head.patch_fc``. Our own keys pass unchanged."""
        flat = sorted({int(m[1]) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k))})
        reductions = {int(m[1]) for k in state_dict
                      if (m := re.match(r"^blocks\.(\d+)\.(patch_reduce\.|token_transform\.|pos_embed$)", k))}
        where, stage, j = {}, 0, 0
        for k in flat:
            if k in reductions:
                stage, j = stage + 1, 0
                where[k] = f"stages.{stage}.downsample."
            else:
                where[k] = f"stages.{stage}.blocks.{j}."
                j += 1
        out = {}
        for k, v in state_dict.items():
            if m := re.match(r"^blocks\.(\d+)\.", k):
                k = where[int(m[1])] + k[m.end():]
            k = re.sub(r"^tokens$", "cls_token", k)
            k = re.sub(r"^norm\.", "head.norm.", k)
            k = re.sub(r"^cls_head\.", "head.fc.", k)
            out[re.sub(r"^patch_head\.", "head.patch_fc.", k)] = v
        return out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d) and not is_meta(m):
        nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5)  # torch's default (the official code leaves convs as built)
    init_linear(m, std=0.02)


def _net(dims: tuple[int, ...], heads: tuple[tuple[int, ...], ...], hidden: tuple[tuple[int, ...], ...]) -> dict:
    return dict(dims=dims, num_heads=heads, mlp_hidden=hidden)


_SRC = ("searched network_def of the official scripts/vit-sr-nas/searched_net/{f}.sh (yilunliao/vit-search@303e7c3); "
        "params and gmacs: the official FlexibleDistillVisionTransformerSR with that network_def and patch_output "
        "(patch_head included), fvcore at 224. Paper top-1 not verified here (no readable table).")
_ABS = "abstract of arXiv:2109.00642"
VARIANTS = {
    "vit_resnas_test":   Variant(_net((32, 48, 64), ((1,), (2,), (2,)), ((64,), (96,), (128,))) | dict(
        head_dims=(16, 24, 32), stem_chans=8, patch_output=False), params_m=0.187600, input_size=112,
                                 notes="tiny config for tests (112 px: 8x8, 4x4, 2x2 token maps; no patch head, "
                                       "which trains only with ShiftTokenMixup)"),
    "vit_resnas_tiny":   Variant(dict(), params_m=41.498552, gmacs=1.789, notes=_SRC.format(f="tiny"),
                                 paper=Paper(None, None, 80.8, _ABS + " (8.6 points above DeiT-Ti's 72.2)")),
    "vit_resnas_small":  Variant(_net((220, 440, 880), ((5, 5, 7, 5, 5, 5), (10, 10, 10, 10, 12, 12),
                                                        (16, 12, 16, 12, 14)),
                                      ((880, 880, 800, 720, 720, 720), (1760, 1440, 1920, 1600, 1600, 1440),
                                       (3200, 3200, 2880, 2240, 2560))),
                                 params_m=64.605108, gmacs=2.854, notes=_SRC.format(f="small_mac@2.9G"),
                                 paper=Paper(None, 2.9, 81.8, _ABS + " ('similar accuracy to DeiT-B', 81.8: "
                                             "approximate); MACs: the searched budget, mac@2.9G")),
    "vit_resnas_medium": Variant(_net((240, 640, 880), ((7, 6, 7, 8, 7, 8, 6), (10, 14, 14, 16, 14, 16, 16),
                                                        (16, 10, 16, 12, 16, 14)),
                                      ((960, 960, 800, 960, 880, 880, 800), (1120, 1760, 1920, 1760, 1440, 1760, 1920),
                                       (3200, 3840, 3840, 3200, 3520, 3520))),
                                 params_m=97.323672, gmacs=4.524, notes=_SRC.format(f="medium_mac@4.6G"),
                                 paper=Paper(97.3, 4.6, None, "no paper number readable here: params of the "
                                             "official code, MACs the searched budget (mac@4.6G)")),
}
register_family(ViTResNAS, VARIANTS, paper="arXiv:2109.00642", kind="vit",
                code="yilunliao/vit-search@303e7c30638e9c7aee2e2b329e5c71bd3e89ccb9 nets/vit_sr_supernet.py")
