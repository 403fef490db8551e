"""Stochastic depth."""
from __future__ import annotations

from torch import Tensor, nn


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Drop whole samples of a residual branch with probability ``drop_prob``, rescaling the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Per-sample stochastic depth on a residual branch."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def drop_path_rates(drop_path_rate: float, depths: int | tuple[int, ...] | list[int]) -> list:
    """Linearly increasing drop-path rates over all blocks.

    With an int, returns a flat list of that many rates; with per-stage depths, one list per stage.
    """
    if isinstance(depths, int):
        n = depths
        return [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
    total = sum(depths)
    flat = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start:start + d])
        start += d
    return out
