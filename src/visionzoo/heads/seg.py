"""Semantic-segmentation heads over a feature pyramid: FPN, UPerNet and SegFormer's all-MLP decoder.

Each head takes the pyramid's ``channels`` and ``strides`` (finest first), predicts class logits at the finest
stride and upsamples them bilinearly to the input size.

- ``FPNSegHead``: Kirillov et al., 2019, "Panoptic Feature Pyramid Networks" (arXiv:1901.02446), Sec. 3: an FPN
  (lateral 1x1, top-down nearest 2x + add, 3x3 output convs), then per level a chain of (3x3 conv, GN, ReLU, 2x
  bilinear up) to the finest stride, summed, a 1x1 classifier. Paper widths 256 (FPN) / 128 (semantic branch).
- ``UPerHead``: Xiao et al., 2018, "Unified Perceptual Parsing" (arXiv:1807.10221), as open-mmlab/mmsegmentation's
  ``UPerHead`` (Apache-2.0, read for facts): a pyramid pooling module (pool scales 1, 2, 3, 6; Zhao et al., PSPNet)
  on the coarsest map, FPN laterals and 3x3 convs on the others, all upsampled to the finest and concatenated,
  a 3x3 fuse conv, dropout 0.1, a 1x1 classifier. mmseg width 512.
- ``SegFormerHead``: Xie et al., 2021, "SegFormer" (arXiv:2105.15203), Sec. 3.2: per level a linear layer to
  ``dim``, upsampled to the finest stride, concatenated, a 1x1 fuse conv + norm + ReLU, dropout 0.1, a 1x1
  classifier. Paper width 256 (B0) / 768.

Differs from the papers: GroupNorm instead of (Sync)BatchNorm after every conv, so a head trains at batch 1-2 on
one CPU; default widths are smaller (``dim``, set by ``DenseModel``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FPNSegHead", "SegFormerHead", "UPerHead", "conv_norm_act"]


def _groups(c: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if c % g == 0 and c // g >= 2:
            return g
    return 1


def conv_norm_act(in_dim: int, out_dim: int, k: int = 3) -> nn.Sequential:
    """Conv (no bias), GroupNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, k, padding=k // 2, bias=False),
                         nn.GroupNorm(_groups(out_dim), out_dim), nn.ReLU(inplace=True))


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="bilinear",
                                                                      align_corners=False)


class FPN(nn.Module):
    """Lin et al., 2017 (arXiv:1612.03144): lateral 1x1 convs, top-down upsample + add, 3x3 output convs."""

    def __init__(self, channels: Sequence[int], dim: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in channels)
        self.output = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in channels)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 2, -1, -1):  # coarse -> fine
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.output, lat)]


class FPNSegHead(nn.Module):
    """Panoptic FPN's semantic branch on an FPN."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], num_classes: int, dim: int = 128) -> None:
        super().__init__()
        self.fpn = FPN(channels, dim)
        inner = max(dim // 2, 8)
        self.branches = nn.ModuleList()
        for s in strides:
            ups = (s // strides[0]).bit_length() - 1  # octaves above the finest level
            layers = [conv_norm_act(dim if i == 0 else inner, inner) for i in range(max(ups, 1))]
            self.branches.append(nn.ModuleList(layers))
        self.classifier = nn.Conv2d(inner, num_classes, 1)

    def forward(self, feats: list[Tensor], out_size: Sequence[int]) -> Tensor:
        pyr = self.fpn(feats)
        size = pyr[0].shape[-2:]
        x = 0
        for branch, p in zip(self.branches, pyr):
            for conv in branch:
                p = conv(p)
                if p.shape[-2] < size[0]:
                    p = F.interpolate(p, scale_factor=2, mode="bilinear", align_corners=False)
            x = x + _resize(p, size)
        return _resize(self.classifier(x), out_size)


class PPM(nn.Module):
    """PSPNet's pyramid pooling: adaptive average pools, 1x1 conv each, upsampled and concatenated with the input."""

    def __init__(self, in_dim: int, dim: int, scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.convs = nn.ModuleList(conv_norm_act(in_dim, dim, 1) for _ in scales)
        self.bottleneck = conv_norm_act(in_dim + len(scales) * dim, dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        outs = [x] + [_resize(conv(F.adaptive_avg_pool2d(x, s)), x.shape[-2:]) for s, conv in zip(self.scales,
                                                                                                    self.convs)]
        return self.bottleneck(torch.cat(outs, 1))


class UPerHead(nn.Module):
    """UPerNet: PPM on the coarsest map, FPN on the rest, all levels fused at the finest stride."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], num_classes: int, dim: int = 128,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        self.ppm = PPM(channels[-1], dim, pool_scales)
        self.lateral = nn.ModuleList(conv_norm_act(c, dim, 1) for c in channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_norm_act(dim, dim, 3) for _ in channels[:-1])
        self.fuse = conv_norm_act(len(channels) * dim, dim, 3)
        self.drop = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats: list[Tensor], out_size: Sequence[int]) -> Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, feats[:-1])] + [self.ppm(feats[-1])]
        for i in range(len(lat) - 2, -1, -1):  # coarse -> fine, bilinear as mmseg
            lat[i] = lat[i] + _resize(lat[i + 1], lat[i].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[-2:]
        x = self.fuse(torch.cat([_resize(o, size) for o in outs], 1))
        return _resize(self.classifier(self.drop(x)), out_size)


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], num_classes: int, dim: int = 128,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in channels)  # a per-pixel Linear(C_i, dim)
        self.fuse = conv_norm_act(len(channels) * dim, dim, 1)
        self.drop = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats: list[Tensor], out_size: Sequence[int]) -> Tensor:
        size = feats[0].shape[-2:]
        x = torch.cat([_resize(lin(f), size) for lin, f in zip(self.linears, feats)], 1)
        return _resize(self.classifier(self.drop(self.fuse(x))), out_size)
