"""Box ops and NMS against hand-computed cases."""
from __future__ import annotations

import pytest
import torch

from visionzoo.errors import ArgumentError
from visionzoo.heads.boxes import FCOSBoxCoder, batched_nms, box_area, box_iou, generalized_box_iou, giou_loss, nms

T = torch.tensor


def test_area_and_iou_by_hand():
    a = T([[0.0, 0, 10, 10], [5, 5, 15, 15]])
    b = T([[0.0, 0, 10, 10], [10, 10, 20, 20], [0, 0, 5, 20]])
    assert box_area(a).tolist() == [100, 100]
    iou = box_iou(a, b)
    # a0-b0 identical; a0-b1 touch at a corner (0); a0-b2: inter 5*10=50, union 100+100-50=150
    # a1-b0: inter 25, union 175; a1-b1: inter 25, union 175; a1-b2: inter 0
    want = T([[1.0, 0, 50 / 150], [25 / 175, 25 / 175, 0]])
    assert torch.allclose(iou, want)


def test_giou_by_hand():
    a = T([[0.0, 0, 10, 10]])
    b = T([[20.0, 0, 30, 10], [0, 0, 10, 10], [5, 0, 15, 10]])
    g = generalized_box_iou(a, b)[0]
    # disjoint: IoU 0, hull 30x10=300, union 200 -> -100/300; same: 1; half overlap: IoU 50/150, hull 150 = union
    assert torch.allclose(g, T([-1 / 3, 1.0, 1 / 3]))
    assert torch.allclose(giou_loss(a.expand(3, 4), b), 1 - g, atol=1e-6)
    far = generalized_box_iou(T([[0.0, 0, 1, 1]]), T([[1000.0, 1000, 1001, 1001]]))
    assert -1 <= far.item() < -0.99


def test_nms_by_hand():
    boxes = T([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]])
    scores = T([0.9, 0.8, 0.7, 0.95])
    # box3 (0.95) first; box0 IoU 90/100 = 0.9 > 0.5 dropped; box1 vs box3: inter 9*8=72, union 90+100-72=118 -> 0.61
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert nms(boxes, scores, 0.95).tolist() == [3, 0, 1, 2]
    # at 0.65 box3 drops box0 (0.9) but not box1 (0.61); box1 vs box0 is 81/119 = 0.68, yet box0 is already gone
    # and a dropped box suppresses nothing, so box1 stays
    assert nms(boxes, scores, 0.65).tolist() == [3, 1, 2]
    assert nms(boxes[:3], scores[:3], 0.7).tolist() == [0, 1, 2]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


def test_batched_nms_keeps_other_classes():
    boxes = T([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    scores = T([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, T([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, T([0, 0, 0]), 0.5).tolist() == [0]


def test_box_coder_round_trip():
    points = T([[8.0, 8.0], [20.0, 12.0]])
    boxes = T([[0.0, 4, 16, 24], [10, 0, 40, 20]])
    ltrb = FCOSBoxCoder.encode(points, boxes, T([8.0, 4.0]))
    assert ltrb.tolist() == [[1.0, 0.5, 1.0, 2.0], [2.5, 3.0, 5.0, 2.0]]
    assert torch.equal(FCOSBoxCoder.decode(points, ltrb, T([8.0, 4.0])), boxes)


def test_bad_boxes():
    with pytest.raises(ArgumentError, match=r"boxes1 must be an \(N, 4\)"):
        box_iou(torch.zeros(3), torch.zeros(2, 4))
    with pytest.raises(ArgumentError, match="scores must have shape"):
        nms(torch.zeros(2, 4), torch.zeros(3), 0.5)
