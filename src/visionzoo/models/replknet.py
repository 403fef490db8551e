"""RepLKNet, from "Scaling Up Your Kernels to 31x31: Revisiting Large Kernel Design in CNNs" (Ding et al., 2022).
https://arxiv.org/abs/2203.06717

Stages of (RepLK block, ConvFFN) pairs. A RepLK block is BN, 1x1 conv, a depthwise 31x31 (29, 27, 13) conv, ReLU,
1x1 conv, plus the input; at train time the large depthwise conv has a parallel 5x5 depthwise conv, each with its
own BN, summed. ``fuse()`` folds every conv+BN pair (the official ``deep_fuse_BN``), pads each folded 5x5 kernel to
the large size and adds it (the official ``structural_reparam``) and, beyond the official code, folds the pre-norm
BNs into the 1x1 convs after them; the final BN (after a residual sum, with no conv to fold into) becomes a fixed
per-channel affine. Each of these is the ``fuse()`` of the block that owns the BN, run by ``Backbone.fuse()``.

Differs from the paper: none. ``small_kernel_merged=True`` builds the merged large-kernel conv directly (the
official argument of that name), to load re-parameterised checkpoints. The optional implicit-GEMM depthwise kernel
of the official code (a speed-up only) is not used, nor the extra per-stage BN of RepLKNet-XL for dense tasks.
Follows DingXiaoH/RepLKNet-pytorch ``replknet.py`` (MIT). Official checkpoints (train or structural_reparam form)
load through ``RepLKNet.remap``: each stage holds the transition before it (official ``transitions.i``), the final
BN sits in a small module (``norm.bn``) and the classifier is ``head.fc``. Weights keep PyTorch's default init, as
in the official code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import DropPath, FrozenBatchNorm2d, drop_path_rates, fold_bn_into_conv, fold_conv_bn_children
from visionzoo.registry import INCEPTION_MEAN, INCEPTION_STD, Paper, Variant, register_family

__all__ = ["RepLKNet"]


def _conv_bn(in_dim: int, out_dim: int, kernel_size: int, stride: int = 1, groups: int = 1,
             relu: bool = False) -> nn.Sequential:
    """Conv (no bias, same padding) + BN (+ ReLU), with the official child names ``conv``, ``bn``, ``nonlinear``."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(in_dim, out_dim, kernel_size, stride, kernel_size // 2, groups=groups,
                                     bias=False))
    seq.add_module("bn", nn.BatchNorm2d(out_dim))
    if relu:
        seq.add_module("nonlinear", nn.ReLU())
    return seq


