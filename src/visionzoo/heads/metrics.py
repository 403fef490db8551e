"""Dense-task metrics: COCO-style detection mAP, segmentation mIoU and pixel accuracy.

``DetectionEvaluator`` follows the COCO evaluation (cocodataset/cocoapi ``COCOeval``, read for facts; no crowd
regions and one area range "all"): per image, detections sorted by score (at most ``max_dets`` per image) are
matched greedily to the unmatched ground truth box of the same class with the highest IoU >= t; over all images a
class's detections are sorted by score, precision is made non-increasing from the right and read at the 101 recall
points 0, 0.01, ..., 1 (0 where that recall is never reached); AP is their mean. mAP averages the classes that
have ground truth; mAP@[.5:.95] also averages t = 0.50, 0.55, ..., 0.95.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from visionzoo.errors import ArgumentError
from visionzoo.heads.boxes import box_iou

__all__ = ["IOU_THRESHOLDS", "DetectionEvaluator", "SegMetrics", "average_precision"]

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def average_precision(tp: np.ndarray, scores: np.ndarray, num_gt: int) -> float:
    """COCO's 101-point interpolated AP of detections with ``scores`` marked true positive by ``tp``."""
    if num_gt == 0:
        raise ArgumentError("average_precision: a class without ground truth has no AP")
    order = np.argsort(-scores, kind="mergesort")
    tp = tp[order].astype(np.float64)
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    recall = ctp / num_gt
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    return float(np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0).mean()
                 if len(precision) else 0.0)


@dataclass
class _Image:
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor


@dataclass
class DetectionEvaluator:
    """Collect ``update(predictions, targets)`` per batch, then ``compute()``.

    ``predictions``: one dict per image with ``boxes (N, 4)``, ``scores (N,)``, ``labels (N,)``; ``targets``: one
    dict per image with ``boxes (M, 4)``, ``labels (M,)``.
    """

    num_classes: int
    max_dets: int = 100
    images: list[_Image] = field(default_factory=list)

    def update(self, predictions: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        if len(predictions) != len(targets):
            raise ArgumentError(f"update: {len(predictions)} predictions for {len(targets)} targets; give one dict "
                                f"per image in each")
        for p, t in zip(predictions, targets):
            keep = torch.sort(p["scores"], descending=True, stable=True).indices[:self.max_dets]
            self.images.append(_Image(p["boxes"][keep].detach().float().cpu(), p["scores"][keep].detach().float().cpu(),
                                      p["labels"][keep].cpu(), t["boxes"].float().cpu(), t["labels"].cpu()))

    def _matches(self, c: int, t: float) -> tuple[np.ndarray, np.ndarray, int]:
        tps, scores, num_gt = [], [], 0
        for im in self.images:
            d, g = im.labels == c, im.gt_labels == c
            boxes, sc, gts = im.boxes[d], im.scores[d], im.gt_boxes[g]
            num_gt += len(gts)
            if len(boxes) == 0:
                continue
            order = torch.sort(sc, descending=True, stable=True).indices
            boxes, sc = boxes[order], sc[order]
            tp = np.zeros(len(boxes), dtype=bool)
            if len(gts):
                iou = box_iou(boxes, gts).double().numpy()
                taken = np.zeros(len(gts), dtype=bool)
                for i in range(len(boxes)):
                    cand = np.where(taken, -1.0, iou[i])
                    j = int(cand.argmax())
                    if cand[j] >= min(t, 1 - 1e-10):
                        taken[j], tp[i] = True, True
            tps.append(tp)
            scores.append(sc.numpy())
        if not tps:
            return np.zeros(0, dtype=bool), np.zeros(0), num_gt
        return np.concatenate(tps), np.concatenate(scores), num_gt

    def compute(self) -> dict[str, float | list[float]]:
        """``map`` (@[.5:.95]), ``map50``, ``map75`` and ``per_class`` AP@[.5:.95] (nan: no ground truth)."""
        ap = np.full((len(IOU_THRESHOLDS), self.num_classes), np.nan)
        for c in range(self.num_classes):
            for k, t in enumerate(IOU_THRESHOLDS):
                tp, scores, num_gt = self._matches(c, float(t))
                if num_gt:
                    ap[k, c] = average_precision(tp, scores, num_gt)
        has_gt = ~np.isnan(ap[0])
        if not has_gt.any():
            return dict(map=float("nan"), map50=float("nan"), map75=float("nan"), per_class=ap.mean(0).tolist())
        return dict(map=float(ap[:, has_gt].mean()), map50=float(ap[0, has_gt].mean()),
                    map75=float(ap[5, has_gt].mean()), per_class=ap.mean(0).tolist())


class SegMetrics:
    """Confusion matrix over pixels -> mIoU (mean over classes present in prediction or truth) and pixel accuracy.

    ``ignore_index`` pixels of the target are skipped. ``reduce()`` sums the matrix across DDP ranks."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred``: ``(B, H, W)`` class indices or ``(B, K, H, W)`` logits; ``target``: ``(B, H, W)``."""
        if pred.ndim == 4:
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ArgumentError(f"SegMetrics: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        keep = target != self.ignore_index
        idx = target[keep].long() * self.num_classes + pred[keep].long()
        self.confusion += torch.bincount(idx, minlength=self.num_classes ** 2).view_as(self.confusion)

    def reduce(self) -> SegMetrics:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.confusion)
        return self

    def iou(self) -> list[float]:
        """Per-class IoU = TP / (TP + FP + FN); nan for a class absent from both."""
        c = self.confusion.double().cpu()
        tp = c.diag()
        union = c.sum(0) + c.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.tensor(float("nan"))).tolist()

    def compute(self) -> dict[str, float | list[float]]:
        ious = self.iou()
        present = [v for v in ious if v == v]
        c = self.confusion.double()
        return dict(miou=sum(present) / max(len(present), 1), pixel_acc=float(c.diag().sum() / c.sum().clamp(min=1)),
                    per_class_iou=ious)
