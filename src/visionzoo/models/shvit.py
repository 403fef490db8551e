"""SHViT, from "SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design" (Yun, Ro; CVPR 2024).
https://arxiv.org/abs/2401.16456

A 16x patchify stem of four stride-2 3x3 conv-BN layers, then three stages (strides 16, 32, 64). Every block is a
residual depthwise 3x3 conv-BN, a residual single-head self-attention (stages 2-3 only) and a residual 1x1-conv FFN.
The attention (SHSA) runs on the first ``partial_dim`` channels only: GroupNorm(1 group), a 1x1 conv-BN giving
queries and keys of width ``qk_dim`` (16) and values of width ``partial_dim``, one softmax head over all tokens
(through ``layers.AttentionCore``); the untouched channels are concatenated back before a ReLU and 1x1 conv-BN.
Between stages, a residual dw-conv + FFN pair on each side of an inverted-residual patch merging (1x1 up x4,
depthwise 3x3/2, squeeze-excite, 1x1 down).

Differs from the paper: none. Follows timm ``shvit.py`` (timm 1.0.31, Apache-2.0; port of ysj9909/SHViT, MIT) and
keeps its state-dict layout, except the classifier (timm ``head.bn``/``head.l`` -> our ``head.norm``/``head.fc``);
``SHViT.remap`` translates that and the official flat layout (``blocks1``-``blocks3``, downsamplings inline). A
stage downsamples when it is not the first (timm: when its width differs from the previous stage's, the same thing
for every released configuration). The official distillation head (off in every release) is not built.

``fuse()`` gives the official deploy form (``replace_batchnorm``): every conv-BN folds (the generic walk), each
residual depthwise conv absorbs its identity into the kernel centre (``SHViTResidual.fuse``), and the head's BN1d
folds into the classifier (``SHViTHead.fuse``).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import AttentionCore, ClassifierHead, fold_conv_bn_children, is_meta
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["SHViT"]


class SHViTConvNorm(nn.Sequential):
    """Conv (no bias) + BatchNorm, children ``c`` and ``bn`` (timm's ``Conv2dNorm``); the BN scale starts at
    ``bn_weight_init``."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_dim, out_dim, kernel_size, stride, kernel_size // 2, groups=groups,
                                       bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_dim))
        self.bn_weight_init = bn_weight_init