class RepLKNetLargeKernelConv(nn.Module):
    """Depthwise KxK conv + BN plus a parallel small depthwise conv + BN (train), or one KxK conv with bias (merged)."""

    def __init__(self, dim: int, kernel_size: int, small_kernel: int | None, merged: bool = False) -> None:
        super().__init__()
        self.kernel_size, self.small_kernel = kernel_size, small_kernel
        self.small_conv = None
        if merged:
            self.lkb_reparam = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        else:
            self.lkb_origin = _conv_bn(dim, dim, kernel_size, groups=dim)
            if small_kernel is not None:
                self.small_conv = _conv_bn(dim, dim, small_kernel, groups=dim)

    @property
    def merged(self) -> bool:
        return hasattr(self, "lkb_reparam")

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        return out if self.small_conv is None else out + self.small_conv(x)

    @torch.no_grad()
    def fuse(self) -> None:
        """Add the zero-padded small kernel to the centre of the large one (both BN-folded), in place."""
        if self.merged:
            return
        for branch in (self.lkb_origin, self.small_conv):
            if branch is not None:
                fold_conv_bn_children(branch)  # a no-op under Backbone.fuse(), which has folded them already
        conv = self.lkb_origin.conv  # a fresh conv with bias, made by the fold
        if self.small_conv is not None:
            small = self.small_conv.conv
            conv.weight.add_(F.pad(small.weight, [(self.kernel_size - self.small_kernel) // 2] * 4))
            conv.bias.add_(small.bias)
        del self.lkb_origin
        self.small_conv = None
        self.lkb_reparam = conv


class RepLKNetBlock(nn.Module):
    """BN, 1x1 conv-BN-ReLU, large depthwise conv, ReLU, 1x1 conv-BN, residual."""

    def __init__(self, dim: int, dw_dim: int, kernel_size: int, small_kernel: int | None, drop_path: float = 0.0,
                 merged: bool = False) -> None:
        super().__init__()
        self.pw1 = _conv_bn(dim, dw_dim, 1, relu=True)
        self.pw2 = _conv_bn(dw_dim, dim, 1)
        self.large_kernel = RepLKNetLargeKernelConv(dw_dim, kernel_size, small_kernel, merged)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = nn.BatchNorm2d(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.large_kernel(self.pw1(self.prelkb_bn(x)))
        x = self.pw2(self.lk_nonlinear(x))
        return shortcut + self.drop_path(x)

    def fuse(self) -> None:
        """Fold the pre-norm BN into the 1x1 conv after it (beyond the official deep_fuse_BN)."""
        if isinstance(self.prelkb_bn, nn.BatchNorm2d):
            self.pw1.conv, self.prelkb_bn = fold_bn_into_conv(self.prelkb_bn, self.pw1.conv), nn.Identity()


class RepLKNetConvFFN(nn.Module):
    """BN, 1x1 conv-BN (expand), GELU, 1x1 conv-BN (project), residual."""

    def __init__(self, dim: int, hidden_dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.preffn_bn = nn.BatchNorm2d(dim)
        self.pw1 = _conv_bn(dim, hidden_dim, 1)
        self.pw2 = _conv_bn(hidden_dim, dim, 1)
        self.nonlinear = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x))))
        return shortcut + self.drop_path(x)

    def fuse(self) -> None:
        """Fold the pre-norm BN into the 1x1 conv after it (beyond the official deep_fuse_BN)."""
        if isinstance(self.preffn_bn, nn.BatchNorm2d):
            self.pw1.conv, self.preffn_bn = fold_bn_into_conv(self.preffn_bn, self.pw1.conv), nn.Identity()


class RepLKNetStage(nn.Module):
    """A transition from the previous stage (1x1 conv to the new width, depthwise 3x3/2 conv; none in the first
    stage), then ``depth`` pairs of (RepLK block, ConvFFN) at one width and kernel size."""

    def __init__(self, in_dim: int | None, dim: int, depth: int, kernel_size: int, small_kernel: int | None,
                 dw_ratio: float = 1.0, ffn_ratio: float = 4.0, drop_path: list[float] | None = None,
                 merged: bool = False) -> None:
        super().__init__()
        self.transition = nn.Identity() if in_dim is None else nn.Sequential(
            _conv_bn(in_dim, dim, 1, relu=True), _conv_bn(dim, dim, 3, stride=2, groups=dim, relu=True))
        dpr = drop_path or [0.0] * depth
        blocks = []
        for i in range(depth):
            blocks.append(RepLKNetBlock(dim, int(dim * dw_ratio), kernel_size, small_kernel, dpr[i], merged))
            blocks.append(RepLKNetConvFFN(dim, int(dim * ffn_ratio), dpr[i]))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.transition(x)
        for block in self.blocks:
            x = block(x)
        return x


class RepLKNetNorm(nn.Module):
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


class RepLKNet(Backbone):
    """RepLKNet: a 4-layer stride-4 conv stem, four RepLKNet stages joined by 1x1 + depthwise 3x3/2 transitions.

    Args:
        large_kernels: the large depthwise kernel size of each stage.
        small_kernel: the parallel small kernel merged into it by ``fuse()`` (``None``: no small branch, as XL).
        dw_ratio: width of the large-kernel conv relative to the stage width.
        ffn_ratio: hidden width of the ConvFFN relative to the stage width.
        small_kernel_merged: build each large-kernel conv already merged (one conv with bias).
    """

    kind = "convnet"
    cpu_channels_last = True  # oneDNN convs are faster on NHWC (see Backbone)
    first_conv = "stem.0.conv"

    def __init__(self, depths: tuple[int, ...] = (2, 2, 18, 2), dims: tuple[int, ...] = (128, 256, 512, 1024),
                 large_kernels: tuple[int, ...] = (31, 29, 27, 13), small_kernel: int | None = 5,
                 dw_ratio: float = 1.0, ffn_ratio: float = 4.0, small_kernel_merged: bool = False, *,
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not len(depths) == len(dims) == len(large_kernels) or not depths:
            raise ValueError(f"replknet: depths {tuple(depths)}, dims {tuple(dims)} and large_kernels "
                             f"{tuple(large_kernels)} must be non-empty and of equal length (one entry per stage)")
        bad = [k for k in large_kernels if k % 2 == 0 or (small_kernel is not None and k < small_kernel)]
        if bad or (small_kernel is not None and small_kernel % 2 == 0):
            raise ValueError(f"replknet: kernels must be odd and every large kernel >= small_kernel={small_kernel}, "
                             f"got large_kernels={tuple(large_kernels)}")
        self.in_chans = in_chans
        w = dims[0]
        self.stem = nn.Sequential(
            _conv_bn(in_chans, w, 3, stride=2, relu=True),
            _conv_bn(w, w, 3, groups=w, relu=True),
            _conv_bn(w, w, 1, relu=True),
            _conv_bn(w, w, 3, stride=2, groups=w, relu=True),
        )
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        # NOTE: stage i > 0 builds its transition before its blocks: the official construction order (stage,
        # transition, stage, ...), which the default init's random draws follow.
        self.stages = nn.ModuleList(
            RepLKNetStage(dims[i - 1] if i else None, dim, depth, large_kernels[i], small_kernel, dw_ratio, ffn_ratio,
                          dpr[i], small_kernel_merged)
            for i, (depth, dim) in enumerate(zip(depths, dims)))
        self.set_feature_info([FeatureInfo(d, 4 * 2**i, f"stages.{i}") for i, d in enumerate(dims)])
        self.input_multiple = self.min_input_size = 4 * 2 ** (len(dims) - 1)

        self.norm = RepLKNetNorm(dims[-1])
        self.init_head(dims[-1], num_classes, drop_rate)

    def forward_norm(self, x: Tensor) -> Tensor:
        return self.norm(x)

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours: ``transitions.i.*`` -> ``stages.{i+1}.transition.*``, ``norm.*`` -> ``norm.bn.*``,
        ``head.*`` -> ``head.fc.*``. Keys already in our layout are kept."""
        out = {}
        for k, v in state_dict.items():
            if k.startswith("transitions."):
                i, rest = k[len("transitions."):].split(".", 1)
                k = f"stages.{int(i) + 1}.transition.{rest}"
            elif k.startswith("norm.") and not k.startswith("norm.bn."):
                k = "norm.bn." + k[len("norm."):]
            elif k in ("head.weight", "head.bias"):
                k = "head.fc." + k[len("head."):]
            out[k] = v
        return out


_README = "official README"
_DEPLOY = ("params_m: official train-time model; deploy_params_m: the official structural_reparam model; our fuse() "
           "also folds the pre-norm BNs and freezes the final BN, so it ends at {ours}M (official deep_fuse_BN: "
           "{df}M). {macs}")
VARIANTS = {
    "replknet_test": Variant(dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), large_kernels=(13, 11, 9, 7)),
                             input_size=64, notes="tiny config for tests"),
    "replknet_31b":  Variant(dict(), params_m=79.864168, gmacs=15.514, deploy_params_m=79.527272, deploy_gmacs=15.424,
                             paper=Paper(79, 15.3, 83.5, _README + " 'ImageNet-1K Models' (224, IN-1K only)"),
                             notes=_DEPLOY.format(ours=79.388776, df=79.438952, macs=(
                                 "gmacs/deploy_gmacs: fvcore on the official train / structural_reparam model (it "
                                 "counts BN); ours (convs + linear): 15.431 / 15.354"))),
    "replknet_31l":  Variant(dict(dims=(192, 384, 768, 1536)), params_m=172.671016, gmacs=96.0,
                             deploy_params_m=172.165672, deploy_gmacs=96.298, input_size=384, crop_pct=1.0,
                             paper=Paper(172, 96.0, 86.6, _README + " 'ImageNet-22K Models' (IN-22K -> 1K, 384)"),
                             notes=_DEPLOY.format(ours=171.957928, df=172.033192, macs=(
                                 "gmacs: README at 384; deploy_gmacs: fvcore on the official structural_reparam "
                                 "model at 384 (it counts BN); ours: 96.332 train / 95.989 deploy"))),
    "replknet_xl":   Variant(dict(dims=(256, 512, 1024, 2048), large_kernels=(27, 27, 27, 13), small_kernel=None,
                                  dw_ratio=1.5), params_m=335.435752, gmacs=128.7, deploy_params_m=335.399656,
                             deploy_gmacs=128.7, input_size=320, mean=INCEPTION_MEAN, std=INCEPTION_STD,
                             paper=Paper(335, 128.7, 87.8, _README + " 'MegData-73M Models' (-> IN-1K, 320)"),
                             notes=_DEPLOY.format(ours=335.110632, df=335.210984, macs=(
                                 "no small kernel (as the official XL). gmacs: README at 320; ours: 128.730"))),
}
register_family(RepLKNet, VARIANTS, paper="arXiv:2203.06717", kind="convnet", family="replknet")
