"""Feature pyramids for dense heads: the backbone's own multi-scale maps, or a ViTDet simple feature pyramid.

A dense head reads a list of NCHW maps with strictly increasing strides (``feature_info`` reductions). A backbone
whose stages all share one stride (a plain ViT at 1/16, WaveMix at 1/4) gets the simple feature pyramid of ViTDet
(Li et al., 2022, "Exploring Plain Vision Transformer Backbones for Object Detection", arXiv:2203.16527, Sec. 3):
from the last map only, strided transposed convs build the finer levels and max-pooling the coarser ones, each
followed by a 1x1 and a 3x3 conv with LayerNorm. Differs from the paper: a source two or more octaves away from a
target gets a chain of 2x steps (the paper has at most 4x up, 2x down for a 1/16 ViT).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from visionzoo.errors import ArgumentError
from visionzoo.layers import LayerNorm2d

__all__ = ["NECKS", "SimpleFeaturePyramid", "check_pyramid", "is_single_scale"]

NECKS = ("auto", "backbone", "simple")
SIMPLE_STRIDES = (4, 8, 16, 32)


def is_single_scale(strides: Sequence[int]) -> bool:
    """All maps at one stride: a plain (non-hierarchical) backbone."""
    return len(set(strides)) == 1


def check_pyramid(strides: Sequence[int], who: str, head: str, max_finest: int | None = None) -> None:
    """Raise an ``ArgumentError`` naming the fix when ``head`` cannot use maps at ``strides``."""
    strides = list(strides)
    if any(s < 1 or s & (s - 1) for s in strides):
        raise ArgumentError(f"{who}: head {head!r} needs power-of-two feature strides, the backbone gives {strides}")
    if any(b <= a for a, b in zip(strides, strides[1:])):
        raise ArgumentError(f"{who}: head {head!r} needs strictly increasing feature strides, the backbone gives "
                            f"{strides}; choose out_indices with distinct strides, or neck='simple' to build a "
                            f"pyramid from the last map")
    if max_finest is not None and strides[0] > max_finest:
        raise ArgumentError(f"{who}: head {head!r} predicts at the finest stride, which must be <= {max_finest}; "
                            f"the backbone's finest is {strides[0]} (strides {strides}); include earlier stages "
                            f"in out_indices, or neck='simple'")


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one map at ``in_stride`` -> ``dim``-channel maps at ``out_strides``."""

    def __init__(self, in_chans: int, in_stride: int, dim: int = 64,
                 out_strides: Sequence[int] = SIMPLE_STRIDES) -> None:
        super().__init__()
        if in_stride & (in_stride - 1):
            raise ArgumentError(f"simple feature pyramid: the source stride must be a power of two, got {in_stride}")
        self.in_stride, self.strides = in_stride, tuple(out_strides)
        self.levels = nn.ModuleList()
        for s in self.strides:
            steps, layers, c = int(round(math.log2(in_stride / s))), [], in_chans
            for i in range(max(steps, 0)):  # finer: 2x transposed convs, halving channels (LN + GELU between)
                out = max(c // 2, 8)
                layers.append(nn.ConvTranspose2d(c, out, 2, stride=2))
                if i < steps - 1:
                    layers += [LayerNorm2d(out), nn.GELU()]
                c = out
            if steps < 0:  # coarser: max-pool
                layers.append(nn.MaxPool2d(2 ** -steps))
            layers += [nn.Conv2d(c, dim, 1, bias=False), LayerNorm2d(dim),
                       nn.Conv2d(dim, dim, 3, padding=1, bias=False), LayerNorm2d(dim)]
            self.levels.append(nn.Sequential(*layers))
        self.channels = [dim] * len(self.strides)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        x = feats[-1]
        return [level(x) for level in self.levels]
