"""ToMe, from "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023). https://arxiv.org/abs/2210.09461

In every block, between attention and MLP, ``r`` tokens are merged away by bipartite soft matching: the patch
tokens alternate between sets A and B, each A token is paired with its most similar B token (cosine similarity of
the block's keys, averaged over heads), and the ``r`` best-matched A tokens are merged into their partners. A merge
is a size-weighted average; each token's size (the patches it stands for) is tracked, and with proportional
attention ``log size`` is added to the attention logits of the following blocks, through the attention core's
``extra_bias``, so SDPA still runs. At most half of the patch tokens can be merged in one block.

Hyper-parameters: ``r`` per block (paper, README: r = 13 for ViT-S/16 and ViT-B/16 off the shelf; DeiT-S r = 8 /
13 / 16 give 3.4 / 2.7 / 2.3 GFLOPs); ``prop_attn`` on (the README: needed off the shelf, can be left off when
training); an ``(r, inflection)`` pair is the paper's schedule (inflection -1 = "decreasing": 2r down to 0).

Written from the paper; the official code (facebookresearch/ToMe) is CC-BY-NC and was not used. Differs from it
only in bookkeeping: the class/distillation tokens are set aside before the A/B split instead of being masked out
of the matching (the same tokens are protected; the alternation starts at the first patch), so a distillation
token keeps its place right after the class token, where DeiT's head reads it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from visionzoo.errors import ArgumentError
from visionzoo.layers import TokenBlock
from visionzoo.tokens.core import (
    CaptureQKV,
    TokenHook,
    TokenReduction,
    TokenState,
    merge_source,
    merge_weighted,
    run_observed,
    scatter_groups,
)

__all__ = ["ToMe", "bipartite_groups", "r_schedule"]


def r_schedule(r: int | list[int] | tuple[int, float], num_blocks: int, method: str = "tome") -> list[int]:
    """Tokens to merge in each of ``num_blocks`` blocks: a constant ``r``, a list (padded with 0), or the paper's
    ``(r, inflection)`` schedule, linear from ``r * (1 - inflection)`` to ``r * (1 + inflection)``."""
    if isinstance(r, bool):
        raise ArgumentError(f"{method}: r must be an int, a list of ints or an (r, inflection) pair, got {r!r}")
    if isinstance(r, int):
        if r < 0:
            raise ArgumentError(f"{method}: r must be >= 0, got {r}")
        return [r] * num_blocks
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], (int, float)):
        r0, inflect = r
        if r0 < 0 or not -1 <= inflect <= 1:
            raise ArgumentError(f"{method}: an (r, inflection) schedule needs r >= 0 and inflection in [-1, 1], "
                             f"got {r!r}")
        lo = int(r0 * (1 - inflect))
        hi = 2 * r0 - lo
        step = (hi - lo) / (num_blocks - 1) if num_blocks > 1 else 0.0
        return [int(lo + step * i) for i in range(num_blocks)]
    if isinstance(r, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r):
        if len(r) > num_blocks:
            raise ArgumentError(f"{method}: r lists {len(r)} values but the model has {num_blocks} blocks")
        return list(r) + [0] * (num_blocks - len(r))
    raise ArgumentError(f"{method}: r must be an int >= 0, a list of ints >= 0 (one per block) or an "
                     f"(r, inflection) pair, got {r!r}")


@torch.no_grad()
def bipartite_groups(metric: Tensor, r: int) -> tuple[Tensor, int]:
    """Bipartite soft matching of the tokens ``metric`` ``(B, n, c)``: the output group of every token, and the count.

    Even tokens are set A, odd ones set B. Each A token's best B match (cosine similarity) is its edge; the ``r``
    A tokens with the strongest edges join their B partner's group. Groups: the unmerged A tokens (in order), then
    every B token (in order).
    """
    B, n, _ = metric.shape
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    na, nb = a.shape[1], b.shape[1]
    scores = a @ b.transpose(1, 2)  # (B, na, c) @ (B, c, nb) -> (B, na, nb) cosine similarities
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:].sort(dim=-1).values
    unmerged = na - r
    ar = torch.arange(max(na, nb), device=metric.device)
    group_a = torch.empty(B, na, dtype=torch.long, device=metric.device)
    group_a.scatter_(1, kept, ar[:unmerged].expand(B, -1))
    group_a.scatter_(1, merged, unmerged + partner.gather(1, merged))
    group = torch.empty(B, n, dtype=torch.long, device=metric.device)
    group[:, ::2] = group_a
    group[:, 1::2] = unmerged + ar[:nb]
    return group, unmerged + nb


class ToMeHook(TokenHook):
    """Attention, then merge ``r`` tokens by bipartite soft matching on the keys, then the MLP."""

    def __init__(self, state: TokenState, index: int, num_blocks: int, r: int) -> None:
        super().__init__(state, index, num_blocks)
        self.r = r

    def run(self, block: TokenBlock, x: Tensor) -> Tensor:
        if self.r == 0:
            return super().run(block, x)
        capture = CaptureQKV()
        x = run_observed(block, x, capture)
        metric = capture.k.mean(1)  # keys averaged over heads: (B, h, N, d) -> (B, N, d)
        capture.clear()
        st, P = self.state, self.state.prefix
        r = min(self.r, (x.shape[1] - P) // 2)
        if r > 0:
            group, G = bipartite_groups(metric[:, P:], r)
            size = st.sizes(x)
            patches = merge_weighted(x[:, P:], size[:, P:], group, G)  # size-weighted mean per group
            st.size = torch.cat([size[:, :P], scatter_groups(size[:, P:], group, G)], dim=1)
            merge_source(st, group, G)
            x = torch.cat([x[:, :P], patches], dim=1)
        return x + block.mlp_branch(x)

    def extra_repr(self) -> str:
        return f"block={self.index}, r={self.r}"


class ToMe(TokenReduction):
    """Token merging: ``r`` tokens fewer after every block (see the module docstring)."""

    name = "tome"
    defaults: dict[str, Any] = dict(r=13, prop_attn=True, trace_source=False)

    def configure(self) -> None:
        self.prop_attn = bool(self.params["prop_attn"])
        self.schedules = [r_schedule(self.params["r"], len(blocks)) for blocks in self.sequences]

    def make_hook(self, state: TokenState, index: int, num_blocks: int) -> TokenHook:
        seq = len(self.states) - 1
        return ToMeHook(state, index, num_blocks, self.schedules[seq][index])
