"""WaveMix, from "WaveMix: A Resource-efficient Neural Network for Image Analysis" (Jeevan et al., 2022).
https://arxiv.org/abs/2205.14375

An isotropic (resolution-preserving) ConvNet: a stem to stride 4 (or ``stride**2``), then ``depth`` WaveMix blocks
at that one resolution. A block reduces the channels to C/4 with a 1x1 conv, takes an L-level 2D Haar DWT (each
level gives LL + 3 detail bands = C channels at half the size), runs a 1x1-conv MLP on the coarsest level, and
climbs back with a 4x4/2 transposed conv + BN per level, concatenating each finer level's coefficients on the way.

Differs from the paper: none in the forward pass. The Haar DWT is ``visionzoo.layers.wavelet`` (plain torch, one
depthwise 2x2/2 conv per level, so it is counted in MACs: 4 MACs per coefficient; pytorch_wavelets, which the
official code uses, hides it from fvcore). The official block recomputes levels 1..j from scratch for every j
(xf1, xf2, xf3 on the same input); we compute the pyramid once, which gives the same coefficients with fewer MACs.
``drop_path_rate`` (stochastic depth on each block's residual branch) is an addition; 0 gives the official model.
Inputs: every side must be a multiple of ``stem reduction * 2**level`` (the DWT halves the map ``level`` times
and the transposed convs double it back); no padding is done. features_only: one map per block, all at the stem's
stride (4 for the patchify stem, ``stride**2`` for the strided one), as for an isotropic ViT.
Follows pranavphoenix/WaveMix (MIT) ``wavemix/__init__.py`` and ``wavemix/classification.py``; official checkpoints
(``conv.*``, ``layers.*``, ``pool.2.*``) load through ``WaveMix.remap``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import DropPath, drop_path_rates, haar_dwt2d
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["WaveMix"]

STEMS = ("pachify", "strided")  # the official spelling of "patchify"


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift``, per channel."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return scale, bn.bias - bn.running_mean * scale


@torch.no_grad()
def _fold_bn_into_deconv(deconv: nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> nn.ConvTranspose2d:
    """A transposed conv with bias computing ``bn(deconv(x))`` in eval mode (its weight is (in, out, kh, kw))."""
    scale, shift = _bn_scale_shift(bn)
    fused = nn.ConvTranspose2d(deconv.in_channels, deconv.out_channels, deconv.kernel_size, deconv.stride,
                               deconv.padding, deconv.output_padding, deconv.groups, bias=True,
                               dilation=deconv.dilation, device=deconv.weight.device, dtype=deconv.weight.dtype)
    fused.weight.copy_(deconv.weight * scale.view(1, -1, 1, 1))
    fused.bias.copy_(shift if deconv.bias is None else deconv.bias * scale + shift)
    return fused


class WaveMixMlp(nn.Sequential):
    """1x1 conv, GELU, dropout, 1x1 conv, then a 4x4/2 transposed conv that doubles the size, and BN."""

    def __init__(self, in_dim: int, hidden_dim: int, ff_dim: int, out_dim: int, drop: float) -> None:
        super().__init__(
            nn.Conv2d(in_dim, hidden_dim, 1), nn.GELU(), nn.Dropout(drop), nn.Conv2d(hidden_dim, ff_dim, 1),
            nn.ConvTranspose2d(ff_dim, out_dim, 4, stride=2, padding=1), nn.BatchNorm2d(out_dim))

    def fuse(self) -> None:
        """Fold the BN into the transposed conv before it."""
        if isinstance(self[5], nn.BatchNorm2d):
            self[4], self[5] = _fold_bn_into_deconv(self[4], self[5]), nn.Identity()


class WaveMixBlock(nn.Module):
    """Channel reduction, an L-level Haar DWT, coarse-to-fine MLPs with transposed-conv upsampling, residual.

    The MLPs keep the official names: ``feedforward`` for a 1-level block, ``feedforward1`` (finest, output
    ``dim``) .. ``feedforward{L}`` (coarsest) otherwise.
    """

    def __init__(self, dim: int, level: int = 3, mult: int = 2, ff_channel: int = 16, mlp_drop: float = 0.5,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.level = level
        self.reduction = nn.Conv2d(dim, dim // 4, 1)
        half = dim // 2
        for j in range(1, level + 1):
            in_dim = dim if j == level else dim + half  # coarsest level: its own coefficients only
            out_dim = dim if j == 1 else half
            self.add_module(self._ff_name(j), WaveMixMlp(in_dim, dim * mult, ff_channel, out_dim, mlp_drop))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _ff_name(self, j: int) -> str:
        return "feedforward" if self.level == 1 else f"feedforward{j}"

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        ll = self.reduction(x)
        bands = []
        for _ in range(self.level):
            ll, highs = haar_dwt2d(ll)
            bands.append(torch.cat((ll, highs.flatten(1, 2)), dim=1))  # (B, C/4, 3, h, w) -> (B, 3C/4, h, w)
        x = getattr(self, self._ff_name(self.level))(bands[-1])
        for j in range(self.level - 1, 0, -1):
            x = getattr(self, self._ff_name(j))(torch.cat((bands[j - 1], x), dim=1))
        return shortcut + self.drop_path(x)


class WaveMixAffine(nn.Module):
    """A per-channel ``x * weight + bias``: what an eval-mode BatchNorm computes, once frozen (``WaveMixStem.fuse``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class WaveMixStem(nn.Sequential):
    """The conv stem; ``fuse()`` turns the patchify stem's last BN (after GELU, and feeding both the first block's
    1x1 conv and its residual, so no conv can absorb it) into a fixed per-channel affine."""

    def fuse(self) -> None:
        last = self[-1]
        if isinstance(last, nn.BatchNorm2d):
            affine = WaveMixAffine(last.num_features).to(last.weight.device, last.weight.dtype)
            with torch.no_grad():
                for param, value in zip((affine.weight, affine.bias), _bn_scale_shift(last)):
                    param.copy_(value)
            self[-1] = affine


class WaveMix(Backbone):
    """WaveMix: a conv stem, then ``depth`` WaveMix blocks at one resolution, global average pool, linear.

    Args:
        dim: channels of the blocks (the official ``final_dim``); a multiple of 4.
        level: DWT levels per block (1 to 4).
        mult: expansion of the first 1x1 conv of every MLP.
        ff_channel: output channels of the MLP's second 1x1 conv (input of the transposed conv).
        stem: ``"pachify"``: 3x3 conv to dim/4, 3x3 conv to dim/2, ``patch_size`` patchify conv, GELU, BN;
            ``"strided"``: two 3x3 convs of stride ``stride`` (dim/2, dim), no norm or activation.
        mlp_drop: dropout inside every MLP (0.5 in all official ImageNet configurations).
    """

    kind = "convnet"
    takes_patch_size = True
    cpu_channels_last = True  # oneDNN convs are faster on NHWC (see Backbone)
    first_conv = "stem.0"

    def __init__(self, dim: int = 192, depth: int = 16, level: int = 3, mult: int = 2, ff_channel: int = 192,
                 stem: str = "pachify", patch_size: int = 4, stride: int = 2, mlp_drop: float = 0.5, *,
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"wavemix: stem must be one of {STEMS}, got {stem!r}")
        if not 1 <= level <= 4:
            raise ValueError(f"wavemix: level must be 1, 2, 3 or 4 (as the official blocks), got {level}")
        if dim % 4:
            raise ValueError(f"wavemix: dim must be a multiple of 4 (the block reduces to dim/4 channels), got {dim}")
        self.in_chans = in_chans
        if stem == "pachify":
            self.stem = WaveMixStem(
                nn.Conv2d(in_chans, dim // 4, 3, padding=1), nn.Conv2d(dim // 4, dim // 2, 3, padding=1),
                nn.Conv2d(dim // 2, dim, patch_size, stride=patch_size), nn.GELU(), nn.BatchNorm2d(dim))
            reduction = patch_size
        else:
            self.stem = WaveMixStem(nn.Conv2d(in_chans, dim // 2, 3, stride, padding=1),
                                    nn.Conv2d(dim // 2, dim, 3, stride, padding=1))
            reduction = stride * stride
        self.min_input_size = self.input_multiple = reduction * 2**level
        dpr = drop_path_rates(drop_path_rate, (depth,))[0]
        self.blocks = nn.ModuleList(WaveMixBlock(dim, level, mult, ff_channel, mlp_drop, dpr[i]) for i in range(depth))
        self.set_feature_info([FeatureInfo(dim, reduction, f"blocks.{i}") for i in range(depth)])
        self.init_head(dim, num_classes, drop_rate)
        # NOTE: PyTorch's default init everywhere, as the official code.

    def stage_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys (``conv.*``, ``layers.*``, ``pool.2.*``) -> ours (``stem.*``, ``blocks.*``, ``head.fc.*``)."""
        prefixes = (("conv.", "stem."), ("layers.", "blocks."), ("pool.2.", "head.fc."))
        out = {}
        for k, v in state_dict.items():
            for old, new in prefixes:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            out[k] = v
        return out


_REPO = "pranavphoenix/WaveMix Saved_weights/ImageNet/"


def _notes(file: str, ckpt: str, size: int, conv: float, bn: float) -> str:
    return (f"official ImageNet config {_REPO}{file} (checkpoint {ckpt}; top-1 from its file name); training/eval "
            f"resolution and paper MACs are not stated in the repo (not pinned); gmacs = fvcore on the official code "
            f"at {size} px: convs {conv} + BN {bn} + pool/linear, the DWT (a custom autograd Function) unseen; ours = "
            f"the same convs + linear + the Haar DWT as a depthwise conv (~0.1% of the total), no BN")


VARIANTS = {
    "wavemix_test":         Variant(dict(dim=32, depth=2, level=2, ff_channel=32), params_m=0.111464, input_size=64,
                                    notes="tiny 2-level config for tests"),
    "wavemix_192_16_l3":    Variant(dict(dim=192, depth=16, level=3, ff_channel=192), params_m=27.857608, gmacs=15.118,
                                    paper=Paper(28.0, None, 75.06, _REPO + "wavemix_28M_75.06.py (params from the file "
                                                "name; README headline 75.32% is not tied to a model)"),
                                    notes=_notes("wavemix_28M_75.06.py", "wavemix_192_16_75.06.pth", 224, 15.094,
                                                 0.023)),
    "wavemix_192_16_l1":    Variant(dict(dim=192, depth=16, level=1, ff_channel=192), params_m=12.494536, gmacs=12.803,
                                    paper=Paper(12.0, None, 71.18, _REPO + "wavemix_12M_71.18.py (params from the file "
                                                "name)"),
                                    notes=_notes("wavemix_12M_71.18.py", "wavemixlite_71.18.pth", 224, 12.782, 0.021)),
    "wavemix_256_16_l3":    Variant(dict(dim=256, depth=16, level=3, ff_channel=256), params_m=49.416808, gmacs=26.837,
                                    paper=Paper(None, None, 73.03, _REPO + "wavemix_73.py"),
                                    notes=_notes("wavemix_73.py", "ImageNet73.03.pth", 224, 26.804, 0.031)),
    "wavemix_256_16_l4_s2": Variant(dict(dim=256, depth=16, level=4, ff_channel=256, stem="strided", stride=2),
                                    params_m=62.764776, gmacs=29.491, input_size=256,
                                    paper=Paper(None, None, 70.42, _REPO + "wavemix_level4_imagenet_70.42.py"),
                                    notes=_notes("wavemix_level4_imagenet_70.42.py", "imagenet4level_70.42.pth", 256,
                                                 29.450, 0.039) + "; the strided stem (stride 4) and 4 levels need "
                                                "sides that are multiples of 64, so 224 is refused: 256 by default"),
}
register_family(WaveMix, VARIANTS, paper="arXiv:2205.14375", kind="convnet", family="wavemix")
