"""TokenCut: object discovery by a normalized cut over patch features (Wang et al., CVPR 2022).
https://arxiv.org/abs/2202.11539

Algorithm (the paper; YangtaoWANG95/TokenCut ``object_discovery.py`` read for the facts):
1. patch features of one image, L2-normalised; the graph's edge weights are their cosine similarities, binarised:
   1 where >= ``tau`` (0.2), ``eps`` (1e-5) elsewhere;
2. the normalized cut's relaxation ``(D - A) v = lambda D v``: the eigenvector of the second-smallest eigenvalue
   (solved as the symmetric ``D^-1/2 (D - A) D^-1/2``);
3. bipartition at its mean; the foreground is the side holding the patch of largest ``|v|`` (the seed);
4. the 4-connected component of the foreground around the seed is the object: its mask and its box, scaled by
   the stride of the features.

Features (``features=``): ``"keys"``, the paper's choice, are the keys of the last attention call in ``stage`` (its
``layers.AttentionCore`` shows them to a ``qkv_observer``), heads concatenated, prefix tokens dropped; they apply
where that call attends over the stage's whole token grid (ViT, DeiT, a global-attention stage). ``"stage"`` is the
stage's map from ``forward_intermediates`` (any family). ``"auto"`` takes keys where they apply, else the map.
Differs from the paper: no bilateral solver; any trained model, not only DINO's self-supervised ViTs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.errors import ArgumentError
from visionzoo.layers import AttentionCore

__all__ = ["TokenCutResult", "ncut", "tokencut"]


@dataclass
class TokenCutResult:
    """``masks`` ``(B, h, w)`` bool (the object's tokens), ``boxes`` ``(B, 4)`` ``(x0, y0, x1, y1)`` in pixels,
    ``eigvecs`` ``(B, h, w)`` (the second eigenvector, sign so that the object is positive)."""

    masks: Tensor
    boxes: Tensor
    eigvecs: Tensor
    stage: int
    features: str = "stage"


def _component(fg: Tensor, seed: tuple[int, int]) -> Tensor:
    """The 4-connected component of boolean ``fg`` ``(h, w)`` holding ``seed``."""
    comp = torch.zeros_like(fg)
    comp[seed] = True
    while True:
        grown = comp.clone()
        grown[1:] |= comp[:-1]
        grown[:-1] |= comp[1:]
        grown[:, 1:] |= comp[:, :-1]
        grown[:, :-1] |= comp[:, 1:]
        grown &= fg
        if torch.equal(grown, comp):
            return comp
        comp = grown


def ncut(feats: Tensor, grid: tuple[int, int], tau: float = 0.2, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """One image's ``(N, C)`` features on an ``(h, w)`` grid -> (object mask ``(h, w)``, eigenvector ``(h, w)``)."""
    f = F.normalize(feats.double(), dim=1)
    A = f @ f.T
    A = torch.where(A >= tau, torch.ones_like(A), torch.full_like(A, eps))
    d = A.sum(1)
    d_isqrt = d.rsqrt()
    L = d_isqrt[:, None] * (torch.diag(d) - A) * d_isqrt[None, :]
    _, vecs = torch.linalg.eigh(L)
    v = d_isqrt * vecs[:, 1]  # generalised eigenvector of the second-smallest eigenvalue
    fg = v > v.mean()
    seed = int(v.abs().argmax())
    if not fg[seed]:
        fg, v = ~fg, -v
    h, w = grid
    mask = _component(fg.view(h, w), (seed // w, seed % w))
    return mask, v.view(h, w).float()


def _stage_keys(model: nn.Module, x: Tensor, stage: int) -> tuple[Tensor, Tensor | None]:
    """The stage's map ``(B, C, h, w)`` and the keys of its last attention call as a map ``(B, heads * d, h, w)``,
    or None where that call does not attend over the stage's whole grid (windows, strides, none)."""
    seen: list[tuple[AttentionCore, Tensor]] = []
    cores = [m for m in model.stage_modules()[stage].modules() if isinstance(m, AttentionCore)]
    saved = [c.qkv_observer for c in cores]

    def observe(core: AttentionCore, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> None:
        seen.append((core, k))

    for c, prev in zip(cores, saved):
        c.qkv_observer = observe if prev is None else _chain(prev, observe)
    try:
        fmap = model.forward_intermediates(x, [stage])[0].float()
    finally:
        for c, prev in zip(cores, saved):
            c.qkv_observer = prev
    B, _, h, w = fmap.shape
    if not seen:
        return fmap, None
    core, k = seen[-1]
    if k.ndim != 4 or k.shape[0] != B or k.shape[2] - core.prefix_tokens != h * w:
        return fmap, None
    k = k[:, :, core.prefix_tokens:].float()  # (B, heads, p + hw, d) -> (B, heads, hw, d)
    return fmap, k.permute(0, 1, 3, 2).reshape(B, -1, h, w)  # -> (B, heads * d, h, w)


def _chain(first, second):  # noqa: ANN001, ANN202
    def both(*args):  # noqa: ANN002, ANN202
        first(*args)
        second(*args)
    return both


@torch.no_grad()
def tokencut(model: nn.Module, x: Tensor, stage: int = -1, tau: float = 0.2, eps: float = 1e-5,
             features: str = "auto") -> TokenCutResult:
    """TokenCut on the keys or the map of ``stage`` (``features``) for each image of ``x``; see the module
    docstring."""
    if not 0.0 <= tau < 1.0:
        raise ArgumentError(f"tokencut: tau is a cosine-similarity threshold in [0, 1), got {tau}")
    if features not in ("auto", "keys", "stage"):
        raise ArgumentError(f"tokencut: features must be 'auto', 'keys' or 'stage', got {features!r}")
    n = len(model.stage_modules())
    if not -n <= stage < n:
        raise ArgumentError(f"tokencut: stage must be in -{n}..{n - 1}, got {stage}")
    fmap, keys = _stage_keys(model, x, stage % n)  # (B, C, h, w), keys or None
    if features == "keys" and keys is None:
        raise ArgumentError(f"{getattr(model, 'name', 'model')}: stage {stage % n} has no attention over its whole "
                            f"token grid, so no keys to cut; use features='stage' (its map)")
    used = "keys" if keys is not None and features != "stage" else "stage"
    if used == "keys":
        fmap = keys
    B, C, h, w = fmap.shape
    H, W = x.shape[-2:]
    masks, vecs, boxes = [], [], []
    for b in range(B):
        mask, v = ncut(fmap[b].flatten(1).T, (h, w), tau, eps)  # (C, h, w) -> (N, C)
        rows, cols = torch.nonzero(mask, as_tuple=True)
        sy, sx = H / h, W / w
        x0, y0, x1, y1 = cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1
        boxes.append(torch.tensor([int(x0 * sx), int(y0 * sy), min(W, round(x1 * sx)), min(H, round(y1 * sy))]))
        masks.append(mask)
        vecs.append(v)
    return TokenCutResult(torch.stack(masks), torch.stack(boxes), torch.stack(vecs), stage % n, used)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching boxes ``(B, 4)`` ``(x0, y0, x1, y1)``."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(1).float()
    area = lambda t: (t[:, 2:] - t[:, :2]).clamp_min(0).prod(1).float()  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp_min(1e-12)