class SHViTResidual(nn.Module):
    """``x + m(x)``; once fused, a residual depthwise 3x3 conv is one conv with the identity in its kernel centre."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m
        self.skip = True

    def forward(self, x: Tensor) -> Tensor:
        return x + self.m(x) if self.skip else self.m(x)

    @torch.no_grad()
    def fuse(self) -> None:
        if not (self.skip and isinstance(self.m, SHViTConvNorm)):
            return
        fold_conv_bn_children(self.m)  # a no-op under Backbone.fuse(), which folded it already
        conv = self.m.c
        k = conv.kernel_size[0]
        if conv.groups != conv.in_channels or conv.in_channels != conv.out_channels or conv.stride != (1, 1):
            return
        conv.weight[:, 0, k // 2, k // 2] += 1.0  # depthwise: weight (C, 1, k, k); the identity is the centre tap
        self.m, self.skip = conv, False


class SHViTSqueezeExcite(nn.Module):
    """Squeeze-excite: mean over H, W, 1x1 conv down, ReLU, 1x1 conv up, sigmoid gate (timm ``SEModule`` keys)."""

    def __init__(self, dim: int, rd_ratio: float = 0.25, divisor: int = 8) -> None:
        super().__init__()
        rd = max(divisor, int(dim * rd_ratio + divisor / 2) // divisor * divisor)  # nearest multiple of 8
        self.fc1 = nn.Conv2d(dim, rd, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))  # (B, C, H, W) -> (B, C, 1, 1)
        return x * s.sigmoid()


class SHViTPatchMerging(nn.Module):
    """1x1 conv-BN (x4 width), ReLU, depthwise 3x3/2 conv-BN, ReLU, squeeze-excite, 1x1 conv-BN to ``out_dim``."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        hidden = 4 * dim
        self.conv1 = SHViTConvNorm(dim, hidden)
        self.act1 = nn.ReLU()
        self.conv2 = SHViTConvNorm(hidden, hidden, 3, 2, groups=hidden)
        self.act2 = nn.ReLU()
        self.se = SHViTSqueezeExcite(hidden)
        self.conv3 = SHViTConvNorm(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.conv3(self.se(x))


class SHViTFFN(nn.Module):
    """1x1 conv-BN up (x2), ReLU, 1x1 conv-BN down."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.pw1 = SHViTConvNorm(dim, hidden)
        self.act = nn.ReLU()
        self.pw2 = SHViTConvNorm(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.pw2(self.act(self.pw1(x)))


class SHViTSingleHeadAttention(nn.Module):
    """Single-head softmax attention over all tokens on the first ``partial_dim`` channels; the rest pass through."""

    def __init__(self, dim: int, qk_dim: int, partial_dim: int) -> None:
        super().__init__()
        if not 0 < partial_dim <= dim:
            raise ValueError(f"shvit: partial_dim must be in 1..dim ({dim}), got {partial_dim}")
        self.dim, self.qk_dim, self.pdim = dim, qk_dim, partial_dim
        self.scale = qk_dim ** -0.5
        self.pre_norm = nn.GroupNorm(1, partial_dim)
        self.qkv = SHViTConvNorm(partial_dim, 2 * qk_dim + partial_dim)
        self.proj = nn.Sequential(nn.ReLU(), SHViTConvNorm(dim, dim, bn_weight_init=0.0))
        self.core = AttentionCore()

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=1)
        qkv = self.qkv(self.pre_norm(x1)).flatten(2).transpose(1, 2)  # (B, 2 qk + p, H, W) -> (B, N, 2 qk + p)
        q, k, v = torch.split(qkv.unsqueeze(1), [self.qk_dim, self.qk_dim, self.pdim], dim=-1)  # (B, 1, N, *)
        x1 = self.core(q, k, v, scale=self.scale)  # (B, 1, N, p)
        x1 = x1.squeeze(1).transpose(1, 2).reshape(B, self.pdim, H, W)  # (B, 1, N, p) -> (B, p, H, W)
        return self.proj(torch.cat([x1, x2], dim=1))


class SHViTBlock(nn.Module):
    """Residual depthwise 3x3 conv-BN, residual single-head attention (or nothing), residual FFN."""

    def __init__(self, dim: int, qk_dim: int, partial_dim: int, attn: bool) -> None:
        super().__init__()
        self.conv = SHViTResidual(SHViTConvNorm(dim, dim, 3, groups=dim, bn_weight_init=0.0))
        self.mixer = SHViTResidual(SHViTSingleHeadAttention(dim, qk_dim, partial_dim)) if attn else nn.Identity()
        self.ffn = SHViTResidual(SHViTFFN(dim, 2 * dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(self.mixer(self.conv(x)))


class SHViTStage(nn.Module):
    """Optional downsample (dw-conv + FFN, patch merging, dw-conv + FFN, all but the merging residual), blocks."""

    def __init__(self, prev_dim: int, dim: int, qk_dim: int, partial_dim: int, attn: bool, depth: int,
                 downsample: bool) -> None:
        super().__init__()
        self.downsample = nn.Sequential(
            SHViTResidual(SHViTConvNorm(prev_dim, prev_dim, 3, groups=prev_dim)),
            SHViTResidual(SHViTFFN(prev_dim, 2 * prev_dim)),
            SHViTPatchMerging(prev_dim, dim),
            SHViTResidual(SHViTConvNorm(dim, dim, 3, groups=dim)),
            SHViTResidual(SHViTFFN(dim, 2 * dim)),
        ) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[SHViTBlock(dim, qk_dim, partial_dim, attn) for _ in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class SHViTHead(ClassifierHead):
    """Average pool, BatchNorm1d, dropout, linear; ``fuse()`` folds the BatchNorm into the classifier."""

    @torch.no_grad()
    def fuse(self) -> None:
        bn, fc = self.norm, self.fc
        if not (isinstance(bn, nn.BatchNorm1d) and isinstance(fc, nn.Linear)):
            return
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        shift = bn.bias - bn.running_mean * scale
        fused = nn.Linear(fc.in_features, fc.out_features, device=fc.weight.device, dtype=fc.weight.dtype)
        fused.weight.copy_(fc.weight * scale[None, :])
        fused.bias.copy_(fc.weight @ shift + (fc.bias if fc.bias is not None else 0.0))
        self.norm, self.fc = nn.Identity(), fused.train(self.training)


class SHViT(Backbone):
    """SHViT: conv stem (stride 16), three stages of conv / single-head attention / FFN blocks, BN1d-linear head.

    Args:
        dims: width of each stage (the stem ends at ``dims[0]``).
        partial_dim: channels each stage's single-head attention runs on (the rest pass through).
        qk_dim: width of queries and keys (16 in every released model).
        types: per stage ``"s"`` (blocks with attention) or ``"i"`` (conv + FFN only).
    """

    kind = "hybrid"
    has_attention = True
    min_input_size = 64
    input_multiple = 16  # every downsampling is a padded 3x3/2 conv: sizes round up (224 -> 14, 7, 4)
    first_conv = "patch_embed.0.c"

    def __init__(self, dims: tuple[int, ...] = (128, 256, 384), depths: tuple[int, ...] = (1, 2, 3),
                 partial_dim: tuple[int, ...] = (32, 64, 96), qk_dim: int = 16,
                 types: tuple[str, ...] = ("s", "s", "s"), *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not len(dims) == len(depths) == len(partial_dim) == len(types):
            raise ValueError(f"shvit: dims, depths, partial_dim and types need one entry per stage, got "
                             f"{tuple(dims)}, {tuple(depths)}, {tuple(partial_dim)}, {tuple(types)}")
        if any(t not in ("s", "i") for t in types):
            raise ValueError(f"shvit: types entries must be 's' (attention) or 'i' (none), got {tuple(types)}")
        if drop_path_rate:
            raise ValueError(f"shvit: drop_path_rate must be 0 (the official model has no stochastic depth), got "
                             f"{drop_path_rate}")
        self.in_chans = in_chans
        c = dims[0]
        self.patch_embed = nn.Sequential(
            SHViTConvNorm(in_chans, c // 8, 3, 2), nn.ReLU(), SHViTConvNorm(c // 8, c // 4, 3, 2), nn.ReLU(),
            SHViTConvNorm(c // 4, c // 2, 3, 2), nn.ReLU(), SHViTConvNorm(c // 2, c, 3, 2))
        self.stages = nn.ModuleList([
            SHViTStage(dims[max(i - 1, 0)], dims[i], qk_dim, partial_dim[i], types[i] == "s", depths[i], i > 0)
            for i in range(len(dims))])
        self.set_feature_info([FeatureInfo(d, 16 * 2**i, f"stages.{i}") for i, d in enumerate(dims)])
        self.init_head(dims[-1], num_classes, drop_rate,
                       head=SHViTHead(dims[-1], num_classes, "avg", drop_rate, norm_layer="bn1d"))
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.patch_embed(x)

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """timm or official (ysj9909/SHViT) keys -> ours.

        timm: the classifier ``head.bn``/``head.l`` becomes ``head.norm``/``head.fc``. Official: ``blocks1.j`` ->
        ``stages.0.blocks.j``; in ``blocks2``/``blocks3`` the first three entries are the downsampling (a (dw-conv,
        FFN) pair, the patch merging, another pair: ``downsample.0-4``) and entry ``j >= 3`` is block ``j - 3``.
        """
        out = {}
        for k, v in state_dict.items():
            m = re.match(r"^blocks(\d+)\.(\d+)\.(.*)$", k)
            if m:
                i, j, rest = int(m[1]) - 1, int(m[2]), m[3]
                if i == 0 or j >= 3:
                    k = f"stages.{i}.blocks.{j - 3 if i else j}.{rest}"
                elif j == 1:
                    k = f"stages.{i}.downsample.2.{rest}"
                else:  # a (dw-conv, FFN) pair: its entry 0 or 1
                    first, tail = rest.split(".", 1)
                    k = f"stages.{i}.downsample.{int(first) + (0 if j == 0 else 3)}.{tail}"
            k = re.sub(r"^head\.bn\.", "head.norm.", k)
            k = re.sub(r"^head\.l\.", "head.fc.", k)
            out[k] = v
        return out


def _init_weights(m: nn.Module) -> None:
    if is_meta(m):
        return
    if isinstance(m, SHViTConvNorm):
        nn.init.constant_(m.bn.weight, m.bn_weight_init)
        nn.init.zeros_(m.bn.bias)
    elif isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_SRC = "arXiv:2401.16456 ImageNet-1K results; params/FLOPs as in the official README (ysj9909/SHViT)"
_NOTES = ("params_m: timm 1.0.31 (train form, BatchNorms unfused); deploy_params_m and gmacs: the official README's "
          "fused figures (reproduced in the reference notes). timm results csv top-1 {top1}. Max 1 GMAC: no variant in "
          "the 4-5 GMACs bench class")

VARIANTS = {
    "shvit_test": Variant(dict(dims=(32, 48, 64), depths=(1, 1, 1), partial_dim=(8, 12, 16), types=("i", "s", "s")),
                          params_m=0.217036, input_size=128,
                          notes="tiny config for tests; 128 px because the last stage has stride 64 (2x2 tokens)"),
    "shvit_s1":   Variant(dict(dims=(128, 224, 320), depths=(2, 4, 5), partial_dim=(32, 48, 68), types=("i", "s", "s")),
                          params_m=6.330808, gmacs=0.241, deploy_params_m=6.309, deploy_gmacs=0.241,
                          paper=Paper(6.3, 0.241, 72.8, _SRC), notes=_NOTES.format(top1=72.78)),
    "shvit_s2":   Variant(dict(dims=(128, 308, 448), depths=(2, 4, 5), partial_dim=(32, 66, 96), types=("i", "s", "s")),
                          params_m=11.483072, gmacs=0.366, deploy_params_m=11.454, deploy_gmacs=0.366,
                          paper=Paper(11.4, 0.366, 75.2, _SRC), notes=_NOTES.format(top1=75.18)),
    "shvit_s3":   Variant(dict(dims=(192, 352, 448), depths=(3, 5, 5), partial_dim=(48, 75, 96), types=("i", "s", "s")),
                          params_m=14.245273, gmacs=0.601, deploy_params_m=14.21, deploy_gmacs=0.601,
                          paper=Paper(14.2, 0.601, 77.4, _SRC), notes=_NOTES.format(top1=77.36)),
    "shvit_s4":   Variant(dict(dims=(224, 336, 448), depths=(4, 7, 6), partial_dim=(48, 72, 96), types=("i", "s", "s")),
                          params_m=16.588484, gmacs=0.986, deploy_params_m=16.546, deploy_gmacs=0.986, input_size=256,
                          paper=Paper(16.5, 0.986, 79.4, _SRC), notes=_NOTES.format(top1=79.36)),
}
register_family(SHViT, VARIANTS, paper="arXiv:2401.16456", kind="hybrid", code="timm 1.0.31 timm/models/shvit.py")
