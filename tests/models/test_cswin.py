"""CSWin specifics: padded stripes equal attention in cut stripes, the official key layout, argument checks."""
from __future__ import annotations

import pytest
import torch

import visionzoo
from visionzoo.models.cswin import LePEAttention

torch.set_num_threads(1)


def naive_stripes(attn: LePEAttention, qkv: torch.Tensor) -> torch.Tensor:
    """Attention + LePE stripe by stripe, the last stripe simply narrower: what padding must reproduce."""
    B, H, W, _, C = qkv.shape
    heads, d = attn.num_heads, C // attn.num_heads
    out = torch.empty(B, H, W, C)
    step = attn.split_size
    spans = [(slice(0, H), slice(s, min(s + step, W))) for s in range(0, W, step)] if attn.axis == 0 else \
        [(slice(s, min(s + step, H)), slice(0, W)) for s in range(0, H, step)]
    for rows, cols in spans:
        part = qkv[:, rows, cols]  # (B, h, w, 3, C)
        h, w = part.shape[1:3]
        q, k, v = (part[..., i, :].reshape(B, h * w, heads, d).transpose(1, 2) for i in range(3))
        x = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1) @ v  # (B, heads, N, d)
        lepe = attn.get_v(part[..., 2, :].permute(0, 3, 1, 2))  # zero-padded conv on the cut stripe
        out[:, rows, cols] = x.transpose(1, 2).reshape(B, h, w, C) + lepe.permute(0, 2, 3, 1)
    return out


@pytest.mark.parametrize("axis", [0, 1])
def test_padded_stripes_equal_cut_stripes(axis):
    torch.manual_seed(0)
    attn = LePEAttention(dim=8, num_heads=2, split_size=3, axis=axis).eval()
    qkv = torch.randn(2, 7, 5, 3, 8)  # neither side a multiple of 3
    with torch.no_grad():
        torch.testing.assert_close(attn(qkv), naive_stripes(attn, qkv), atol=1e-5, rtol=0)


def test_stripe_wider_than_map_is_full_attention():
    torch.manual_seed(0)
    stripe = LePEAttention(dim=8, num_heads=2, split_size=7, axis=0).eval()
    full = LePEAttention(dim=8, num_heads=2, split_size=7, axis=None).eval()
    full.load_state_dict(stripe.state_dict())
    qkv = torch.randn(1, 4, 4, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(stripe(qkv), full(qkv), atol=1e-6, rtol=0)


def test_official_key_layout():
    with torch.device("meta"):
        model = visionzoo.create_model("cswin_tiny")
    sd = model.state_dict()
    for key in ("stage1_conv_embed.0.weight", "stage1_conv_embed.2.weight", "merge1.conv.weight", "merge3.norm.bias",
                "stage3.20.qkv.weight", "stage3.20.attns.1.get_v.weight", "stage4.0.attns.0.get_v.weight",
                "norm.weight", "head.weight"):
        assert key in sd, key
    assert sd["stage1.0.attns.0.get_v.weight"].shape == (32, 1, 3, 3)  # half the channels per stripe direction
    assert sd["stage4.0.attns.0.get_v.weight"].shape == (512, 1, 3, 3)  # last stage: one full-attention branch
    assert "stage4.0.attns.1.get_v.weight" not in sd
    assert not any("mask" in k or "index" in k for k in sd)


def test_odd_heads_in_stripe_stage_raise():
    with pytest.raises(ValueError, match="even"):
        visionzoo.create_model("cswin_test", num_heads=(3, 2, 4, 8))


def test_non_square_input_padding_path():
    torch.manual_seed(0)
    model = visionzoo.create_model("cswin_test", num_classes=5).eval()
    x = torch.randn(1, 3, 96, 160)  # stage 3 is 6x10: its vertical stripes of width 3 pad 10 columns to 12
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        out = model(x)
    assert [f.shape[-2:] for f in feats] == [(24, 40), (12, 20), (6, 10), (3, 5)]
    assert torch.isfinite(out).all() and out.shape == (1, 5)
