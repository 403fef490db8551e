"""InceptionNeXt-specific checks: token-mixer channel split, every BN folded (also on meta), MLP head and timm keys."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from visionzoo import create_model, load_checkpoint
from visionzoo.models.inception_next import InceptionDWConv2d, InceptionNeXt

torch.set_num_threads(1)


def test_token_mixer_split():
    mixer = InceptionDWConv2d(40, band_kernel_size=9, branch_ratio=0.25)  # the atto mixer
    assert mixer.split_indexes == (10, 10, 10, 10)
    assert mixer.dwconv_w.kernel_size == (1, 9) and mixer.dwconv_h.kernel_size == (9, 1)
    assert InceptionDWConv2d(96).split_indexes == (60, 12, 12, 12)
    x = torch.randn(1, 40, 8, 8)
    assert torch.equal(mixer(x)[:, :10], x[:, :10])  # the identity share passes through untouched
    with pytest.raises(ValueError, match="branch_ratio"):
        InceptionDWConv2d(8, branch_ratio=0.5)


def test_fuse_folds_every_bn_and_works_on_meta():
    with torch.device("meta"):
        model = create_model("inception_next_atto").eval()
        n_bn = sum(2 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        n_gamma = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".gamma"))
        before = sum(p.numel() for p in model.parameters())
        model.fuse()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # every fold adds nothing: conv biases already exist, so the BN affines and the layer scales are simply gone
    assert n_gamma > 0 and sum(p.numel() for p in model.parameters()) == before - n_bn - n_gamma


def _to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys -> timm's (head.fc1, head.norm, head.fc2); the inverse of InceptionNeXt.remap."""
    names = {"head.pre_logits.fc.": "head.fc1.", "head.pre_logits.norm.": "head.norm.", "head.fc.": "head.fc2."}
    out = {}
    for k, v in sd.items():
        for ours, timm in names.items():
            if k.startswith(ours):
                k = timm + k[len(ours):]
        out[k] = v
    return out


def test_mlp_head_and_timm_checkpoints():
    torch.manual_seed(0)
    model = create_model("inception_next_test", num_classes=10).eval()
    assert model.head_hidden_size == 3 * model.num_features
    keys = model.state_dict().keys()
    assert {"head.pre_logits.fc.weight", "head.pre_logits.norm.weight", "head.fc.weight"} <= keys
    timm = _to_timm(model.state_dict())
    assert {"head.fc1.weight", "head.norm.weight", "head.fc2.weight"} <= timm.keys()
    assert InceptionNeXt.remap(timm).keys() == keys and InceptionNeXt.remap(model.state_dict()).keys() == keys
    same = create_model("inception_next_test", num_classes=10).eval()
    assert load_checkpoint(same, timm) == "official"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(same(x), model(x), atol=0, rtol=0)
    other = create_model("inception_next_test", num_classes=5).eval()
    with pytest.warns(UserWarning, match="classes"):
        load_checkpoint(other, timm)  # a 10-class timm-layout checkpoint into a 5-class model
    torch.testing.assert_close(other.head.pre_logits.fc.weight, model.head.pre_logits.fc.weight)
