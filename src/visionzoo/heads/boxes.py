"""Box operations in plain torch (no torchvision here): areas, IoU, GIoU, the FCOS box coder and (batched) NMS.

Boxes are ``(x0, y0, x1, y1)`` in pixels, ``x1 > x0``; the IoU and GIoU follow Rezatofighi et al., 2019,
"Generalized Intersection over Union" (arXiv:1902.09630), Alg. 1. NMS is the greedy algorithm: keep the highest
score, drop every remaining box whose IoU with it is above the threshold, repeat.
"""
from __future__ import annotations

import torch
from torch import Tensor

from visionzoo.errors import ArgumentError

__all__ = ["FCOSBoxCoder", "batched_nms", "box_area", "box_iou", "generalized_box_iou", "giou_loss", "nms"]


def _check(boxes: Tensor, name: str) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ArgumentError(f"{name} must be an (N, 4) tensor of (x0, y0, x1, y1) boxes, got shape "
                            f"{tuple(boxes.shape)}")


def box_area(boxes: Tensor) -> Tensor:
    """``(N,)`` areas; degenerate boxes (x1 <= x0) have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter, union


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """``(N, M)`` intersection over union of every pair (0 where the union is empty)."""
    _check(a, "boxes1")
    _check(b, "boxes2")
    inter, union = _inter_union(a, b)
    return inter / union.clamp(min=torch.finfo(inter.dtype).tiny)


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """``(N, M)`` GIoU = IoU - (|C| - |A u B|) / |C|, C the smallest box enclosing both; in [-1, 1]."""
    _check(a, "boxes1")
    _check(b, "boxes2")
    inter, union = _inter_union(a, b)
    eps = torch.finfo(inter.dtype).tiny
    iou = inter / union.clamp(min=eps)
    lt = torch.minimum(a[:, None, :2], b[None, :, :2])
    rb = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=eps)


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """``(N,)`` ``1 - GIoU`` of paired boxes ``pred[i]``, ``target[i]``."""
    lt, rb = torch.maximum(pred[:, :2], target[:, :2]), torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(pred) + box_area(target) - inter
    hull = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).clamp(min=0)
    hull = hull.prod(-1)
    return 1 - (inter / (union + eps) - (hull - union) / (hull + eps))


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices of the boxes greedy NMS keeps, by decreasing score (ties: the lower index first)."""
    _check(boxes, "boxes")
    if scores.shape != boxes.shape[:1]:
        raise ArgumentError(f"scores must have shape ({len(boxes)},), got {tuple(scores.shape)}")
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    over = (box_iou(boxes[order], boxes[order]) > iou_threshold).cpu().numpy()
    removed = [False] * len(order)
    keep = []
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(i)
        for j in over[i, i + 1:].nonzero()[0]:
            removed[i + 1 + j] = True
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category ``idxs`` (boxes of different categories never suppress each other)."""
    _check(boxes, "boxes")
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offset = idxs.to(boxes) * (boxes.max() - boxes.min() + 1)  # move each category to its own region
    return nms(boxes + offset[:, None], scores, iou_threshold)


class FCOSBoxCoder:
    """FCOS's box encoding: a location's distances to the box sides ``(l, t, r, b)``, divided by the level's stride
    (the "normalised regression targets" of the FCOS improvements)."""

    @staticmethod
    def encode(points: Tensor, boxes: Tensor, strides: Tensor | float = 1.0) -> Tensor:
        """``points (N, 2)`` (x, y), ``boxes (N, 4)`` -> ``(N, 4)`` distances / stride."""
        ltrb = torch.cat([points - boxes[:, :2], boxes[:, 2:] - points], -1)
        return ltrb / (strides[:, None] if isinstance(strides, Tensor) else strides)

    @staticmethod
    def decode(points: Tensor, ltrb: Tensor, strides: Tensor | float = 1.0) -> Tensor:
        """Inverse of ``encode``: ``(..., 4)`` distances / stride at ``points`` -> boxes."""
        d = ltrb * (strides[..., None] if isinstance(strides, Tensor) else strides)
        return torch.cat([points - d[..., :2], points + d[..., 2:]], -1)
