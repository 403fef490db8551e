"""ATS, from "Adaptive Token Sampling for Efficient Vision Transformers" (Fayyaz et al., ECCV 2022).
https://arxiv.org/abs/2111.15667

At chosen blocks each patch token gets a significance score, the class token's attention to it (summed over
heads) times the norm of its value vector, normalised to sum to 1. The scores are sorted and their cumulative
distribution is min-max normalised; ``K - 1`` evenly spaced points on its y-axis, from its smallest non-zero value
to 1, each pick the token whose CDF value is nearest (inverse transform sampling). Duplicates fall away, so an
image whose significance is concentrated keeps fewer tokens: the count varies per image. A batch then carries
padding, masked out of every later attention as a ``-inf`` key bias on the attention core (SDPA still runs); the
padding is zeroed, and after the last block it is set to the mean of the image's real patch tokens so that an
average-pooling head sees only real tokens. Parameter-free; it works off the shelf and can be fine-tuned.

Hyper-parameters (adaptivetokensampling/ATS @ 9271257, ``configs/ImageNet/DeiT_S.yaml`` and ``ats_block.py``):
blocks 4-12 of 12 (``ATS_BLOCKS: [3..11]``; for depth D: D/4 .. D-1); ``tokens``, the upper bound K (class
token included), 197 for DeiT-S (no cap: the sampling alone decides), given here as a count or as a fraction
of the input tokens (1.0 = that shipped setting); at least 8. Written from the paper and that code; differs from it
in sampling after the attention output of the block is computed for every token (the official code computes it for
the kept rows only: the same values for the kept tokens, a little more compute), in keeping the kept tokens in
their original order (the official orders them by score), and in protecting a distillation token too.
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
    check_blocks,
    gather_source,
    run_observed,
)

__all__ = ["ATS", "inverse_transform_sample"]

MIN_TOKENS = 8  # the official code never samples fewer


@torch.no_grad()
def inverse_transform_sample(score: Tensor, samples: int) -> Tensor:
    """Which tokens ``samples`` evenly spaced points of the CDF of ``score`` ``(B, n)`` pick: ``(B, n)`` booleans."""
    B, n = score.shape
    sorted_score, order = score.sort(dim=1)  # ascending
    cdf = sorted_score.cumsum(dim=1)
    lo, hi = cdf[:, :1], cdf[:, -1:]
    cdf = (cdf - lo) / (hi - lo).clamp_min(torch.finfo(cdf.dtype).tiny)  # min-max normalised, (B, n)
    start = torch.where(cdf > 0, cdf, torch.full_like(cdf, float("inf"))).amin(dim=1, keepdim=True)
    start = torch.where(torch.isfinite(start), start, torch.ones_like(start))
    steps = torch.linspace(0, 1, samples, device=score.device, dtype=cdf.dtype)
    ys = start + (1 - start) * steps  # (B, samples), from the smallest non-zero CDF value to 1
    pick = (ys[:, :, None] - cdf[:, None, :]).abs().argmin(dim=-1)  # (B, samples) positions in sorted order
    picked_sorted = torch.zeros(B, n, dtype=torch.bool, device=score.device).scatter(1, pick, True)
    return torch.zeros_like(picked_sorted).scatter(1, order, picked_sorted)


class ATSHook(TokenHook):
    """Attention, then keep the tokens inverse transform sampling picks (a per-image count), then the MLP."""

    def __init__(self, state: TokenState, index: int, num_blocks: int, active: bool, tokens: int | float) -> None:
        super().__init__(state, index, num_blocks)
        self.active, self.tokens = active, tokens

    def run(self, block: TokenBlock, x: Tensor) -> Tensor:
        if not self.active:
            return super().run(block, x)
        st, P = self.state, self.state.prefix
        B, N, C = x.shape
        capture = CaptureQKV()
        x = run_observed(block, x, capture)
        v = capture.v.transpose(1, 2).reshape(B, N, -1)  # (B, h, N, d) -> (B, N, h * d)
        score = capture.class_attention().sum(1) * v.norm(dim=-1)  # (B, N): class attention x value norm
        capture.clear()
        score = score[:, P:].float()
        if st.mask is not None:
            score = score * st.mask[:, P:]
        score = score / score.sum(dim=1, keepdim=True).clamp_min(torch.finfo(score.dtype).tiny)
        K = self.tokens if isinstance(self.tokens, int) else round(self.tokens * st.counts[0])
        keep = inverse_transform_sample(score, max(K, MIN_TOKENS) - 1)
        if st.mask is not None:
            keep &= st.mask[:, P:]
        counts = keep.sum(dim=1)  # (B,) kept patch tokens per image
        width = int(counts.max())
        index = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :width]  # kept first, in token order
        valid = torch.arange(width, device=x.device) < counts[:, None]  # (B, width)
        patches = x[:, P:].gather(1, index[..., None].expand(-1, -1, C)) * valid[..., None].to(x.dtype)
        x = torch.cat([x[:, :P], patches], dim=1)
        gather_source(st, index)
        uniform = bool(counts.min() == width)
        st.mask = None if uniform else torch.cat([valid.new_ones(B, P), valid], dim=1)
        if st.mask is not None and st.source is not None:
            st.source = st.source * st.mask[..., None].to(st.source.dtype)
        return x + block.mlp_branch(x)

    def extra_repr(self) -> str:
        return f"block={self.index}" + (f", tokens={self.tokens}" if self.active else "")


class ATS(TokenReduction):
    """Adaptive token sampling at chosen blocks (see the module docstring)."""

    name = "ats"
    defaults: dict[str, Any] = dict(tokens=1.0, blocks=None, trace_source=False)

    def configure(self) -> None:
        t = self.params["tokens"]
        ok = (not isinstance(t, bool) and ((isinstance(t, int) and t >= 2) or
                                           (isinstance(t, float) and 0 < t <= 1)))
        if not ok:
            raise ArgumentError(f"ats: tokens (the most tokens a sampling block keeps, class token included) must be "
                             f"an int >= 2 or a fraction in (0, 1] of the input tokens, got {t!r}")
        self.blocks = [check_blocks(self.name, self.params["blocks"], len(seq), range(len(seq) // 4, len(seq)))
                       for seq in self.sequences]

    def make_hook(self, state: TokenState, index: int, num_blocks: int) -> TokenHook:
        active = index in self.blocks[len(self.states) - 1]
        return ATSHook(state, index, num_blocks, active, self.params["tokens"])
