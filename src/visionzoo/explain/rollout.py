"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).
https://arxiv.org/abs/2005.00928

Per block, the heads' attention matrices are fused (mean, max or min over heads), optionally the weakest
``discard_ratio`` of the entries are dropped (jacobgil/vit-explain, MIT: its ``vit_rollout.py`` keeps the
prefix column), the identity is added for the residual path and the rows are re-normalised:
``Â = (A + I) / rowsum``; then ``R = Â_L ... Â_1``. The relevance of the patch tokens is the prefix (class)
token's row of ``R``; a model without a prefix token gets the mean of ``R``'s rows (how much each token feeds
all tokens), our extension. Defaults: mean fusion and no discarding, as in the paper (vit-explain's example uses
max fusion with discard 0.9).

What rollout covers here: the attention calls on the **last token map** (every block of a ViT/DeiT; the last
stage of a hierarchical model). Rollout multiplies token-to-token matrices, so it stops where the token set
changes (patch merging, strided token embedding between stages: not attention). Within that map, each call
becomes one ``N x N`` matrix:

- global self-attention: as recorded;
- global attention whose keys are a pooled grid of the image (PVT's spatial reduction, CvT's strided key
  projection): each pooled key's weight is spread evenly over the query tokens of its cell (an approximation:
  the pooled key stands for its cell);
- windowed self-attention (Swin windows, CSWin stripes, MaxViT blocks/grids, RMT rows/columns): the windows
  are scattered back into a block-sparse matrix with the core's ``partition`` and ``shift``; rows that lost
  weight to padding tokens are re-normalised. Tokens then mix across windows only through shifted windows,
  grids or the next call, and rollout follows exactly that;
- class attention (only the prefix tokens query all tokens; CaiT-style heads): the prefix rows as recorded,
  identity rows for the patch tokens, which the call leaves unchanged;
