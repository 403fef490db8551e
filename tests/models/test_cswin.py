"""CSWin specifics: padded stripes equal attention in cut stripes, stage modules and the official keys, argument
checks, padded sizes under FX."""
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


def test_stage_layout_and_official_keys():
    """Stages are modules (merge, then blocks); the official flat keys translate to them one to one."""
    with torch.device("meta"):
        model = visionzoo.create_model("cswin_tiny")
    sd = model.state_dict()
    for key in ("stem.0.weight", "stem.2.weight", "stages.1.downsample.conv.weight", "stages.3.downsample.norm.bias",
                "stages.2.blocks.20.qkv.weight", "stages.2.blocks.20.attns.1.get_v.weight", "norm.weight",
                "head.fc.weight"):
        assert key in sd, key
    assert isinstance(model.stages[0].downsample, torch.nn.Identity)
    assert sd["stages.0.blocks.0.attns.0.get_v.weight"].shape == (32, 1, 3, 3)  # half the channels per direction
    assert sd["stages.3.blocks.0.attns.0.get_v.weight"].shape == (512, 1, 3, 3)  # last stage: one full attention
    assert "stages.3.blocks.0.attns.1.get_v.weight" not in sd
    assert not any("mask" in k or "index" in k for k in sd)
    official = {"stage1_conv_embed.0.weight": "stem.0.weight", "stage1_conv_embed.2.bias": "stem.2.bias",
                "stage1.0.qkv.weight": "stages.0.blocks.0.qkv.weight",
                "merge1.conv.weight": "stages.1.downsample.conv.weight",
                "stage3.20.attns.1.get_v.weight": "stages.2.blocks.20.attns.1.get_v.weight",
                "merge3.norm.bias": "stages.3.downsample.norm.bias",
                "stage4.0.mlp.fc2.bias": "stages.3.blocks.0.mlp.fc2.bias",
                "norm.weight": "norm.weight", "head.weight": "head.fc.weight", "head.bias": "head.fc.bias"}
    mapped = model.remap(dict.fromkeys(official, torch.zeros(1)))
    assert list(mapped) == list(official.values())
    assert list(model.remap(dict.fromkeys(mapped, torch.zeros(1)))) == list(mapped)  # ours pass unchanged


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


def test_padded_stripes_trace():
    """The stripe padding and its key mask are computed at run time under FX (one graph serves other sizes)."""
    torch.manual_seed(0)
    model = visionzoo.create_model("cswin_test", num_classes=5).eval()
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        for x in (torch.randn(2, 3, 64, 64), torch.randn(1, 3, 96, 160)):  # stage 3: 4x4 and 6x10, stripes of 3
            torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)
