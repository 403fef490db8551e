"""MCTF, from "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision Transformers"
(Lee et al., CVPR 2024). https://arxiv.org/abs/2403.10030

Like ToMe, the patch tokens alternate between sets A and B and pairs are merged, but a pair's score multiplies
three criteria: similarity ``((cos + 1) / 2) ** (1 / tau_sim)`` of the tokens, informativeness (both tokens
should receive little attention: the inverse of the mean attention each receives, ``** (1 / tau_info)``) and
size (both should be small: inverse sizes, ``** (1 / tau_size)``). Merging is bidirectional: the best ``r // 2``
A tokens merge into their B partners, then the best ``r - r // 2`` B tokens merge into the remaining A tokens.
A merged token is the mean of its tokens weighted by attention received times size.

One-step-ahead attention: in each reducing block the block's own attention map is computed first (queries and keys
of the unmerged tokens), the block's input tokens are fused using it, and the map itself is fused (columns summed,
rows averaged with the same weights) and applied to the values of the fused tokens; so the informativeness is that
of the attention the tokens are about to receive. Queries and keys run on the unmerged tokens, values, the output
projection and the MLP on the merged ones. The fused map is applied without being built (``_fused_attention``:
the same output, less memory traffic on CPU, 0.015 GMACs more on DeiT-S). Proportional attention (log size as a
key bias) as in ToMe.

Token-reduction consistency (``consistency=True``, for fine-tuning): each step runs the model twice, a student at
``r`` and a teacher at a random ``r`` in ``[0, r_teacher_max)``; loss = CE(student) + CE(teacher) + 3 x the squared
error between their class tokens (teacher detached), counted only for images whose student confidence in the
target class exceeds 0.4.

Hyper-parameters (mlvlab/MCTF @ 2004da0, README and ``run/eval_deit_s_mctf.sh``): r = 16 in blocks 2-12 of 12
(``activate_layer [1..11]``), ``tau_sim`` 1, ``tau_info`` 20, ``tau_size`` 40, bidirectional, attention- and
size-weighted pooling (``pooling_type=1``), ``prop_attn`` and ``one_step_ahead`` on; training ``r_teacher_max`` 8,
task weights [1, 1, 3], confidence threshold 0.4. DeiT-S r = 16: 2.60 GFLOPs (README). Written from the paper and
that code; differs in setting the class/distillation tokens aside before the A/B split (as our ToMe) instead of
masking their scores, in applying attention dropout (0 in DeiT) to the unfused map, in using the class token after
the final norm of ``forward_features`` for consistency, and in reading the confidence of soft targets (mixup) at
their largest class.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.errors import ArgumentError
from visionzoo.layers import TokenBlock
from visionzoo.tokens.core import (
    TokenHook,
    TokenReduction,
    TokenState,
    check_blocks,
    merge_source,
    merge_weighted,
    scatter_groups,
)

__all__ = ["MCTF", "mctf_groups"]


@torch.no_grad()
def mctf_groups(metric: Tensor, received: Tensor, size: Tensor, r: int, tau_sim: float = 1.0, tau_info: float = 20.0,
                tau_size: float = 40.0, bidirectional: bool = True) -> tuple[Tensor, int]:
    """Multi-criteria bipartite matching of ``n`` tokens: the output group of each, and the number of groups.

    ``metric`` ``(B, n, c)`` the tokens, ``received`` ``(B, n)`` the mean attention each receives, ``size``
    ``(B, n)`` their sizes. Groups: the A tokens left after the first direction (in order), then the B tokens
    left after the second.
    """
    B, n, _ = metric.shape
    dev = metric.device
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    na, nb = a.shape[1], b.shape[1]
    scores = a @ b.transpose(1, 2)  # (B, na, c) @ (B, c, nb) -> (B, na, nb) cosine similarities
    scores = ((scores + 1) / 2) ** (1 / tau_sim) if tau_sim else torch.ones_like(scores)
    for value, tau in ((received, tau_info), (size, tau_size)):
        if tau:
            inv = 1 / value.float().clamp_min(torch.finfo(torch.float32).tiny)
            inv = inv / inv.amax(dim=1, keepdim=True)
            scores = scores * (inv[:, ::2, None] * inv[:, None, 1::2]) ** (1 / tau)  # both tokens small
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src_a, unm_a = order[:, :r1], order[:, r1:].sort(dim=-1).values
    ar = torch.arange(max(na, nb), device=dev)
    group_b = torch.empty(B, nb, dtype=torch.long, device=dev)
    if r2:
        back = scores.gather(1, unm_a[..., None].expand(-1, -1, nb)).transpose(1, 2)  # (B, nb, na - r1)
        best2, partner2 = back.max(dim=-1)  # partner2: position among the unmerged A tokens = their group
        order2 = best2.argsort(dim=-1, descending=True)
        src_b, unm_b = order2[:, :r2], order2[:, r2:].sort(dim=-1).values
        group_b.scatter_(1, src_b, partner2.gather(1, src_b))
    else:
        unm_b = ar[:nb].expand(B, -1)
    group_b.scatter_(1, unm_b, (na - r1) + ar[:nb - r2].expand(B, -1))
    group_a = torch.empty(B, na, dtype=torch.long, device=dev)
    group_a.scatter_(1, unm_a, ar[:na - r1].expand(B, -1))
    group_a.scatter_(1, src_a, group_b.gather(1, partner.gather(1, src_a)))  # A sources follow their B partner
    group = torch.empty(B, n, dtype=torch.long, device=dev)
    group[:, ::2] = group_a
    group[:, 1::2] = group_b
    return group, (na - r1) + (nb - r2)


class Rate:
    """The ``r`` the hooks of one model read: the student's, or a teacher's while ``override`` is set."""

    def __init__(self, r: int | float) -> None:
        self.r = r
        self.override: int | None = None

    def tokens(self, n: int, total: int) -> int:
        """Tokens to merge from ``n`` patch tokens (``total`` with the prefix): capped at half and leaving 10."""
        r = self.r if self.override is None else self.override
        r = int(n * r) if isinstance(r, float) else r
        r = min(r, total - 10, n // 2)
        return max(r, 0)


class MCTFHook(TokenHook):
    """Fuse tokens by multi-criteria matching, with one-step-ahead attention (or after the block without it)."""

    def __init__(self, state: TokenState, index: int, num_blocks: int, active: bool, rate: Rate,
                 opts: dict[str, Any]) -> None:
        super().__init__(state, index, num_blocks)
        self.active, self.rate, self.opts = active, rate, opts

    def _plan(self, x: Tensor, probs: Tensor, size: Tensor, r: int) -> tuple[Tensor, int, Tensor]:
        P, o = self.state.prefix, self.opts
        received = probs.mean(dim=(1, 2))  # (B, h, N, N) -> (B, N): mean attention each token receives
        group, G = mctf_groups(x[:, P:], received[:, P:], size[:, P:, 0], r, o["tau_sim"], o["tau_info"],
                               o["tau_size"], o["bidirectional"])
        weight = (received[:, P:] * size[:, P:, 0]).detach()  # (B, n) attention x size pooling weights
        return group, G, weight

    def _merge(self, x: Tensor, size: Tensor, group: Tensor, G: int, weight: Tensor) -> Tensor:
        st, P = self.state, self.state.prefix
        st.size = torch.cat([size[:, :P], scatter_groups(size[:, P:], group, G)], dim=1)
        merge_source(st, group, G)
        return torch.cat([x[:, :P], merge_weighted(x[:, P:], weight, group, G)], dim=1)

    def run(self, block: TokenBlock, x: Tensor) -> Tensor:
        P = self.state.prefix
        r = self.rate.tokens(x.shape[1] - P, x.shape[1]) if self.active else 0
        if r == 0:
            return super().run(block, x)
        size = self.state.sizes(x)
        if not self.opts["one_step_ahead"]:
            x, probs = _attn_with_probs(block, x)
            x = x + block.mlp_branch(x)
            group, G, weight = self._plan(x, probs, size, r)
            return self._merge(x, size, group, G, weight)
        probs = block.attn_probs(x)  # (B, h, N, N) of the unmerged tokens, key bias included
        group, G, weight = self._plan(x, probs, size, r)
        x = self._merge(x, size, group, G, weight)
        x = x + block.attn_branch(x, attend=_fused_attention(probs, group, G, weight, P))
        return x + block.mlp_branch(x)

    def extra_repr(self) -> str:
        return f"block={self.index}" + (f", r={self.rate.r}" if self.active else "")


def _fused_attention(probs: Tensor, group: Tensor, G: int, weight: Tensor, P: int) -> Callable[[Tensor], Tensor]:
    """The fused map applied to the fused tokens' values: ``attend(v)`` for ``TokenBlock.attn_branch``.

    The fused map sums the columns of a group and averages its rows with ``weight``: ``P' = R P C``. Rather than
    building it, ``P' v' = R (P (C v'))``: each token takes its group's value (``C v'``, a gather), the map of the
    unmerged tokens is applied (``(N, N) @ (N, d)``), and the rows of each group are averaged (``R``). The same
    result without any ``(N, N)`` elementwise work; it costs ``N^2 d`` multiply-adds where the fused map costs
    ``N'^2 d`` (0.015 GMACs more on DeiT-S at r = 16).
    """
    B, n = group.shape
    w = weight.to(probs.dtype)
    den = scatter_groups(w, group, G)[:, None, :, None].clamp_min(torch.finfo(w.dtype).tiny)  # (B, 1, G, 1)

    def attend(v: Tensor) -> Tensor:
        H, d = v.shape[1], v.shape[-1]
        spread = v[:, :, P:].gather(2, group[:, None, :, None].expand(B, H, n, d))  # (B, h, G, d) -> (B, h, n, d)
        y = probs @ torch.cat([v[:, :, :P], spread], dim=2)  # (B, h, N, N) @ (B, h, N, d) -> (B, h, N, d)
        rows = scatter_groups(y[:, :, P:] * w[:, None, :, None], group, G, dim=2) / den  # (B, h, G, d)
        return torch.cat([y[:, :, :P], rows], dim=2)
    return attend


def _attn_with_probs(block: TokenBlock, x: Tensor) -> tuple[Tensor, Tensor]:
    """``x + attn_branch(x)`` and the probabilities it used (the core's observer: the explicit path)."""
    core, seen = block.attn_core, []
    previous = core.observer
    core.observer = lambda c, probs, grid: seen.append(probs)
    try:
        x = x + block.attn_branch(x)
    finally:
        core.observer = previous
    return x, seen[-1]


class MCTF(TokenReduction):
    """Multi-criteria token fusion with one-step-ahead attention (see the module docstring)."""

    name = "mctf"
    defaults: dict[str, Any] = dict(r=16, blocks=None, one_step_ahead=True, prop_attn=True, tau_sim=1.0,
                                    tau_info=20.0, tau_size=40.0, bidirectional=True, trace_source=False,
                                    consistency=False, r_teacher_max=8, consistency_weight=3.0, confidence=0.4)

    def configure(self) -> None:
        p = self.params
        r = p["r"]
        if isinstance(r, bool) or not ((isinstance(r, int) and r >= 0) or (isinstance(r, float) and 0 <= r < 1)):
            raise ArgumentError(f"mctf: r must be an int >= 0 (tokens per block) or a fraction in [0, 1) of the "
                             f"block's patch tokens, got {r!r}")
        for k in ("tau_sim", "tau_info", "tau_size", "consistency_weight", "confidence"):
            if isinstance(p[k], bool) or not isinstance(p[k], (int, float)) or p[k] < 0:
                raise ArgumentError(f"mctf: {k} must be a number >= 0, got {p[k]!r}")
        if isinstance(p["r_teacher_max"], bool) or not isinstance(p["r_teacher_max"], int) or p["r_teacher_max"] < 0:
            raise ArgumentError(f"mctf: r_teacher_max must be an int >= 0, got {p['r_teacher_max']!r}")
        self.prop_attn = bool(p["prop_attn"])
        self.rate = Rate(r)
        self.opts = {k: p[k] for k in ("tau_sim", "tau_info", "tau_size")}
        self.opts.update(bidirectional=bool(p["bidirectional"]), one_step_ahead=bool(p["one_step_ahead"]))
        self.blocks = [check_blocks(self.name, p["blocks"], len(seq), range(1, len(seq))) for seq in self.sequences]
        if self.opts["one_step_ahead"]:
            for seq in self.sequences:
                attn = getattr(seq[0], "attn", None)
                if not callable(getattr(attn, "attention_probs", None)):
                    raise ArgumentError(f"mctf: one-step-ahead attention needs blocks whose attention gives its "
                                     f"probabilities alone (layers.Attention.attention_probs); "
                                     f"{type(seq[0]).__name__} has none. Pass one_step_ahead=False")
        self.training_loss = self.consistency_loss if p["consistency"] else None

    def make_hook(self, state: TokenState, index: int, num_blocks: int) -> TokenHook:
        active = index in self.blocks[len(self.states) - 1]
        return MCTFHook(state, index, num_blocks, active, self.rate, self.opts)

    def consistency_loss(self, model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Token-reduction consistency: ``(loss, student logits)`` for soft ``target`` ``(B, classes)``."""
        p = self.params
        self.rate.override = int(torch.randint(0, p["r_teacher_max"], ())) if p["r_teacher_max"] > 0 else 0
        try:
            feats_t = model.forward_features(x)
            logits_t = model.forward_head(feats_t)
        finally:
            self.rate.override = None
        feats_s = model.forward_features(x)
        logits_s = model.forward_head(feats_s)
        ce = _soft_ce(logits_s, target) + _soft_ce(logits_t, target)
        with torch.no_grad():
            confident = logits_s.float().softmax(-1).gather(1, target.argmax(-1, keepdim=True))[:, 0] > p["confidence"]
        mse = (feats_t[:, 0].detach().float() - feats_s[:, 0].float()).pow(2).mean(dim=1)  # (B,) class tokens
        consistency = (mse * confident).sum() / confident.sum().clamp_min(1)
        return ce + p["consistency_weight"] * consistency, logits_s


def _soft_ce(logits: Tensor, target: Tensor) -> Tensor:
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()

