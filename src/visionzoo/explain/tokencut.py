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

Differs from the paper: the features are a stage's map from ``forward_intermediates`` (any family; the last
stage by default) instead of the keys of a DINO ViT's last attention, which no seam records. No bilateral solver.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.errors import ArgumentError

__all__ = ["TokenCutResult", "ncut", "tokencut"]


@dataclass
class TokenCutResult:
    """``masks`` ``(B, h, w)`` bool (the object's tokens), ``boxes`` ``(B, 4)`` ``(x0, y0, x1, y1)`` in pixels,
    ``eigvecs`` ``(B, h, w)`` (the second eigenvector, sign so that the object is positive)."""

    masks: Tensor
    boxes: Tensor
    eigvecs: Tensor
    stage: int


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


@torch.no_grad()
def tokencut(model: nn.Module, x: Tensor, stage: int = -1, tau: float = 0.2, eps: float = 1e-5) -> TokenCutResult:
    """TokenCut on the features of ``stage`` for each image of ``x``; see the module docstring."""
    if not 0.0 <= tau < 1.0:
        raise ArgumentError(f"tokencut: tau is a cosine-similarity threshold in [0, 1), got {tau}")
    n = len(model.stage_modules())
    if not -n <= stage < n:
        raise ArgumentError(f"tokencut: stage must be in -{n}..{n - 1}, got {stage}")
    fmap = model.forward_intermediates(x, [stage % n])[0].float()  # (B, C, h, w)
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
    return TokenCutResult(torch.stack(masks), torch.stack(boxes), torch.stack(vecs), stage % n)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching boxes ``(B, 4)`` ``(x0, y0, x1, y1)``."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(1).float()
    area = lambda t: (t[:, 2:] - t[:, :2]).clamp_min(0).prod(1).float()  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp_min(1e-12)
