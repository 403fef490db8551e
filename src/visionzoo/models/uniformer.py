"""UniFormer, from "UniFormer: Unifying Convolution and Self-attention for Visual Recognition" (Li et al., 2022).
https://arxiv.org/abs/2201.09450

Four stages; every block starts with a dynamic position embedding (DPE: a depthwise 3x3 conv added to its input).
Stages 1-2 use local relation aggregation (MHRA as BatchNorm, 1x1 conv, depthwise 5x5 conv, 1x1 conv) and a
1x1-conv MLP; stages 3-4 use global relation aggregation (multi-head self-attention over all tokens) and an MLP.

Differs from the paper: none. Position information comes only from the convolutional DPE, so any input that is a
multiple of 32 works with no table to resample. ``drop_rate`` is the dropout before the classifier, as elsewhere in
this library (the official code applies it inside the blocks instead; the released models use 0). The layer-scale
variant (``uniformer_base_ls``) and the light models are not included.

Follows image_classification/models/uniformer.py of Sense-X/UniFormer (MIT). Its flat key layout (``patch_embed1..4``,
``blocks1..4``, ``norm``, ``head``) becomes stage modules here (``stages.i.downsample``, ``stages.i.blocks``),
``norm.bn`` and ``head.fc``; ``UniFormer.remap`` translates official checkpoints (timm has no UniFormer).
"""
from __future__ import annotations

import re

from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    Attention,
    ConvMlp,
    DropPath,
    FrozenBatchNorm2d,
    LayerNorm,
    LayerNorm2d,
    LayerType,
    Mlp,
    drop_path_rates,
    fold_bn_into_conv,
    get_act,
    init_trunc_normal,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["UniFormer"]


