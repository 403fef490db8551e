"""ResNet-specific checks: BN folding, the torchvision/timm key layout (classifier at head.fc), zero-init of residual
branches."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from visionzoo import create_model

torch.set_num_threads(1)

TINY = dict(depths=(1, 1, 1, 1), stem_width=16)
CONFIGS = {"bottleneck": dict(TINY, dims=(32, 64, 64, 128), block="bottleneck"),
           "basic": dict(TINY, dims=(16, 32, 32, 64), block="basic")}


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


@pytest.mark.parametrize("block", sorted(CONFIGS))
def test_fuse_folds_every_bn_and_keeps_output(block):
    torch.manual_seed(0)
    model = create_model("resnet_test", num_classes=10, **CONFIGS[block]).eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert n_bn == n_conv  # every conv (stem, blocks, projections) has its BN
    model.fuse()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_key_layout_matches_torchvision_resnet50():
    with torch.device("meta"):
        sd = create_model("resnet50").state_dict()
    expected = {"conv1.weight", "bn1.running_var", "layer1.0.conv3.weight", "layer1.0.bn3.num_batches_tracked",
                "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias", "layer3.5.conv2.weight",
                "layer4.2.bn3.weight", "head.fc.weight", "head.fc.bias"}
    assert expected <= set(sd)
    assert "layer1.1.downsample.0.weight" not in sd
    assert len(sd) == 320  # torchvision's resnet50 state_dict has 320 entries (161 params + 159 BN buffers)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # stride-2 3x3 conv (v1.5)


def test_torchvision_checkpoint_loads_through_remap():
    model = create_model("resnet_test", num_classes=10).eval()
    theirs = {("fc." + k[len("head.fc."):] if k.startswith("head.fc.") else k): v
              for k, v in model.state_dict().items()}  # torchvision / timm name the classifier fc
    assert "fc.weight" in theirs and "head.fc.weight" not in theirs
    assert model.remap(model.remap(theirs)).keys() == model.state_dict().keys()  # idempotent
    other = create_model("resnet_test", num_classes=10, checkpoint_path=theirs).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)


def test_basic_stage1_has_no_projection():
    with torch.device("meta"):
        sd = create_model("resnet18").state_dict()
    assert "layer1.0.downsample.0.weight" not in sd
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)


def test_residual_branches_start_at_zero():
    model = create_model("resnet_test", **CONFIGS["basic"])
    for i in range(1, 5):
        block = getattr(model, f"layer{i}")[0]
        assert torch.count_nonzero(block.bn2.weight) == 0


def test_stride_in_3x3_and_feature_strides():
    model = create_model("resnet_test", num_classes=0).eval()
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)
    feats = model.forward_intermediates(torch.randn(1, 3, 64, 96))
    assert [f.shape[-2:] for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="block must be one of"):
        create_model("resnet_test", block="wide")
    with pytest.raises(ValueError, match="multiple of 4"):
        create_model("resnet_test", dims=(30, 64, 128, 256))
    with pytest.raises(ValueError, match="equal length"):
        create_model("resnet_test", depths=(1, 1, 1))
