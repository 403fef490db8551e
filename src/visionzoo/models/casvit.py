"""CAS-ViT, from "CAS-ViT: Convolutional Additive Self-attention Vision Transformers for Efficient Mobile
Applications" (Zhang et al., 2024). https://arxiv.org/abs/2408.03703

A stride-4 conv stem, four stages (strides 4-32) joined by 3x3/2 conv-BN downsamplings. Each block is a residual
local integration (1x1 conv, BN, depthwise 3x3, GELU, 1x1), a residual convolutional additive token mixer on BN(x)
and a residual 1x1-conv MLP on BN(x). The token mixer (CATM) is NOT softmax attention: queries and keys are each
gated by a spatial map (depthwise 3x3, BN, ReLU, 1x1 to one channel, sigmoid) and a channel vector (pooling, 1x1,
sigmoid), added, passed through a depthwise 3x3 conv and multiplied with the values, then a depthwise 3x3
projection. There is no token-to-token similarity matrix, so nothing goes through ``AttentionCore`` and the model
declares ``has_attention = False``. The head is BN, average pooling and two classifiers (the official distillation
head, ``head.fc_dist``) whose logits are averaged.

Differs from the paper: none. Follows Tianfang-Zhang/CAS-ViT ``classification/model/rcvit.py`` (``rcvit_*``);
official checkpoints (flat ``network.i`` list of stages and downsamplings, ``head``, ``dist_head``) load through
``CASViT.remap``. The official model returns the two logits as a tuple in training; here the head averages them
unless ``model.head.distilled_training`` is set (as DeiT's head in this library). The official ``fork_feat`` mode
(per-output BNs for detection) is left out: ``features_only`` gives the stage outputs.

``fuse()`` folds every BN that meets a conv: conv-BN pairs (stem, downsampling, local integration, spatial gates)
by the generic walk, and each block's two pre-norm BNs into the 1x1 convs after them (``CASViTBlock.fuse``); the
final BN (after a residual sum) becomes a fixed per-channel affine (``CASViTNorm.fuse``).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import ClassifierHead, DropPath, FrozenBatchNorm2d, drop_path_rates, fold_bn_into_conv, is_meta
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["CASViT"]


class CASViTSpatialGate(nn.Module):
    """``x * sigmoid(1x1(ReLU(BN(dw3x3(x)))))``, one gate value per position."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), nn.BatchNorm2d(dim), nn.ReLU(),
                                   nn.Conv2d(dim, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.block(x).sigmoid()


class CASViTChannelGate(nn.Module):
    """``x * sigmoid(1x1(mean_HW(x)))``, one gate value per channel."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv(x.mean((2, 3), keepdim=True)).sigmoid()  # (B, C, H, W) -> (B, C, 1, 1) gate


class CASViTAdditiveMixer(nn.Module):
    """Convolutional additive token mixer: ``proj(dwc(gate(q) + gate(k)) * v)``."""

    def __init__(self, dim: int, qkv_bias: bool = False, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=qkv_bias)
        self.oper_q = nn.Sequential(CASViTSpatialGate(dim), CASViTChannelGate(dim))
        self.oper_k = nn.Sequential(CASViTSpatialGate(dim), CASViTChannelGate(dim))
        self.dwc = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=1)  # (B, 3C, H, W) -> 3 x (B, C, H, W)
        x = self.dwc(self.oper_q(q) + self.oper_k(k)) * v
        return self.proj_drop(self.proj(x))


class CASViTBlock(nn.Module):
    """x + local(x); x + mixer(BN(x)); x + MLP(BN(x))."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.local_perception = nn.Sequential(
            nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim), nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), nn.GELU(),
            nn.Conv2d(dim, dim, 1))
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = CASViTAdditiveMixer(dim, qkv_bias, drop)
        self.norm2 = nn.BatchNorm2d(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Conv2d(dim, hidden, 1))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("drop1", nn.Dropout(drop))
        self.mlp.add_module("fc2", nn.Conv2d(hidden, dim, 1))
        self.mlp.add_module("drop2", nn.Dropout(drop))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.local_perception(x)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def fuse(self) -> None:
        """Fold the two pre-norm BNs into the 1x1 convs that read them (qkv, MLP fc1)."""
        if isinstance(self.norm1, nn.BatchNorm2d):
            self.attn.qkv, self.norm1 = fold_bn_into_conv(self.norm1, self.attn.qkv), nn.Identity()
        if isinstance(self.norm2, nn.BatchNorm2d):
            self.mlp.fc1, self.norm2 = fold_bn_into_conv(self.norm2, self.mlp.fc1), nn.Identity()


class CASViTDownsample(nn.Module):
    """3x3/2 conv + BN (official ``Embedding``)."""

    fuse_pairs = (("proj", "norm"),)

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class CASViTStage(nn.Module):
    """Optional downsampling, then ``depth`` blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, drop_path: list[float],
                 **block_args) -> None:
        super().__init__()
        self.downsample = CASViTDownsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[CASViTBlock(dim, drop_path=drop_path[j], **block_args) for j in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class CASViTNorm(nn.Module):
    """The BN after the last stage. It follows a residual sum, so no conv can absorb it: ``fuse()`` freezes it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x)

    def fuse(self) -> None:
        """Replace the BN with a fixed per-channel affine (its statistics and parameters as buffers)."""
        bn = self.bn
        if isinstance(bn, nn.BatchNorm2d):
            with torch.device(bn.running_mean.device):
                self.bn = FrozenBatchNorm2d.convert(bn).to(bn.running_mean.dtype)