class UniFormerPatchEmbed(nn.Module):
    """Non-overlapping patch conv (kernel = stride), then LayerNorm over channels (torch's eps 1e-5, as official)."""

    def __init__(self, in_dim: int, out_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, patch_size, stride=patch_size)
        self.norm = LayerNorm2d(out_dim, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class UniFormerConvEmbed(nn.Module):
    """Overlapping embedding of the S+ model: two 3x3/2 conv-BN (GELU between) for the stem, one for the others."""

    def __init__(self, in_dim: int, out_dim: int, stem: bool, act_layer: LayerType = "gelu") -> None:
        super().__init__()
        if stem:
            self.proj = nn.Sequential(
                nn.Conv2d(in_dim, out_dim // 2, 3, stride=2, padding=1), nn.BatchNorm2d(out_dim // 2),
                get_act(act_layer)(),
                nn.Conv2d(out_dim // 2, out_dim, 3, stride=2, padding=1), nn.BatchNorm2d(out_dim))
        else:
            self.proj = nn.Sequential(nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1), nn.BatchNorm2d(out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class UniFormerCBlock(nn.Module):
    """Local block: DPE, then BN -> 1x1 -> depthwise 5x5 -> 1x1 (local MHRA), then BN -> 1x1-conv MLP; residuals."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, act_layer: LayerType = "gelu") -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def fuse(self) -> None:
        """Fold both BNs into the 1x1 convs that follow them (exact: a 1x1 conv has no padding)."""
        if isinstance(self.norm1, nn.BatchNorm2d):
            self.conv1 = fold_bn_into_conv(self.norm1, self.conv1)
            self.norm1 = nn.Identity()
        if isinstance(self.norm2, nn.BatchNorm2d):
            self.mlp.fc1 = fold_bn_into_conv(self.norm2, self.mlp.fc1)
            self.norm2 = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class UniFormerSABlock(nn.Module):
    """Global block: DPE on the map, then pre-LN multi-head self-attention and MLP over all tokens; residuals."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: LayerType = "gelu") -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = LayerNorm(dim)  # eps 1e-6, as official
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.transpose(1, 2).reshape(B, C, H, W)  # (B, N, C) -> (B, C, H, W)


class UniFormerStage(nn.Module):
    """A patch embedding (stride 4 for the first stage, 2 after), then the stage's blocks."""

    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class UniFormerNorm(nn.Module):
    """The final BatchNorm; ``fuse()`` freezes it into a per-channel affine (it follows a residual sum, so there is
    no conv to fold it into)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)

    def fuse(self) -> None:
        if isinstance(self.bn, nn.BatchNorm2d):
            self.bn = FrozenBatchNorm2d.convert(self.bn)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x)


class UniFormer(Backbone):
    """UniFormer: patch embedding + local (conv) blocks in stages 1-2, patch embedding + global blocks in 3-4.

    Args:
        head_dim: channels per attention head in stages 3-4 (heads = width // head_dim); 64 for S and B, 32 for S+.
        conv_stem: overlapping conv embeddings (two 3x3/2 conv-BN for the stem, one 3x3/2 conv-BN later) instead
            of non-overlapping patch convs with LayerNorm (the S+ model).
    """

    kind = "hybrid"
    cpu_channels_last = True  # oneDNN convs are faster on NHWC (see Backbone)
    min_input_size = 32
    input_multiple = 32
    has_attention = True

    def __init__(self, depths: tuple[int, ...] = (3, 4, 8, 3), dims: tuple[int, ...] = (64, 128, 320, 512),
                 head_dim: int = 64, mlp_ratio: float = 4.0, qkv_bias: bool = True, conv_stem: bool = False,
                 act_layer: LayerType = "gelu", *, in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"uniformer: depths {tuple(depths)} and dims {tuple(dims)} must have 4 entries "
                             f"(two local and two global stages)")
        if any(d % head_dim for d in dims[2:]):
            raise ValueError(f"uniformer: the global-stage widths {tuple(dims[2:])} must be multiples of head_dim "
                             f"{head_dim}")
        self.in_chans = in_chans
        self.first_conv = "stages.0.downsample.proj.0" if conv_stem else "stages.0.downsample.proj"
        in_dims = (in_chans, *dims[:3])
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        stages, infos = [], []
        for i in range(4):
            if conv_stem:
                embed = UniFormerConvEmbed(in_dims[i], dims[i], stem=i == 0, act_layer=act_layer)
            else:
                embed = UniFormerPatchEmbed(in_dims[i], dims[i], 4 if i == 0 else 2)
            if i < 2:
                blocks = [UniFormerCBlock(dims[i], mlp_ratio, dpr[i][j], act_layer) for j in range(depths[i])]
            else:
                blocks = [UniFormerSABlock(dims[i], dims[i] // head_dim, mlp_ratio, qkv_bias, attn_drop_rate,
                                           dpr[i][j], act_layer) for j in range(depths[i])]
            stages.append(UniFormerStage(embed, blocks))
            infos.append(FeatureInfo(dims[i], 4 * 2**i, f"stages.{i}"))
        self.stages = nn.ModuleList(stages)
        self.set_feature_info(infos)
        self.norm = UniFormerNorm(dims[-1])
        self.init_head(dims[-1], num_classes, drop_rate)  # average pool, dropout, Linear
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> Tensor:
        return x  # each stage starts with its own patch embedding

    def forward_norm(self, x: Tensor) -> Tensor:
        return self.norm(x)

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours (idempotent): ``patch_embed{i}`` -> ``stages.{i-1}.downsample``, ``blocks{i}`` ->
        ``stages.{i-1}.blocks``, ``norm.*`` -> ``norm.bn.*``, ``head.weight|bias`` -> ``head.fc.*``."""
        out = {}
        for k, v in state_dict.items():
            m = re.match(r"(patch_embed|blocks)([1-4])\.(.*)", k)
            if m:
                part = "downsample" if m[1] == "patch_embed" else "blocks"
                k = f"stages.{int(m[2]) - 1}.{part}.{m[3]}"
            elif k.startswith("norm.") and not k.startswith("norm.bn."):
                k = "norm.bn." + k[len("norm."):]
            elif k in ("head.weight", "head.bias"):
                k = "head.fc." + k[len("head."):]
            out[k] = v
        return out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):  # the official init touches only Linear and LayerNorm (convs keep torch's default)
        init_trunc_normal(m)
    elif isinstance(m, nn.LayerNorm):
        init_trunc_normal(m)


_README = "official README 'ImageNet-1K pretrained (224x224)' table (Sense-X/UniFormer image_classification)"
_MACS = "gmacs: the official model counted by visionzoo.profile (attention matmuls included)"

VARIANTS = {
    "uniformer_test": Variant(dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), head_dim=16), input_size=64,
                              notes="tiny config for tests"),
    "uniformer_small": Variant(dict(depths=(3, 4, 8, 3)), params_m=21.545256, gmacs=3.632,
                               paper=Paper(22, 3.6, 82.9, _README),
                               notes=f"head_dim 64 (the reported 82.9 used head_dim 64); {_MACS}"),
    "uniformer_small_plus": Variant(dict(depths=(3, 5, 9, 3), head_dim=32, conv_stem=True), params_m=24.032552,
                                    gmacs=4.201, paper=Paper(24, 4.2, 83.4, _README),
                                    notes="S-dagger: conv stem, head_dim 32 (the reported 83.4 used head_dim 32; the "
                                          "README's re-trained head_dim=64 model, uniformer_small_plus_dim64, also "
                                          f"gets 83.4 with the same params: pass head_dim=64); {_MACS}"),
    "uniformer_base": Variant(dict(depths=(5, 8, 20, 7)), params_m=49.776552, gmacs=8.249,
                              paper=Paper(50, 8.3, 83.8, _README),
                              notes=f"head_dim 64 (the reported 83.8 used head_dim 64); {_MACS}"),
}
register_family(UniFormer, VARIANTS, paper="arXiv:2201.09450", kind="hybrid", family="uniformer")
