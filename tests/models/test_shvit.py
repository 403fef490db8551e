"""SHViT-specific checks: single-head attention on a channel subset, the deploy form, timm classifier keys."""
from __future__ import annotations

import torch
from torch import nn

from visionzoo import create_model, load_checkpoint
from visionzoo.models.shvit import SHViT, SHViTResidual, SHViTSingleHeadAttention, SHViTSqueezeExcite

torch.set_num_threads(1)


def test_single_head_attention_on_partial_channels():
    torch.manual_seed(0)
    attn = SHViTSingleHeadAttention(24, qk_dim=16, partial_dim=8).eval()
    x = torch.randn(2, 24, 5, 4)
    with torch.no_grad():
        qkv = attn.qkv(attn.pre_norm(x[:, :8])).flatten(2)  # (B, 2*16 + 8, N)
        q, k, v = qkv[:, :16], qkv[:, 16:32], qkv[:, 32:]
        probs = (q.transpose(1, 2) @ k / 4.0).softmax(-1)  # one head, scale 16 ** -0.5
        x1 = (v @ probs.transpose(1, 2)).reshape(2, 8, 5, 4)
        want = attn.proj(torch.cat([x1, x[:, 8:]], 1))
        torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_squeeze_excite_width_rounds_to_eight():
    assert SHViTSqueezeExcite(4 * 308).fc1.out_channels == 312  # shvit_s2's second merging, timm make_divisible
    assert SHViTSqueezeExcite(512).fc1.out_channels == 128


def test_fuse_merges_residual_dwconvs_and_head_bn():
    torch.manual_seed(0)
    model = create_model("shvit_test", num_classes=5).eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.normal_(m.weight, 1.0, 0.2)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ref = model(x)
        model.fuse()
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    dw = [m for m in model.modules() if isinstance(m, SHViTResidual) and isinstance(m.m, nn.Conv2d)]
    assert dw and all(not m.skip for m in dw)  # one 3x3 conv each, identity in the kernel centre
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_timm_classifier_keys_load():
    torch.manual_seed(0)
    model = create_model("shvit_test", num_classes=10).eval()
    sd = model.state_dict()
    timm = {k.replace("head.norm.", "head.bn.").replace("head.fc.", "head.l."): v for k, v in sd.items()}
    assert "head.l.weight" in timm and "head.bn.running_var" in timm
    assert SHViT.remap(timm).keys() == model.state_dict().keys()
    assert SHViT.remap(model.state_dict()).keys() == model.state_dict().keys()
    other = create_model("shvit_test", num_classes=10).eval()
    assert load_checkpoint(other, timm) == "official"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))
