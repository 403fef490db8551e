"""Segmentation heads on every family's ``*_test`` variant, through ``features_only`` only."""
from __future__ import annotations

import pytest
import torch
from dense_cases import input_sides, usable

import visionzoo
from visionzoo.errors import ArgumentError
from visionzoo.heads import HEADS, DenseModel, SimpleFeaturePyramid

SEG_HEADS = sorted(h for h, (task, _, _) in HEADS.items() if task == "seg")


@pytest.mark.parametrize("head", SEG_HEADS)
@pytest.mark.parametrize("name", visionzoo.list_models("*_test"))
def test_seg_head_shapes_two_sizes(name, head):
    torch.manual_seed(0)
    model = usable(name, head, num_classes=3, dim=16)
    if model is None:
        return
    assert model.task == "seg"
    assert all(b > a for a, b in zip(model.strides, model.strides[1:])) and model.strides[0] <= 8
    sides = input_sides(model)
    m = model.input_multiple if len(sides) > 1 else 0
    for side in sides:
        with torch.no_grad():
            out = model(torch.randn(2, 3, side, side + m))
        assert out.shape == (2, 3, side, side + m)
        assert torch.isfinite(out).all()


def test_gradients_reach_the_backbone():
    model = DenseModel("convnext_test", "upernet", num_classes=2, dim=16)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    stages = [model.backbone.get_submodule(f.module) for f in model.backbone.feature_info]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for s in stages for p in s.parameters())


def test_single_scale_backbone_gets_a_simple_pyramid():
    model = DenseModel("vit_test", "fpn", num_classes=2, dim=16)
    assert isinstance(model.neck, SimpleFeaturePyramid)
    assert model.strides == [4, 8, 16, 32]
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]


def test_simple_pyramid_from_hierarchical_backbone():
    model = DenseModel("convnext_test", "segformer", num_classes=2, dim=16, neck="simple")
    assert model.strides == [4, 8, 16, 32]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_backbone_instance_is_switched_to_features_only():
    bb = visionzoo.create_model("resnet_test", num_classes=5)
    model = DenseModel(bb, "fpn", num_classes=4, dim=16)
    assert model.backbone.num_classes == 0 and model.strides == [4, 8, 16, 32]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_strides_a_head_cannot_use():
    with pytest.raises(ArgumentError, match=r"strictly increasing feature strides.*\[16, 16\].*neck='simple'"):
        DenseModel("vit_test", "upernet", neck="backbone")
    with pytest.raises(ArgumentError, match=r"finest stride.*<= 8.*finest is 16.*out_indices"):
        DenseModel("convnext_test", "fpn", out_indices=(2, 3))


def test_bad_arguments():
    with pytest.raises(ArgumentError, match="head must be one of"):
        DenseModel("convnext_test", "deeplab")
    with pytest.raises(ArgumentError, match="neck must be one of"):
        DenseModel("convnext_test", "fpn", neck="bifpn")
    with pytest.raises(ArgumentError, match="is a seg head"):
        DenseModel("convnext_test", "fpn", task="det")
    model = DenseModel("convnext_test", "fpn", dim=16)
    with pytest.raises(ValueError, match=r"input 48x48 must be .* multiple of 32"):
        model(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("head", SEG_HEADS)
def test_seg_loss_falls_on_fixed_batch(head):
    from visionzoo.train.synthetic import localization_set

    torch.manual_seed(0)
    ds = localization_set(2, 64, seed=0)
    x, target = ds.images.float() / 255, ds.masks().long() * (ds.labels[:, None, None] + 1)
    model = DenseModel("resnet_test", head, num_classes=5, dim=16)
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    losses = []
    for _ in range(8):
        loss = model.loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
