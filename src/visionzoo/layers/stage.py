"""A ConvNeXt-style stage: an optional LayerNorm + strided-conv downsample, then a run of blocks."""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .norm import LayerNorm2d


class DownsampleStage(nn.Module):
    """``downsample`` (LayerNorm2d, then a ``stride`` x ``stride`` conv with that stride; identity when the stride is
    1 and the width stays), then ``blocks``: ``make_block(i)`` for ``i`` in ``range(depth)`` (ConvNeXt, HorNet)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, make_block: Callable[[int], nn.Module],
                 stride: int = 2) -> None:
        super().__init__()
        if stride > 1 or in_dim != out_dim:
            self.downsample = nn.Sequential(LayerNorm2d(in_dim), nn.Conv2d(in_dim, out_dim, stride, stride=stride))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[make_block(i) for i in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))
