"""The COCO-style mAP evaluator and the segmentation metrics on known predictions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visionzoo.heads.metrics import DetectionEvaluator, SegMetrics, average_precision

T = torch.tensor


def _pred(boxes, scores, labels):
    return {"boxes": T(boxes, dtype=torch.float32), "scores": T(scores), "labels": T(labels)}


def _gt(boxes, labels):
    return {"boxes": T(boxes, dtype=torch.float32), "labels": T(labels)}


def test_perfect_detections_score_one():
    ev = DetectionEvaluator(num_classes=2)
    ev.update([_pred([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8], [0, 1])],
              [_gt([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1])])
    r = ev.compute()
    assert r["map"] == r["map50"] == 1.0


def test_101_point_interpolation_by_hand():
    # two ground truths; detections TP (0.9), FP (0.8), TP (0.7): precision 1, 1/2, 2/3; recall 1/2, 1/2, 1
    # the envelope is 1, 2/3, 2/3: recall points 0..0.50 (51 of them) read 1, 0.51..1 (50) read 2/3
    want = (51 * 1 + 50 * 2 / 3) / 101
    ap = average_precision(np.array([1, 0, 1], bool), np.array([0.9, 0.8, 0.7]), 2)
    assert ap == pytest.approx(want, abs=1e-12)
    ev = DetectionEvaluator(num_classes=1)
    ev.update([_pred([[0, 0, 10, 10], [50, 50, 60, 60], [20, 0, 30, 10]], [0.9, 0.8, 0.7], [0, 0, 0])],
              [_gt([[0, 0, 10, 10], [20, 0, 30, 10]], [0, 0])])
    assert ev.compute()["map50"] == pytest.approx(want, abs=1e-12)


def test_iou_thresholds_and_duplicates():
    ev = DetectionEvaluator(num_classes=1)
    # IoU 0.72 counts at t = 0.50 .. 0.70 (5 of 10 thresholds); the duplicate (lower score) is a false positive
    # after the true positive, so it does not lower AP (precision 1 at full recall comes first)
    ev.update([_pred([[0, 0, 10, 7.2], [0, 0, 10, 7.2]], [0.9, 0.5], [0, 0])], [_gt([[0, 0, 10, 10]], [0])])
    r = ev.compute()
    assert r["map50"] == 1.0 and r["map"] == pytest.approx(0.5) and r["map75"] == 0.0


def test_duplicate_ranked_first_costs_precision_and_wrong_class_never_matches():
    ev = DetectionEvaluator(num_classes=2)
    # image 1: a wrong-class box (class 1, no class-1 gt anywhere: class 1 is left out of the mean) and a TP
    # image 2: a FP with the highest score of all, then the TP: class 0 precision 1/2 at recall ... see below
    ev.update([_pred([[0, 0, 10, 10], [0, 0, 10, 10]], [0.95, 0.6], [1, 0]),
               _pred([[30, 30, 40, 40], [0, 0, 10, 10]], [0.99, 0.4], [0, 0])],
              [_gt([[0, 0, 10, 10]], [0]), _gt([[0, 0, 10, 10]], [0])])
    # class 0 over both images by score: FP 0.99, TP 0.6, TP 0.4 -> precision 0, 1/2, 2/3, recall 0, 1/2, 1
    # envelope 2/3 everywhere -> AP 2/3 at every threshold
    r = ev.compute()
    assert r["map50"] == pytest.approx(2 / 3) and r["map"] == pytest.approx(2 / 3)
    assert math.isnan(r["per_class"][1])


def test_missed_ground_truth_and_max_dets():
    ev = DetectionEvaluator(num_classes=1, max_dets=1)
    # two gts; two correct boxes but max_dets=1 keeps only the top one: recall 1/2 -> 51 points of 101 read 1
    ev.update([_pred([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 0])],
              [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])])
    assert ev.compute()["map50"] == pytest.approx(51 / 101)
    empty = DetectionEvaluator(num_classes=1)
    empty.update([_pred(torch.zeros(0, 4).tolist(), [], [])], [_gt([[0, 0, 5, 5]], [0])])
    assert empty.compute()["map50"] == 0.0


def test_seg_metrics_by_hand():
    m = SegMetrics(3, ignore_index=255)
    target = T([[[0, 0, 1, 1], [2, 2, 255, 255]]])
    pred = T([[[0, 1, 1, 1], [2, 0, 0, 2]]])
    m.update(pred, target)
    r = m.compute()
    # class 0: TP 1, FP 1 (pixel 5), FN 1 (pixel 1) -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    assert r["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert r["pixel_acc"] == pytest.approx(4 / 6)
