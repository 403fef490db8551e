"""RepLKNet-specific checks: the large + small kernel merge, full BN folding, merged-form checkpoints, official keys."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_bn
from visionzoo import create_model
from visionzoo.layers import FrozenBatchNorm2d
from visionzoo.models.replknet import RepLKNet, RepLKNetLargeKernelConv

torch.set_num_threads(1)


def _bn_folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale


def _tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("replknet_test", num_classes=10).eval()
    randomize_bn(model)
    return model, torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("small_kernel", [5, 3, None])
def test_merged_kernel_is_the_branch_sum(small_kernel):
    torch.manual_seed(0)
    lk = RepLKNetLargeKernelConv(6, 9, small_kernel).eval()
    randomize_bn(lk)
    x = torch.randn(2, 6, 12, 12)
    with torch.no_grad():
        ref = lk(x)
        want_w, want_b = _bn_folded(lk.lkb_origin.conv, lk.lkb_origin.bn)
        if small_kernel is not None:
            small_w, small_b = _bn_folded(lk.small_conv.conv, lk.small_conv.bn)
            p = (9 - small_kernel) // 2
            want_w = want_w + F.pad(small_w, (p, p, p, p))  # small kernel at the centre of the 9x9 one
            want_b = want_b + small_b
        lk.fuse()
        out = lk(x)
    assert lk.merged and not hasattr(lk, "lkb_origin") and lk.small_conv is None
    assert lk.lkb_reparam.weight.shape == (6, 1, 9, 9) and lk.lkb_reparam.groups == 6
    torch.testing.assert_close(lk.lkb_reparam.weight, want_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(lk.lkb_reparam.bias, want_b, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_fuse_folds_every_bn_and_keeps_features():
    model, x = _tiny()
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        last = model.forward_features(x)
        model.fuse()
        feats2 = model.forward_intermediates(x)
        last2 = model.forward_features(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.norm.bn, FrozenBatchNorm2d)  # after a residual sum: nothing to fold into, a fixed affine
    assert all(isinstance(m.prelkb_bn, nn.Identity) for m in model.stages[0].blocks[::2])
    assert all(m.merged for m in model.modules() if isinstance(m, RepLKNetLargeKernelConv))
    for a, b in zip(feats + [last], feats2 + [last2]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_merged_checkpoint_loads_into_small_kernel_merged_model():
    model, x = _tiny()
    with torch.no_grad():
        ref = model(x)
    for m in model.modules():
        if isinstance(m, RepLKNetLargeKernelConv):
            m.fuse()  # the official structural_reparam: only the large kernels change
    state = model.state_dict()
    assert "stages.0.blocks.0.large_kernel.lkb_reparam.bias" in state
    merged = create_model("replknet_test", num_classes=10, small_kernel_merged=True,
                          checkpoint_path=state).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), ref, atol=1e-5, rtol=0)


def _official_keys(ours: dict) -> dict:
    """Our keys written the official way: transitions at the top level, a bare final BN, a bare Linear head."""
    out = {}
    for k, v in ours.items():
        parts = k.split(".")
        if parts[0] == "stages" and parts[2] == "transition":
            k = ".".join(["transitions", str(int(parts[1]) - 1), *parts[3:]])
        k = k.replace("norm.bn.", "norm.", 1) if k.startswith("norm.bn.") else k
        k = k.replace("head.fc.", "head.", 1) if k.startswith("head.fc.") else k
        out[k] = v
    return out


def test_key_layout_matches_official():
    with torch.device("meta"):
        train = create_model("replknet_31b").state_dict()
        merged = create_model("replknet_31b", small_kernel_merged=True).state_dict()
    official = _official_keys(train)
    assert len(official) == 1171 and len(_official_keys(merged)) == 931  # official, before / after structural_reparam
    assert {"stem.0.conv.weight", "stem.3.bn.running_var", "stages.0.blocks.0.prelkb_bn.weight",
            "stages.0.blocks.0.pw1.conv.weight", "stages.0.blocks.0.large_kernel.lkb_origin.conv.weight",
            "stages.2.blocks.35.preffn_bn.bias", "stages.2.blocks.34.large_kernel.small_conv.bn.weight",
            "transitions.2.1.conv.weight", "norm.running_mean", "head.weight"} <= set(official)
    assert train["stages.0.blocks.0.large_kernel.lkb_origin.conv.weight"].shape == (128, 1, 31, 31)
    assert train["stages.3.blocks.0.large_kernel.small_conv.conv.weight"].shape == (1024, 1, 5, 5)
    assert train["stages.3.transition.1.conv.weight"].shape == (1024, 1, 3, 3)
    assert merged["stages.2.blocks.0.large_kernel.lkb_reparam.weight"].shape == (512, 1, 27, 27)
    for state in (train, merged):
        assert list(RepLKNet.remap(_official_keys(state))) == list(state)
        assert list(RepLKNet.remap(state)) == list(state)  # our own keys pass through
