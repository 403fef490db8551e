"""The FCOS head: shapes on every family at two sizes, target assignment by hand, decoding, loss falls."""
from __future__ import annotations

import pytest
import torch
from dense_cases import input_sides, usable

import visionzoo
from visionzoo.errors import ArgumentError
from visionzoo.heads import DenseModel
from visionzoo.train.synthetic import localization_set


@pytest.mark.parametrize("name", visionzoo.list_models("*_test"))
def test_fcos_shapes_two_sizes(name):
    torch.manual_seed(0)
    model = usable(name, "fcos", num_classes=3, dim=16)
    if model is None:
        return
    sides = input_sides(model)
    m = model.input_multiple if len(sides) > 1 else 0
    for side in sides:
        with torch.no_grad():
            out = model(torch.randn(2, 3, side, side + m))
        n = sum(-(-side // s) * -(-(side + m) // s) for s in model.head.strides)
        assert out["cls"].shape == (2, n, 3) and out["reg"].shape == (2, n, 4) and out["ctr"].shape == (2, n)
        assert out["points"].shape == (n, 2) and (out["reg"] >= 0).all()
        dets = model.head.postprocess(out)
        assert len(dets) == 2 and all(d["boxes"].shape[1:] == (4,) for d in dets)


def test_assign_by_hand():
    head = DenseModel("resnet_test", "fcos", num_classes=2, dim=16).head
    # one level at stride 8 (range 0..inf when alone) on a 32x32 image: points at 4, 12, 20, 28
    head.strides, head.levels = [8], [1]
    out = head([torch.zeros(1, c, 32 // s, 32 // s) for c, s in zip([32, 64, 128, 256], [4, 8, 16, 32])], (32, 32))
    boxes = torch.tensor([[0.0, 0, 32, 32], [8.0, 8, 24, 24]])
    cls_t, box_t = head.assign(out, boxes, torch.tensor([0, 1]))
    grid = cls_t.view(4, 4)
    # center sampling, radius 1.5 strides = 12 px around (16, 16): points 12 and 20 on each axis are inside
    # both boxes; the smaller box (class 1) wins there; points at 4 or 28 lie outside the centre region of both
    want = torch.full((4, 4), -1)
    want[1:3, 1:3] = 1
    assert torch.equal(grid, want)
    assert torch.equal(box_t.view(4, 4, 4)[1, 1], boxes[1])


def test_decoding_recovers_planted_box():
    head = DenseModel("resnet_test", "fcos", num_classes=2, dim=16).head
    with torch.no_grad():
        out = head([torch.zeros(1, c, 64 // s, 64 // s) for c, s in zip([32, 64, 128, 256], [4, 8, 16, 32])],
                   (64, 64))
    out["cls"].fill_(-10)
    out["ctr"].fill_(10)
    i = int(((out["points"] - torch.tensor([28.0, 36.0])).abs().sum(1) + (out["strides"] != 8) * 1e3).argmin())
    out["cls"][0, i, 1] = 10.0
    out["reg"][0, i] = torch.tensor([10.0, 12.0, 14.0, 4.0]) / 8  # distances / stride
    det = head.postprocess(out)[0]
    assert det["labels"].tolist() == [1]
    assert det["boxes"][0].tolist() == pytest.approx([18.0, 24.0, 42.0, 40.0])


def test_fcos_loss_falls_on_fixed_batch():
    torch.manual_seed(0)
    ds = localization_set(4, 64, seed=0)
    x = ds.images.float() / 255
    targets = [dict(boxes=b[None].float(), labels=lab[None]) for b, lab in zip(ds.boxes, ds.labels)]
    model = DenseModel("resnet_test", "fcos", num_classes=4, dim=16)
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    losses = []
    for _ in range(12):
        loss = model.loss(model(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_fcos_needs_a_coarse_level():
    with pytest.raises(ArgumentError, match=r"'fcos' needs pyramid levels at stride >= 8.*\[4\]"):
        DenseModel("convnext_test", "fcos", out_indices=(0,), neck="backbone")
