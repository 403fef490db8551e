"""GLNet-specific checks: the clustering branch as the official formula, the STL layout's fuse, attention calls."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionzoo import create_model
from visionzoo.explain import record_attention
from visionzoo.models.glnet import GLMixBlock

torch.set_num_threads(1)

STL = dict(depths=(1, 1, 1, 1), mlp_ratio=4.0, mixing_modes=("glmix", "glmix", "glmix", "mha"), cpe_ks=0,
           overlap=False, res_dw=False)


def test_soft_clustering_matches_direct_formula():
    torch.manual_seed(0)
    blk = GLMixBlock(32, 1, num_slots=16).eval()
    with torch.no_grad():
        blk.slot_scale.fill_(5.0)
        x = torch.randn(2, 32, 6, 5)
        init = F.adaptive_avg_pool2d(x, 4).flatten(2).transpose(1, 2)  # (B, 16, C)
        px = x.flatten(2).transpose(1, 2)  # (B, N, C)
        logits = F.normalize(init, dim=-1) @ (5.0 * F.normalize(px, dim=-1)).transpose(1, 2)  # (B, S, N)
        slots = blk.relation_mha(logits.softmax(-1) @ px)
        out = (logits.transpose(1, 2).softmax(-1) @ slots).transpose(1, 2).reshape(2, 32, 6, 5)
        want = out + blk.feature_conv(x)
        torch.testing.assert_close(blk.mix(x, init), want, atol=1e-5, rtol=1e-5)


def test_every_softmax_is_an_attention_call():
    model = create_model("glnet_test").eval()
    with torch.no_grad(), record_attention(model) as rec:
        model(torch.randn(1, 3, 64, 64))
    names = [a.name for a in rec.maps]
    assert "stages.0.blocks.0.group_core" in names and "stages.0.blocks.0.dispatch_core" in names
    group = next(a for a in rec.maps if a.name.endswith("group_core"))
    assert group.probs.shape[-2:] == (4, 256) and group.grid == (2, 2)  # 4 slots gather the 16x16 pixels


def test_stl_layout_fuse_folds_pre_conv_bn():
    torch.manual_seed(0)
    model = create_model("glnet_test", num_classes=3, **STL).eval()
    assert isinstance(model.stages[1].downsample[0], nn.BatchNorm2d)  # BN + 2x2 conv (Swin's order)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model.fuse()
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
