"""SReT, from "Sliced Recursive Transformer" (Shen, Liu, Xing; ECCV 2022). https://arxiv.org/abs/2111.05297

A three-stage, PiT-like transformer: a conv stem (three 3x3/2 conv + BN + ReLU, stride 8) plus a learned 2-D
position table, three stages of transformer blocks with depthwise strided-conv pooling between them, average pooling,
LayerNorm and the classifier. In each stage ``recursive_num`` blocks are each applied twice in a row with shared
weights (recursion), and after every application a non-shared "NLL" layer ``a * x + b * mlp(norm(x))`` follows. Every
residual branch is scaled by learned scalars. Attention is sliced into groups: the first application of a block
attends within ``groups1`` contiguous (raster-order) runs of tokens, the recursive one within ``groups2`` groups of
shuffled tokens.

Differs from the official code: on the recursive pass the official model draws a new random permutation of the
tokens on every call, in evaluation too, so its outputs are random. Here training does the same, and evaluation uses a
fixed interleaved split (token ``i`` goes to group ``i mod groups2``; for a map whose width is a multiple of
``groups2`` these are column classes), so a model's outputs are deterministic and it traces and exports. The position
table is resampled (bicubic) for other input sizes. The attention of a group runs through ``AttentionCore``; each block
has one core for its first pass (``core``) and one for its recursive pass (``core_rec``), so their maps are told apart.
The stages pool between them, so their blocks are not ``TokenBlock`` s (no token reduction).

Follows the official code, szq0214/SReT (``SReT.py``, MIT), whose state-dict keys we keep except for the head:
``norm`` (after pooling) and ``head`` are ``head.norm`` and ``head.fc`` here (``SReT.remap``). As in the official
``ModuleList``, each shared block sits at two indices of ``transformers.<stage>.blocks`` (its keys appear twice).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, resolve_indices
from visionzoo.layers import AttentionCore, DropPath, LayerNorm, Mlp, is_meta, is_tracing, trace_leaf
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["SReT"]


@trace_leaf
def pos_embed_for(pos_embed: Tensor, x: Tensor) -> Tensor:
    """The ``(1, C, H, W)`` position table for the map ``x``: as is, or resampled bicubically."""
    if pos_embed.shape[-2:] == x.shape[-2:]:
        return pos_embed
    return F.interpolate(pos_embed, size=tuple(x.shape[-2:]), mode="bicubic", align_corners=False)


class LearnableCoefficient(nn.Module):
    """A learned scalar (initialised at 1) that scales its input."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.bias


class NonProj(nn.Module):
    """The non-shared layer after each block application: ``a * x + b * mlp(norm1(x))``."""

    def __init__(self, dim: int, mlp_ratio: float = 1.0, drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.coefficient1 = LearnableCoefficient()
        self.coefficient2 = LearnableCoefficient()

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None, recursive: bool = False) -> Tensor:
        return self.coefficient1(x) + self.coefficient2(self.mlp(self.norm1(x)))