class CASViTHead(ClassifierHead):
    """Average pool, then a classifier and a distillation classifier (``fc_dist``) whose logits are averaged.

    In training with ``distilled_training`` set, returns ``(logits, logits_dist)`` (the official training output).
    """

    fc_names = ("fc", "fc_dist")

    def __init__(self, in_features: int, num_classes: int = 1000, drop_rate: float = 0.0,
                 distilled: bool = True) -> None:
        super().__init__(in_features, num_classes, "avg", drop_rate)
        if distilled:
            self.fc_dist = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()
        else:
            self.fc_names = ("fc",)
        self.distilled_training = False

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x = self.forward_pre_logits(x)
        if pre_logits:
            return x
        if len(self.fc_names) == 1:
            return self.fc(x)
        x, x_dist = self.fc(x), self.fc_dist(x)
        if self.distilled_training and self.training:
            return x, x_dist
        return (x + x_dist) / 2


class CASViT(Backbone):
    """CAS-ViT (official ``RCViT``): conv stem, four stages of convolutional additive blocks, BN + two-fc head.

    Args:
        distilled: keep the official distillation classifier (``head.fc_dist``, on in every released model).
        qkv_bias: bias on the token mixer's qkv 1x1 conv (official ``attn_bias``, off).
    """

    kind = "hybrid"
    first_conv = "stem.0"

    def __init__(self, depths: tuple[int, ...] = (3, 3, 6, 3), dims: tuple[int, ...] = (48, 64, 128, 256),
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, distilled: bool = True, *, in_chans: int = 3,
                 num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"casvit: depths and dims need one entry per stage, got {tuple(depths)} and "
                             f"{tuple(dims)}")
        self.in_chans = in_chans
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0] // 2, 3, 2, 1), nn.BatchNorm2d(dims[0] // 2), nn.ReLU(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), nn.BatchNorm2d(dims[0]), nn.ReLU())
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        self.stages = nn.ModuleList([
            CASViTStage(dims[max(i - 1, 0)], dims[i], depths[i], i > 0, dpr[i], mlp_ratio=mlp_ratio,
                        qkv_bias=qkv_bias, drop=drop_rate)
            for i in range(len(dims))])
        self.set_feature_info([FeatureInfo(d, 4 * 2**i, f"stages.{i}") for i, d in enumerate(dims)])
        self.norm = CASViTNorm(dims[-1])
        self.init_head(dims[-1], num_classes, head=CASViTHead(dims[-1], num_classes, 0.0, distilled))
        self.apply(_init_weights)

    def forward_norm(self, x: Tensor) -> Tensor:
        return self.norm(x)

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours: ``patch_embed`` -> ``stem``; ``network.2i`` (stage i) -> ``stages.i.blocks``;
        ``network.2i-1`` (the downsampling before it) -> ``stages.i.downsample``; ``head``/``dist_head`` ->
        ``head.fc``/``head.fc_dist``; ``norm`` -> ``norm.bn``; ``local_perception.network`` -> ``local_perception``;
        the channel gate's conv gets a name."""
        out = {}
        for k, v in state_dict.items():
            k = re.sub(r"^patch_embed\.", "stem.", k)
            m = re.match(r"^network\.(\d+)\.(.*)$", k)
            if m:
                i, rest = int(m.group(1)), m.group(2)
                k = f"stages.{i // 2}.blocks.{rest}" if i % 2 == 0 else f"stages.{(i + 1) // 2}.downsample.{rest}"
            k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
            k = re.sub(r"^dist_head\.", "head.fc_dist.", k)
            k = re.sub(r"^norm\.(?!bn\.)", "norm.bn.", k)
            k = re.sub(r"(oper_[qk]\.1)\.block\.1\.", r"\1.conv.", k)
            k = k.replace(".local_perception.network.", ".local_perception.")
            out[k] = v
        return out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear) and not is_meta(m):  # the official init touches Linear layers only
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_SRC = "official MODEL_ZOO.md (Tianfang-Zhang/CAS-ViT), ImageNet-1K top-1 at 224 (first of the two listed numbers)"
_NOTES = ("official rcvit_{size}; params_m with the distillation head ({nodist}M without, distilled=False). gmacs: "
          "fvcore on the official file (the paper's FLOPs not pinned); top-1 with the second checkpoint: {top1b}")

VARIANTS = {
    "casvit_test": Variant(dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, 48)), params_m=0.194720, input_size=64,
                           notes="tiny config for tests"),
    "casvit_xs":   Variant(dict(depths=(2, 2, 4, 2), dims=(48, 56, 112, 220)), params_m=3.200700, gmacs=0.554,
                           paper=Paper(3.20, None, 78.3, _SRC),
                           notes=_NOTES.format(size="xs", nodist=2.9797, top1b=78.7)),
    "casvit_s":    Variant(dict(depths=(3, 3, 6, 3), dims=(48, 64, 128, 256)), params_m=5.764224, gmacs=0.923,
                           paper=Paper(5.76, None, 80.9, _SRC),
                           notes=_NOTES.format(size="s", nodist=5.5072, top1b=81.1)),
    "casvit_m":    Variant(dict(depths=(3, 3, 6, 3), dims=(64, 96, 192, 384)), params_m=12.421520, gmacs=1.874,
                           paper=Paper(12.42, None, 82.8, _SRC),
                           notes=_NOTES.format(size="m", nodist=12.0365, top1b=83.0)),
    "casvit_t":    Variant(dict(depths=(3, 3, 6, 3), dims=(96, 128, 256, 512)), params_m=21.763120, gmacs=3.579,
                           paper=Paper(21.76, None, 83.9, _SRC),
                           notes=_NOTES.format(size="t", nodist=21.2501, top1b=84.1) + "; T is the largest size"),
}
register_family(CASViT, VARIANTS, paper="arXiv:2408.03703", kind="hybrid",
                code="Tianfang-Zhang/CAS-ViT@041d2d6 classification/model/rcvit.py")