- calls whose keys are per-query sets (TransNeXt's aggregated attention: a halo plus pooled tokens) have no
  token-to-token matrix: rollout refuses them with the reason.

Parallel branches of one block (cores held by the modules of one ``nn.ModuleList``, e.g. CSWin's horizontal and
vertical stripes on two halves of the heads) are one block: their heads are fused together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from visionzoo.errors import ArgumentError

from .attention import AttentionMap, key_grid, record_attention, stage_reduction, token_layout

__all__ = ["HEAD_FUSIONS", "Rollout", "attention_rollout", "token_matrix"]

HEAD_FUSIONS = ("mean", "max", "min")


def _window_index(amap: AttentionMap, reduction: int | None) -> tuple[Tensor, int]:
    """For each window position of the (padded) partition, its token index in the ``Ht * Wt`` map (-1 = padding)."""
    Ht, Wt, nWh, nWw = token_layout(amap, reduction)
    gh, gw = amap.grid
    Hp, Wp = nWh * gh, nWw * gw
    rows, cols = torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij")
    valid = (rows < Ht) & (cols < Wt)
    sy, sx = amap.shift
    idx = torch.where(valid, ((rows + sy) % Ht) * Wt + (cols + sx) % Wt, torch.full_like(rows, -1))
    if amap.partition == "grid":  # (Hp, Wp) -> (gh, nWh, gw, nWw) -> (nWh, nWw, gh, gw)
        idx = idx.reshape(gh, nWh, gw, nWw).permute(1, 3, 0, 2)
    else:  # (Hp, Wp) -> (nWh, gh, nWw, gw) -> (nWh, nWw, gh, gw)
        idx = idx.reshape(nWh, gh, nWw, gw).permute(0, 2, 1, 3)
    return idx.reshape(nWh * nWw, gh * gw), Ht * Wt


def token_matrix(amap: AttentionMap, reduction: int | None = None) -> Tensor:
    """One call as a row-stochastic ``(B, heads, N, N)`` matrix over its map's ``prefix + Ht * Wt`` tokens.

    Raises ``ValueError`` (with the reason) when the call's keys are not tokens of that map; see the module
    docstring for the cases.
    """
    probs = amap.probs.float()
    heads, Nq, Nk = probs.shape[-3:]
    probs = probs.reshape(-1, heads, Nq, Nk)
    p = amap.prefix_tokens
    if amap.windows == 1 and Nq == p and key_grid(amap) is not None:
        # class attention (CaiT, SpectFormer-H): only the prefix tokens query, the patch tokens pass unchanged
        out = torch.eye(Nk).expand(probs.shape[0], heads, Nk, Nk).clone()
        out[:, :, :p] = probs
        return out
    if amap.windows == 1:
        if amap.self_attention:
            return probs
        kg = key_grid(amap)
        if kg is None:
            raise ArgumentError(f"{amap.name}: {Nk} keys for {Nq} queries that are neither the queries nor a "
                                f"pooled grid "
                             f"of the image (per-query key sets), so it has no token-to-token matrix for rollout; "
                             f"use per-head maps (attention_maps) or a CAM")
        gh, gw = amap.grid
        kh, kw = kg
        cell = (torch.arange(gh)[:, None] * kh // gh) * kw + torch.arange(gw)[None, :] * kw // gw  # (gh, gw)
        spread = torch.zeros(p + kh * kw, Nq)
        spread[torch.arange(p), torch.arange(p)] = 1.0
        spread[p + cell.flatten(), p + torch.arange(gh * gw)] = 1.0
        spread = spread / spread.sum(1, keepdim=True)  # each pooled key spread evenly over its cell
        return probs @ spread  # (B, h, Nq, Nk) @ (Nk, Nq) -> (B, h, Nq, Nq)
    if not amap.self_attention or p:
        raise ArgumentError(f"{amap.name}: windowed attention with {Nk} keys for {Nq} queries (per-query key "
                            f"sets), so it "
                         f"has no token-to-token matrix for rollout; use per-head maps (attention_maps) or a CAM")
    idx, N = _window_index(amap, reduction)
    nW, n = idx.shape
    B = probs.shape[0] // nW
    probs = probs.reshape(B, nW, heads, n, n)
    valid = idx >= 0  # (nW, n)
    pair = (idx[:, :, None] * N + idx[:, None, :]).clamp_min(0)  # (nW, n, n) flat index of (query, key)
    keep = (valid[:, :, None] & valid[:, None, :]).flatten()
    flat = probs.permute(0, 2, 1, 3, 4).reshape(B, heads, -1)[..., keep]  # (B, h, kept pairs)
    out = torch.zeros(B, heads, N * N)
    out.index_add_(2, pair.flatten()[keep], flat)
    out = out.reshape(B, heads, N, N)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-12)


@dataclass
class Rollout:
    """``matrix``: ``(B, N, N)`` rollout over ``blocks`` (their core names, first to last); ``maps``: ``(B, h, w)``
    token relevance; ``grid``: ``(h, w)``; ``prefix_tokens``: prefix tokens ahead of the grid's in ``matrix``."""

    matrix: Tensor
    maps: Tensor
    grid: tuple[int, int]
    prefix_tokens: int
    blocks: list[str]


def _parallel_key(model: nn.Module, name: str) -> str | None:
    """The ``nn.ModuleList`` holding the module that owns core ``name`` (parallel branches), if any."""
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    parent = owner.rsplit(".", 1)[0] if "." in owner else ""
    mods = dict(model.named_modules())
    return parent if isinstance(mods.get(parent), nn.ModuleList) else None


def attention_rollout(model: nn.Module, x: Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0
                      ) -> Rollout:
    """Attention rollout of ``model`` on ``x`` over its last token map (see the module docstring)."""
    if head_fusion not in HEAD_FUSIONS:
        raise ArgumentError(f"rollout: head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ArgumentError(f"rollout: discard_ratio must be in [0, 1), got {discard_ratio}")
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    calls = rec.maps
    # the last token map: walk back while the calls cover the same (Ht, Wt) with the same prefix
    last = calls[-1]
    layout = token_layout(last, stage_reduction(model, last.name))[:2]
    mats: list[tuple[str, str | None, Tensor]] = []
    for amap in reversed(calls):
        red = stage_reduction(model, amap.name)
        if amap.prefix_tokens != last.prefix_tokens or token_layout(amap, red)[:2] != layout:
            break
        mats.append((amap.name, _parallel_key(model, amap.name), token_matrix(amap, red)))
    mats.reverse()
    # parallel branches of one block: one matrix with all their heads
    blocks: list[tuple[list[str], Tensor]] = []
    for name, group, m in mats:
        if blocks and group is not None and blocks[-1][0][-1] != name and \
                _parallel_key(model, blocks[-1][0][-1]) == group:
            blocks[-1] = (blocks[-1][0] + [name], torch.cat([blocks[-1][1], m], dim=1))
        else:
            blocks.append(([name], m))
    B, _, N, _ = blocks[0][1].shape
    eye = torch.eye(N)
    result = eye.expand(B, N, N).clone()
    p = last.prefix_tokens
    for _, m in blocks:
        fused = {"mean": lambda t: t.mean(1), "max": lambda t: t.amax(1), "min": lambda t: t.amin(1)}[head_fusion](m)
        if discard_ratio > 0:
            rank = fused.clone()
            rank[..., :p] = float("inf")  # never drop what the prefix columns receive
            k = int(N * (N - p) * discard_ratio)
            low = rank.reshape(B, -1).topk(k, dim=1, largest=False).indices
            fused = fused.reshape(B, -1).scatter(1, low, 0.0).reshape(B, N, N)
        a = (fused + eye) / 2
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    rel = result[:, :p, p:].mean(1) if p else result[:, :, p:].mean(1)  # (B, Ht * Wt)
    maps = rel.reshape(B, *layout)
    return Rollout(result, maps, layout, p, [n for names, _ in blocks for n in names])
