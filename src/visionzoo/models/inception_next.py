"""InceptionNeXt, from "InceptionNeXt: When Inception Meets ConvNeXt" (Yu et al., CVPR 2024).
https://arxiv.org/abs/2303.16900

Differs from the paper: none. Follows sail-sg/inceptionnext (Apache-2.0) and timm ``inception_next.py``
(Apache-2.0); the state-dict layout is timm's except the classifier MLP, which is the ``pre_logits`` of the one
``ClassifierHead`` (``head.pre_logits.fc``, ``head.pre_logits.norm``, ``head.fc``): ``InceptionNeXt.remap`` converts
timm checkpoints (``head.fc1``, ``head.norm``, ``head.fc2``) and so the official release files, which timm loads
with no key filter.

``fuse()`` folds every BatchNorm: the stem's into its conv (the generic walk), and the two that sit *before* a conv
(downsample ``BN -> 2x2 conv``, block ``token mixer -> BN -> 1x1 conv``) into that conv, which is exact because
neither conv pads (``layers.fold_bn_into_conv``), in the stage's and the block's ``fuse()``.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    ConvMlp,
    DropPath,
    LayerType,
    drop_path_rates,
    fold_bn_into_conv,
    fold_channel_scale,
    get_act,
    init_trunc_normal,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["InceptionNeXt"]


class InceptionDWConv2d(nn.Module):
    """Split channels into an identity part and three depthwise branches (k x k, 1 x band, band x 1), concat."""

    def __init__(self, dim: int, square_kernel_size: int = 3, band_kernel_size: int = 11,
                 branch_ratio: float = 0.125) -> None:
        super().__init__()
        gc = int(dim * branch_ratio)  # channels of each conv branch
        if gc < 1 or 3 * gc > dim:
            raise ValueError(f"inception_next: branch_ratio={branch_ratio} gives {gc} channels per branch for dim "
                             f"{dim}; need 1 <= 3 * int(dim * branch_ratio) <= dim")
        if square_kernel_size % 2 == 0 or band_kernel_size % 2 == 0:
            raise ValueError(f"inception_next: kernel sizes must be odd (same padding), got square "
                             f"{square_kernel_size} and band {band_kernel_size}")
        self.dwconv_hw = nn.Conv2d(gc, gc, square_kernel_size, padding=square_kernel_size // 2, groups=gc)
        self.dwconv_w = nn.Conv2d(gc, gc, (1, band_kernel_size), padding=(0, band_kernel_size // 2), groups=gc)
        self.dwconv_h = nn.Conv2d(gc, gc, (band_kernel_size, 1), padding=(band_kernel_size // 2, 0), groups=gc)
        self.split_indexes = (dim - 3 * gc, gc, gc, gc)

    def forward(self, x: Tensor) -> Tensor:
        x_id, x_hw, x_w, x_h = torch.split(x, self.split_indexes, dim=1)
        return torch.cat((x_id, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)), dim=1)


class InceptionNeXtBlock(nn.Module):
    """x + gamma * ConvMlp(BN(token_mixer(x))), the MetaNeXt block."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, mixer_args: dict | None = None, ls_init: float | None = 1e-6,
                 act_layer: LayerType = "gelu", drop_path: float = 0.0) -> None:
        super().__init__()
        self.token_mixer = InceptionDWConv2d(dim, **(mixer_args or {}))
        self.norm = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(mlp_ratio * dim), act_layer=act_layer)
        self.gamma = nn.Parameter(torch.full((dim,), float(ls_init))) if ls_init else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.mlp(self.norm(self.token_mixer(x)))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)  # (C,) -> (1, C, 1, 1)
        return x + self.drop_path(y)

    def fuse(self) -> None:
        """Fold the BatchNorm into the MLP's first 1x1 conv after it, and the layer scale into its last one."""
        if isinstance(self.norm, nn.BatchNorm2d):
            self.mlp.fc1 = fold_bn_into_conv(self.norm, self.mlp.fc1)
            self.norm = nn.Identity()
        if self.gamma is not None:
            fold_channel_scale(self.mlp.fc2, self.gamma)
            self.gamma = None


class InceptionNeXtStage(nn.Module):
    """Optional downsample (BN, 2x2 stride-2 conv), then ``depth`` blocks."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, stride: int = 2, drop_path: list[float] | None = None,
                 **block_args) -> None:
        super().__init__()
        if stride > 1 or in_dim != out_dim:
            self.downsample = nn.Sequential(nn.BatchNorm2d(in_dim), nn.Conv2d(in_dim, out_dim, stride, stride=stride))
        else:
            self.downsample = nn.Identity()
        drop_path = drop_path or [0.0] * depth
        self.blocks = nn.Sequential(*[InceptionNeXtBlock(out_dim, drop_path=drop_path[i], **block_args)
                                      for i in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))

    def fuse(self) -> None:
        """Fold the downsample's BatchNorm into the 2x2 conv after it (the blocks fuse themselves)."""
        if isinstance(self.downsample, nn.Sequential) and isinstance(self.downsample[0], nn.BatchNorm2d):
            self.downsample[1] = fold_bn_into_conv(self.downsample[0], self.downsample[1])
            self.downsample[0] = nn.Identity()