class GroupAttention(nn.Module):
    """Multi-head self-attention within groups of tokens: contiguous runs (first pass) or shuffled groups (recursive
    pass: random in training, interleaved in evaluation)."""

    def __init__(self, dim: int, num_heads: int, groups1: int = 1, groups2: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.groups1, self.groups2 = groups1, groups2
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.core = AttentionCore()
        self.core_rec = AttentionCore()
        self.core_rec.partition = "grid"  # the interleaved groups are column classes (explain tools)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _grid(self, hw: tuple[int, int] | None, groups: int, interleaved: bool) -> tuple[int, int] | None:
        """The layout of one group's queries on the map (for attention maps); ``None`` when it has none."""
        if hw is None or is_tracing():
            return None
        H, W = hw
        if groups == 1:
            return H, W
        if interleaved:
            return (H, W // groups) if W % groups == 0 else (1, H * W // groups)
        n = H * W // groups
        return (n // W, W) if n % W == 0 else (1, n)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None, recursive: bool = False) -> Tensor:
        B, N, C = x.shape
        G = self.groups2 if recursive else self.groups1
        shuffle = recursive and G > 1
        inverse = None
        if shuffle and self.training:
            idx = torch.randperm(N, device=x.device)
            x, inverse = x[:, idx], torch.argsort(idx)
        elif shuffle:  # token i -> group i mod G: (B, N/G, G, C) -> (B, G, N/G, C)
            x = x.reshape(B, N // G, G, C).transpose(1, 2)
        qkv = self.qkv(x).reshape(B * G, N // G, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # -> 3 x (B * G, heads, N / G, d)
        core = self.core_rec if recursive else self.core
        drop = self.attn_drop.p if self.training else 0.0
        x = core(q, k, v, scale=self.scale, dropout_p=drop, grid=self._grid(hw, G, shuffle))
        x = x.transpose(1, 2).reshape(B, G, N // G, C)  # (B * G, heads, N / G, d) -> (B, G, N / G, C)
        if shuffle and inverse is None:
            x = x.transpose(1, 2)  # back from the interleaved groups: -> (B, N / G, G, C)
        x = x.reshape(B, N, C)
        if inverse is not None:
            x = x[:, inverse]
        return self.proj_drop(self.proj(x))


class SReTBlock(nn.Module):
    """``c1 * x + c2 * attn(norm1(x))``, then ``c3 * x + c4 * mlp(norm2(x))`` (learned scalars c1..c4)."""

    def __init__(self, dim: int, num_heads: int, groups1: int, groups2: int, mlp_ratio: float = 4.0,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = GroupAttention(dim, num_heads, groups1, groups2, True, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.coefficient1 = LearnableCoefficient()
        self.coefficient2 = LearnableCoefficient()
        self.coefficient3 = LearnableCoefficient()
        self.coefficient4 = LearnableCoefficient()

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None, recursive: bool = False) -> Tensor:
        x = self.coefficient1(x) + self.coefficient2(self.drop_path(self.attn(self.norm1(x), hw, recursive)))
        return self.coefficient3(x) + self.coefficient4(self.drop_path(self.mlp(self.norm2(x))))


class SReTStage(nn.Module):
    """``recursive_num`` blocks, each applied ``depth / recursive_num`` times, a ``NonProj`` after every application;
    ``blocks`` lists them in order of application, as the official ``Transformer`` does."""

    def __init__(self, dim: int, depth: int, recursive_num: int, groups1: int, groups2: int, num_heads: int,
                 mlp_ratio: float, np_mlp_ratio: float, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path: list[float] | None = None) -> None:
        super().__init__()
        if depth % recursive_num:
            raise ValueError(f"sret: a stage's depth ({depth}) must be a multiple of its recursive_num "
                             f"({recursive_num})")
        dpr = drop_path or [0.0] * depth
        loops = depth // recursive_num
        shared = [SReTBlock(dim, num_heads, groups1, groups2, mlp_ratio, drop_rate, attn_drop_rate, dpr[i])
                  for i in range(recursive_num)]
        nll = [NonProj(dim, np_mlp_ratio, drop_rate) for _ in range(depth)]
        order: list[nn.Module] = []
        for r in range(recursive_num):
            for j in range(loops):
                order += [shared[r], nll[r * loops + j]]
        self.blocks = nn.ModuleList(order)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        for i, block in enumerate(self.blocks):
            x = block(x, (H, W), (i + 2) % 4 == 0)  # NOTE: the official marker of a recursive application
        return x.transpose(1, 2).reshape(B, C, H, W)  # (B, HW, C) -> (B, C, H, W)


class SReTStem(nn.Module):
    """Three 3x3/2 conv + BN + ReLU: ``(B, 3, H, W)`` -> ``(B, C, H/8, W/8)``."""

    fuse_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, 2, 1)
        self.bn1 = nn.BatchNorm2d(dim // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, 2, 1)
        self.bn2 = nn.BatchNorm2d(dim)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(dim, dim, 3, 2, 1)
        self.bn3 = nn.BatchNorm2d(dim)
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.relu3(self.bn3(self.conv3(x)))


class ConvHeadPooling(nn.Module):
    """A grouped 3x3/2 conv between stages (PiT's pooling without the class-token projection)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, 2, 1, groups=in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class SReT(Backbone):
    """Conv stem + position table, three sliced recursive stages with conv pooling, average pool, norm, classifier.

    Args:
        base_dims, heads: per stage, the width is ``base_dims[i] * heads[i]``.
        depth, recursive_num: block applications and unique (shared) blocks per stage.
        groups1, groups2: attention groups of the first and of the recursive application per stage (1 = global).
        np_mlp_ratio: the MLP ratio of the non-shared layers after each application.
        img_size: the input size the position table is built for (stride 8); other sizes resample it.
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    no_weight_decay_keys = ("pos_embed",)
    first_conv = "patch_embed.conv1"

    def __init__(self, base_dims: tuple[int, ...] = (32, 32, 32), heads: tuple[int, ...] = (2, 4, 8),
                 depth: tuple[int, ...] = (4, 10, 6), recursive_num: tuple[int, ...] = (2, 5, 3),
                 groups1: tuple[int, ...] = (8, 4, 1), groups2: tuple[int, ...] = (2, 1, 1), mlp_ratio: float = 3.6,
                 np_mlp_ratio: float = 1.0, img_size: int = 224, *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        n = len(depth)
        if not len(base_dims) == len(heads) == len(recursive_num) == len(groups1) == len(groups2) == n:
            raise ValueError(f"sret: base_dims, heads, depth, recursive_num, groups1 and groups2 need one entry per "
                             f"stage, got lengths {len(base_dims)}, {len(heads)}, {n}, {len(recursive_num)}, "
                             f"{len(groups1)}, {len(groups2)}")
        dims = [b * h for b, h in zip(base_dims, heads)]
        self.in_chans = in_chans
        self.min_input_size = self.input_multiple = 8 * 2 ** (n - 1)
        self.patch_embed = SReTStem(in_chans, dims[0])
        self.pos_embed = nn.Parameter(torch.zeros(1, dims[0], img_size // 8, img_size // 8))
        self.pos_drop = nn.Dropout(drop_rate)
        total, start = sum(depth), 0
        stages, pools = [], []
        for i in range(n):
            dpr = [drop_path_rate * j / total for j in range(start, start + depth[i])]
            start += depth[i]
            stages.append(SReTStage(dims[i], depth[i], recursive_num[i], groups1[i], groups2[i], heads[i], mlp_ratio,
                                    np_mlp_ratio, drop_rate, attn_drop_rate, dpr))
            if i < n - 1:
                pools.append(ConvHeadPooling(dims[i], dims[i + 1]))
        self.transformers = nn.ModuleList(stages)
        self.pools = nn.ModuleList(pools)
        self.set_feature_info([FeatureInfo(d, 8 * 2 ** i, f"transformers.{i}") for i, d in enumerate(dims)])
        self.init_head(dims[-1], num_classes, drop_rate, "ln", "avg")
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    def stage_modules(self) -> list[nn.Module]:
        return list(self.transformers)

    def forward_stem(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        return self.pos_drop(x + pos_embed_for(self.pos_embed, x))

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's map ``(B, C, H/32, W/32)`` (the norm is in the head, after pooling, as officially)."""
        return self.forward_intermediates(x, [len(self.transformers) - 1])[0]

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        idx = resolve_indices(indices, len(self.transformers), self.name)
        self.check_input(x)
        x = self.forward_stem(x)
        outs = []
        for i, stage in enumerate(self.transformers[:idx[-1] + 1]):
            if i > 0:
                x = self.pools[i - 1](x)
            x = self.run_stage(stage, x)
            if i in idx:
                outs.append(x)
        return outs

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours: ``head.*`` -> ``head.fc.*``, ``norm.*`` -> ``head.norm.*``. Keys already in our
        layout pass unchanged."""
        out = {}
        for k, v in state_dict.items():
            if k in ("head.weight", "head.bias"):
                k = "head.fc." + k.split(".")[1]
            elif k.startswith("norm."):
                k = "head." + k
            out[k] = v
        return out


def _init_weights(m: nn.Module) -> None:
    # NOTE: the official init resets LayerNorms only; Linear/Conv keep PyTorch's defaults
    if isinstance(m, nn.LayerNorm) and not is_meta(m):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


_SRC = "official README 'Pre-trained Model' table (szq0214/SReT)"
_T = dict(mlp_ratio=3.6)
_LT = dict(mlp_ratio=4.0)
_S = dict(base_dims=(42, 42, 42), heads=(3, 6, 12), mlp_ratio=3.0, np_mlp_ratio=2.0)
VARIANTS = {
    "sret_test":       Variant(dict(base_dims=(16, 16, 16), heads=(1, 2, 4), depth=(2, 2, 2), recursive_num=(1, 1, 1),
                                    groups1=(8, 4, 1), groups2=(2, 1, 1), mlp_ratio=2.0), params_m=0.137568,
                               input_size=64),
    "sret_tiny":       Variant(_T, params_m=4.755979, gmacs=1.122, paper=Paper(4.8, 1.1, 76.0, _SRC)),
    "sret_light_tiny": Variant(_LT, params_m=4.988024, gmacs=1.174, paper=Paper(5.0, 1.2, 76.7, _SRC),
                               notes="SReT-LT [8-4-1, 2-1-1] (groups1, groups2)"),
    "sret_small":      Variant(_S, params_m=20.899692, gmacs=4.191, paper=Paper(20.9, 4.2, 81.9, _SRC)),
}
register_family(SReT, VARIANTS, paper="arXiv:2111.05297", kind="vit", code="szq0214/SReT@af6db0ae4138 SReT.py")
