"""Head importance: what the model loses when one attention head is removed.

The pruning-based measure of Li et al., "How Does Attention Work in Vision Transformers? A Visual Analytics
Attempt" (TVCG 2023; no code released) and of Michel et al., "Are Sixteen Heads Really Better than One?"
(NeurIPS 2019): mask one head at a time (its output set to zero through ``AttentionCore.head_mask``, the attention
seam) and record, over a batch, the drop of the target logit (and of the accuracy when labels are given).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from visionzoo.layers import AttentionCore

from .attention import record_attention
from .cam import resolve_targets

__all__ = ["HeadImportance", "head_importance"]


@dataclass
class HeadImportance:
    """One row per (attention core, head): ``logit_drop`` (mean over the batch of the target logit's drop),
    ``prob_drop`` (of its softmax probability) and ``acc_drop`` (in %, when labels were given)."""

    rows: list[dict]
    base_logit: float
    base_acc: float | None

    def matrix(self, key: str = "logit_drop") -> tuple[list[str], Tensor]:
        """Core names and a ``(cores, max heads)`` matrix of ``key`` (NaN where a core has fewer heads)."""
        names = list(dict.fromkeys(r["core"] for r in self.rows))
        H = max(r["head"] for r in self.rows) + 1
        m = torch.full((len(names), H), float("nan"))
        for r in self.rows:
            m[names.index(r["core"]), r["head"]] = r[key]
        return names, m


@torch.no_grad()
def head_importance(model: nn.Module, x: Tensor, target: int | Sequence[int] | Tensor | None = None,
                    labels: Tensor | None = None) -> HeadImportance:
    """Mask each head of each attention core in turn (one forward each) and measure the drops; ``target`` defaults
    to the unmasked prediction. A core called several times per forward (row and column attention) has its head
    masked in every call."""
    cores = {n: m for n, m in model.named_modules() if isinstance(m, AttentionCore)}
    with record_attention(model) as rec:
        logits = model(x)
    heads = {}
    for amap in rec.maps:
        heads.setdefault(amap.name, amap.heads)
    targets = resolve_targets(model, logits, target)

    def measure(out: Tensor) -> tuple[Tensor, Tensor, float | None]:
        logit = out.gather(1, targets[:, None])[:, 0].float()
        prob = out.float().softmax(1).gather(1, targets[:, None])[:, 0]
        acc = None if labels is None else 100.0 * (out.argmax(1) == labels.to(out.device)).float().mean().item()
        return logit, prob, acc

    base_logit, base_prob, base_acc = measure(logits)
    rows = []
    for name, n_heads in heads.items():
        core = cores[name]
        for h in range(n_heads):
            mask = torch.ones(n_heads)
            mask[h] = 0.0
            core.head_mask = mask
            try:
                logit, prob, acc = measure(model(x))
            finally:
                core.head_mask = None
            row = dict(core=name, head=h, logit_drop=(base_logit - logit).mean().item(),
                       prob_drop=(base_prob - prob).mean().item())
            if acc is not None:
                row["acc_drop"] = base_acc - acc
            rows.append(row)
    return HeadImportance(rows, base_logit.mean().item(), base_acc)
