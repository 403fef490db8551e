"""How faithful a saliency map is to the model: deletion/insertion AUC and the pointing game.

Deletion and insertion: Petsiuk et al., "RISE", BMVC 2018 (https://arxiv.org/abs/1806.07421), the measures
T-TAME and PACE report. Pixels are ranked by saliency; deletion removes the most salient first (replaces them
with the substrate, zeros of the normalised input: the data set's mean colour, as RISE), insertion puts them
into a blurred copy (Gaussian, kernel 11, sigma 5, as RISE); the target's softmax probability is recorded after
each of ``steps`` equal steps and the area under the curve (trapezoid over the removed fraction, 0..1) is the
score. A faithful map gives a low deletion AUC and a high insertion AUC; the baseline is a random ranking.

Pointing game: Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016: a hit when the
map's maximum falls inside the object's box (grown by ``tolerance`` pixels; the paper uses 15 px at 224 px).
A uniformly random point hits with the box's area fraction: the random baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.errors import ArgumentError

__all__ = ["AucResult", "deletion_insertion", "gaussian_blur", "pointing_game", "random_maps",
           "random_pointing_baseline"]


def gaussian_blur(x: Tensor, sigma: float, kernel: int | None = None) -> Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` with replicate padding (ImageNet-C uses nearest edges)."""
    if sigma <= 0:
        return x
    k = kernel or 2 * int(round(3 * sigma)) + 1
    k = min(k, 2 * (min(x.shape[-2:]) - 1) + 1)  # replicate padding needs pad < size
    r = torch.arange(k, dtype=torch.float32, device=x.device) - k // 2
    w = torch.exp(-r**2 / (2 * sigma**2))
    w = (w / w.sum()).to(x.dtype)
    C = x.shape[1]
    x = F.pad(x, (k // 2, k // 2, 0, 0), mode="replicate")
    x = F.conv2d(x, w.view(1, 1, 1, k).expand(C, 1, 1, k), groups=C)
    x = F.pad(x, (0, 0, k // 2, k // 2), mode="replicate")
    return F.conv2d(x, w.view(1, 1, k, 1).expand(C, 1, k, 1), groups=C)


@dataclass
class AucResult:
    """Per-image ``deletion`` and ``insertion`` AUCs ``(B,)`` and their curves ``(B, steps + 1)``."""

    deletion: Tensor
    insertion: Tensor
    deletion_curve: Tensor
    insertion_curve: Tensor


def _auc(curve: Tensor) -> Tensor:
    return ((curve[:, 1:] + curve[:, :-1]) / 2).mean(1)  # trapezoid over [0, 1] with equal steps


@torch.no_grad()
def deletion_insertion(model: nn.Module, x: Tensor, saliency: Tensor, targets: Tensor, steps: int = 32,
                       batch_size: int = 64, blur_sigma: float = 5.0, blur_kernel: int = 11) -> AucResult:
    """Deletion and insertion AUC of ``saliency`` ``(B, H, W)`` for ``targets`` ``(B,)`` on ``x`` (normalised)."""
    if saliency.shape != (x.shape[0], *x.shape[-2:]):
        raise ArgumentError(f"saliency must be (B, H, W) = {(x.shape[0], *x.shape[-2:])}, got {tuple(saliency.shape)}")
    if steps < 1:
        raise ArgumentError(f"steps must be >= 1, got {steps}")
    B, C, H, W = x.shape
    n = H * W
    order = saliency.reshape(B, n).float().argsort(1, descending=True)  # most salient first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand(B, n).to(order))  # rank of every pixel
    counts = [round(n * i / steps) for i in range(steps + 1)]
    blurred = gaussian_blur(x, blur_sigma, blur_kernel)
    zeros = torch.zeros_like(x)
    curves = {}
    for name, start, fill in (("deletion", x, zeros), ("insertion", blurred, x)):
        out = torch.empty(B, steps + 1)
        for b in range(B):
            imgs = []
            for k in counts:
                chosen = (rank[b] < k).view(1, H, W)
                imgs.append(torch.where(chosen, fill[b], start[b]))
            imgs = torch.stack(imgs)
            probs = torch.cat([model(imgs[i:i + batch_size]).softmax(1) for i in range(0, len(imgs), batch_size)])
            out[b] = probs[:, targets[b]].float().cpu()
        curves[name] = out
    return AucResult(_auc(curves["deletion"]), _auc(curves["insertion"]), curves["deletion"], curves["insertion"])


def random_maps(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """Uniform random saliency (a random pixel ranking): the baseline of deletion/insertion."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _grown(boxes: Tensor, tolerance: int, H: int, W: int) -> Tensor:
    b = boxes.clone().long()
    b[:, :2] = (b[:, :2] - tolerance).clamp_min(0)
    b[:, 2] = (b[:, 2] + tolerance).clamp_max(W)
    b[:, 3] = (b[:, 3] + tolerance).clamp_max(H)
    return b


def pointing_game(maps: Tensor, boxes: Tensor, tolerance: int = 0) -> Tensor:
    """``(B,)`` booleans: the maximum of each map ``(B, H, W)`` lies in its box ``(x0, y0, x1, y1)`` (+ tolerance).

    Where the maximum is a plateau (a coarse map upsampled), the point is the plateau's pixel nearest to its
    centroid, not its first pixel."""
    B, H, W = maps.shape
    flat = maps.reshape(B, -1).float()
    top = flat >= flat.amax(1, keepdim=True) - 1e-6 * flat.abs().amax(1, keepdim=True)  # the maximum (a plateau
    ys, xs = torch.arange(H).repeat_interleave(W).float(), torch.arange(W).repeat(H).float()  # when upsampled)
    n = top.sum(1).clamp_min(1)
    cy, cx = (top * ys).sum(1) / n, (top * xs).sum(1) / n  # its centroid ...
    dist = torch.where(top, (ys - cy[:, None]) ** 2 + (xs - cx[:, None]) ** 2, torch.full_like(flat, float("inf")))
    idx = dist.argmin(1)  # ... and the maximal pixel nearest to it
    y, x = idx // W, idx % W
    b = _grown(boxes, tolerance, H, W)
    return (x >= b[:, 0]) & (x < b[:, 2]) & (y >= b[:, 1]) & (y < b[:, 3])


def random_pointing_baseline(boxes: Tensor, size: tuple[int, int], tolerance: int = 0) -> float:
    """The expected pointing-game accuracy of a uniformly random point: the mean (grown) box area fraction."""
    H, W = size
    b = _grown(boxes, tolerance, H, W)
    return ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).float().div(H * W).mean().item()