class InceptionNeXtHeadMlp(nn.Module):
    """The classifier's hidden layer: Linear (C -> ratio*C), GELU, LayerNorm (a ``ClassifierHead`` pre_logits)."""

    def __init__(self, dim: int, hidden: int, act_layer: LayerType = "gelu") -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.act = get_act(act_layer)()
        self.norm = nn.LayerNorm(hidden, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.act(self.fc(x)))


class InceptionNeXt(Backbone):
    """InceptionNeXt (timm's ``MetaNeXt``): ConvNeXt's macro design with BatchNorm, an Inception depthwise token
    mixer, 1x1-conv MLPs and an MLP classifier head.

    Args:
        mlp_ratios: block MLP ratio per stage (3 in the last stage of every released model).
        band_kernel_size, branch_ratio, square_kernel_size: the token mixer's band length (1 x k and k x 1 convs),
            the share of channels given to each of its three conv branches, and its square kernel.
        head_mlp_ratio: hidden width of the classifier MLP, as a multiple of the last stage's width.
    """

    kind = "convnet"
    cpu_channels_last = True  # oneDNN convs are faster on NHWC (see Backbone)
    first_conv = "stem.0"

    def __init__(self, depths: tuple[int, ...] = (3, 3, 9, 3), dims: tuple[int, ...] = (96, 192, 384, 768),
                 mlp_ratios: tuple[float, ...] = (4, 4, 4, 3), band_kernel_size: int = 11, branch_ratio: float = 0.125,
                 square_kernel_size: int = 3, head_mlp_ratio: float = 3.0, ls_init: float | None = 1e-6,
                 act_layer: LayerType = "gelu", *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not len(depths) == len(dims) == len(mlp_ratios) == 4:
            raise ValueError(f"inception_next: depths, dims and mlp_ratios need 4 entries (one per stage), got "
                             f"{tuple(depths)}, {tuple(dims)}, {tuple(mlp_ratios)}")
        self.in_chans = in_chans
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), nn.BatchNorm2d(dims[0]))
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        mixer_args = dict(square_kernel_size=square_kernel_size, band_kernel_size=band_kernel_size,
                          branch_ratio=branch_ratio)
        self.stages = nn.ModuleList([
            InceptionNeXtStage(dims[max(i - 1, 0)], dims[i], depths[i], stride=2 if i > 0 else 1, drop_path=dpr[i],
                               mlp_ratio=mlp_ratios[i], mixer_args=mixer_args, ls_init=ls_init, act_layer=act_layer)
            for i in range(4)])
        self.set_feature_info([FeatureInfo(d, 4 * 2**i, f"stages.{i}") for i, d in enumerate(dims)])
        hidden = int(head_mlp_ratio * dims[-1])
        self.init_head(dims[-1], num_classes, drop_rate, pre_logits=InceptionNeXtHeadMlp(dims[-1], hidden, act_layer),
                       hidden_size=hidden)
        self.apply(init_trunc_normal)

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """timm keys (and so the official release files) -> ours: the classifier MLP becomes the head's pre_logits."""
        out = {}
        for k, v in state_dict.items():
            k = re.sub(r"^head\.fc1\.", "head.pre_logits.fc.", k)
            k = re.sub(r"^head\.norm\.", "head.pre_logits.norm.", k)
            k = re.sub(r"^head\.fc2\.", "head.fc.", k)
            out[k] = v
        return out


_README = "official README (sail-sg/inceptionnext), ImageNet-1K table at 224"
_NOTES = ("weights inception_next_{size}.sail_in1k (timm results-imagenet.csv @224: {top1}). gmacs: fvcore on the "
          "official file; visionzoo.profile gives {ours} (it skips BatchNorm/LayerNorm, which fvcore counts)")

VARIANTS = {
    "inception_next_test":  Variant(dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)), params_m=0.623700,
                                    input_size=64, notes="tiny config for tests"),
    "inception_next_atto":  Variant(dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), band_kernel_size=9,
                                         branch_ratio=0.25), params_m=4.156520, gmacs=0.505,
                                    paper=Paper(4.2, 0.51, 75.3, _README),
                                    notes=_NOTES.format(size="atto", top1=75.348, ours=0.503)),
    "inception_next_tiny":  Variant(dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)), params_m=28.055680,
                                    gmacs=4.195, paper=Paper(28, 4.2, 82.3, _README),
                                    notes=_NOTES.format(size="tiny", top1=82.508, ours=4.189)),
    "inception_next_small": Variant(dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)), params_m=49.374016,
                                    gmacs=8.364, paper=Paper(49, 8.4, 83.5, _README),
                                    notes=_NOTES.format(size="small", top1=83.584, ours=8.356)),
    "inception_next_base":  Variant(dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)), params_m=86.672136,
                                    gmacs=14.853, paper=Paper(87, 14.9, 84.0, _README), crop_pct=0.95,
                                    notes=_NOTES.format(size="base", top1=84.098, ours=14.841) +
                                    "; the 384 px fine-tune (sail_in1k_384, README 85.2 top-1, 43.6 GMACs) is the "
                                    "same model run at 384"),
}
register_family(InceptionNeXt, VARIANTS, paper="arXiv:2303.16900", kind="convnet", family="inception_next")
