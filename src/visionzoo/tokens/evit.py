"""EViT, from "Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations"
(Liang et al., ICLR 2022). https://arxiv.org/abs/2202.07800

At chosen blocks, between attention and MLP, the patch tokens are ranked by the attention the class token pays
them (averaged over heads); the top ``ceil(keep * n)`` are kept and, with ``fuse``, the rest ("inattentive"
tokens) are summed into one token, each weighted by its class attention, appended after the kept ones. The MLP of
that block and all later blocks run on the shorter sequence; a fused token of an earlier block is one more patch
token for the later ones. Class and distillation tokens are always kept. No parameters are added.

Hyper-parameters (youweiliang/evit @ 5ca95a7, code defaults and README recipe): ``keep`` 0.7, blocks 4/7/10 of 12
(``drop_loc=(3, 6, 9)``; for another depth D: D/4, D/2, 3D/4), ``fuse`` on; for training the keep rate is 1 until
``shrink_start_epoch=10`` and falls to the target on a cosine by epoch 10 + ``shrink_epochs=100`` of 300, here
``warmup=(10/300, 110/300)`` as fractions of the training run (``helpers.adjust_keep_rate``). DeiT-S at keep 0.7
with fusion: 197 -> 140 -> 100 -> 72 tokens. Written from the paper and that code (Apache-2.0); differs from it in
keeping the kept tokens in their original order (the official code orders them by score; the output is the same),
and in protecting a distillation token too.
"""
from __future__ import annotations

import math
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
    check_fraction,
    keep_count,
    run_observed,
)

__all__ = ["EViT", "keep_rate_at"]


def keep_rate_at(progress: float, keep: float, warmup: tuple[float, float] | None) -> float:
    """The keep rate after ``progress`` (0..1) of training: 1 before ``warmup[0]``, then a cosine down to ``keep``
    at ``warmup[1]``, then ``keep``."""
    if warmup is None:
        return keep
    start, end = warmup
    if progress < start:
        return 1.0
    if progress >= end:
        return keep
    t = (progress - start) / (end - start)
    return keep + (1.0 - keep) * (math.cos(t * math.pi) + 1) * 0.5


class KeepRate:
    """The keep rate the hooks of one model read: ``value`` in training (it moves with the warm-up), ``target``
    in evaluation (as the official code evaluates at the base keep rate)."""

    def __init__(self, value: float) -> None:
        self.value = self.target = value


class EViTHook(TokenHook):
    """Attention, then keep the top class-attention patches (fusing the rest into one), then the MLP."""

    def __init__(self, state: TokenState, index: int, num_blocks: int, active: bool, keep: KeepRate,
                 fuse: bool) -> None:
        super().__init__(state, index, num_blocks)
        self.active, self.keep, self.fuse = active, keep, fuse

    def run(self, block: TokenBlock, x: Tensor) -> Tensor:
        P = self.state.prefix
        B, N, C = x.shape
        k = keep_count(self.keep.value if self.training else self.keep.target, N - P)
        if not self.active or k >= N - P:
            return super().run(block, x)
        capture = CaptureQKV()
        x = run_observed(block, x, capture)
        cls_attn = capture.class_attention().mean(1)[:, P:]  # (B, h, N) -> (B, n) over the patch tokens
        capture.clear()
        patches = x[:, P:]
        top = cls_attn.topk(k, dim=1).indices.sort(dim=1).values  # (B, k), in token order
        parts = [x[:, :P], patches.gather(1, top[..., None].expand(-1, -1, C))]
        st = self.state
        source = st.source
        if self.fuse:
            rest = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, top, False)
            weight = cls_attn * rest  # (B, n): class attention of the dropped tokens, 0 for the kept ones
            parts.append((patches * weight[..., None].to(patches.dtype)).sum(1, keepdim=True))  # (B, 1, C)
        x = torch.cat(parts, dim=1)
        if source is not None:
            src = source[:, P:]
            rows = [source[:, :P], src.gather(1, top[..., None].expand(-1, -1, src.shape[-1]))]
            if self.fuse:
                rows.append((src * rest[..., None]).amax(1, keepdim=True))
            st.source = torch.cat(rows, dim=1)
        return x + block.mlp_branch(x)

    def extra_repr(self) -> str:
        return f"block={self.index}" + (f", keep={self.keep.value:g}, fuse={self.fuse}" if self.active else "")


class EViT(TokenReduction):
    """Keep the attentive tokens at chosen blocks, fuse the inattentive ones (see the module docstring)."""

    name = "evit"
    defaults: dict[str, Any] = dict(keep=0.7, blocks=None, fuse=True, warmup=(10 / 300, 110 / 300),
                                    trace_source=False)

    def configure(self) -> None:
        p = self.params
        self.target = check_fraction(self.name, "keep", p["keep"])
        warmup = p["warmup"]
        if warmup is not None:
            if (not isinstance(warmup, (list, tuple)) or len(warmup) != 2
                    or not all(isinstance(v, (int, float)) for v in warmup) or not 0 <= warmup[0] < warmup[1] <= 1):
                raise ArgumentError(f"evit: warmup must be None or (start, end) fractions of training with "
                                 f"0 <= start < end <= 1, got {warmup!r}")
            warmup = (float(warmup[0]), float(warmup[1]))
        self.warmup = warmup
        self.keep = KeepRate(self.target)
        self.blocks = [check_blocks(self.name, p["blocks"], len(seq), (len(seq) * k // 4 for k in (1, 2, 3)))
                       for seq in self.sequences]

    def make_hook(self, state: TokenState, index: int, num_blocks: int) -> TokenHook:
        active = index in self.blocks[len(self.states) - 1]
        return EViTHook(state, index, num_blocks, active, self.keep, bool(self.params["fuse"]))

    def on_train_step(self, progress: float) -> None:
        self.keep.value = keep_rate_at(progress, self.target, self.warmup)

    def set_keep(self, keep: float) -> None:
        """Use keep rate ``keep`` from now on, in training and evaluation (``on_train_step`` moves the training
        value again while training with a warm-up)."""
        self.target = self.keep.value = self.keep.target = check_fraction(self.name, "keep", keep)
