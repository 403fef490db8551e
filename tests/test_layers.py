"""Shared layers: shapes, string/class injection, numerics against direct computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visionzoo.layers import (
    Attention,
    ClassifierHead,
    ConvMlp,
    DropPath,
    FrozenBatchNorm2d,
    LayerNorm2d,
    Mlp,
    PatchEmbed,
    drop_path_rates,
    fold_bn,
    fuse_conv_bn_pairs,
    get_act,
    get_norm,
    resample_abs_pos_embed,
    window_partition,
    window_reverse,
)


def test_lookup_by_name_or_class():
    assert get_act("gelu") is nn.GELU and get_act(nn.ReLU) is nn.ReLU and get_act(None) is nn.Identity
    assert get_norm("ln2d") is LayerNorm2d and get_norm(nn.BatchNorm2d) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="unknown activation 'geluu'"):
        get_act("geluu")
    with pytest.raises(ValueError, match="unknown norm"):
        get_norm("nope")
    with pytest.raises(TypeError):
        get_act(3)


def test_layernorm2d_matches_channel_layernorm():
    x = torch.randn(2, 8, 5, 5)
    ln = LayerNorm2d(8)
    ln.weight.data.normal_()
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (8,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref)


def test_drop_path():
    x = torch.ones(1000, 4)
    dp = DropPath(0.25).train()
    y = dp(x)
    kept = (y[:, 0] > 0).float().mean()
    assert 0.65 < kept < 0.85 and torch.allclose(y[y > 0], torch.tensor(1 / 0.75))
    assert torch.equal(dp.eval()(x), x)
    rates = drop_path_rates(0.3, (1, 2, 1))
    assert [len(r) for r in rates] == [1, 2, 1] and rates[0][0] == 0 and abs(rates[-1][-1] - 0.3) < 1e-9


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 5, 16)
    bias = torch.randn(1, 4, 5, 5)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    w = (q @ k.transpose(-2, -1) * 4 ** -0.5 + bias).softmax(-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x, attn_mask=bias), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, num_heads=3)


def test_a_three_dimensional_bias_reaches_sdpa_with_the_rank_of_q(monkeypatch):
    """A (heads, N, N) bias (RMT's decay) goes to SDPA as (1, heads, N, N), and a q with a strided last dimension as
    a unit-stride copy: torch's CPU SDPA takes its fused kernel only so, and its math path otherwise. The output
    equals the explicit path's."""
    from visionzoo.layers.attention import AttentionCore

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 6, 8) for _ in range(3))
    bias = torch.randn(4, 6, 6)
    masks, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append((attn_mask.shape, args[0].stride(-1)))
        return sdpa(*args, attn_mask=attn_mask, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    core = AttentionCore()
    fused = core(q, k, v, bias)
    assert masks == [((1, 4, 6, 6), 1)] and torch._fused_sdp_choice(q, k, v, bias[None], 0.0, False) != 0  # not math
    core.fused = False
    torch.testing.assert_close(fused, core(q, k, v, bias), atol=1e-5, rtol=1e-5)
    # a q whose last dimension is strided (GLNet's global tokens) reaches SDPA with unit stride, the same output
    core.fused, strided = True, q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert strided.stride(-1) != 1
    torch.testing.assert_close(core(strided, k, v, bias), fused)
    assert masks[-1] == ((1, 4, 6, 6), 1)


def test_window_partition_inverse():
    x = torch.randn(2, 8, 12, 3)
    w = window_partition(x, (4, 4))
    assert w.shape == (2 * 2 * 3, 4, 4, 3)
    assert torch.equal(w[1], x[0, :4, 4:8])
    assert torch.equal(window_reverse(w, (4, 4), 8, 12), x)


def test_fold_bn_exact():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)).eval()
    seq[1].running_mean.normal_()
    seq[1].running_var.uniform_(0.5, 2)
    seq[1].weight.data.normal_()
    x = torch.randn(2, 3, 7, 7)
    ref = seq(x)
    torch.testing.assert_close(fold_bn(seq[0], seq[1])(x), ref, atol=1e-5, rtol=1e-5)
    assert fuse_conv_bn_pairs(seq) == 1 and isinstance(seq[1], nn.Identity)
    torch.testing.assert_close(seq(x), ref, atol=1e-5, rtol=1e-5)


def test_frozen_bn_matches_eval_bn():
    bn = nn.BatchNorm2d(4).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 3, 3)
    frozen = FrozenBatchNorm2d.convert(nn.Sequential(bn))[0]
    assert isinstance(frozen, FrozenBatchNorm2d) and not list(frozen.parameters())
    torch.testing.assert_close(frozen(x), bn(x))


def test_resample_pos_embed():
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_abs_pos_embed(pe, (4, 4)) is pe
    out = resample_abs_pos_embed(pe, (6, 2))
    assert out.shape == (1, 1 + 12, 8) and torch.equal(out[:, :1], pe[:, :1])


def test_patch_embed_and_mlps_and_head():
    pe = PatchEmbed(32, 8, 3, 16, norm_layer="ln")
    assert pe(torch.randn(2, 3, 32, 32)).shape == (2, 16, 16)
    assert PatchEmbed(32, 8, 3, 16, output_fmt="NHWC")(torch.randn(1, 3, 32, 16)).shape == (1, 4, 2, 16)
    assert Mlp(8, 32)(torch.randn(2, 5, 8)).shape == (2, 5, 8)
    assert ConvMlp(8, 32, 4)(torch.randn(2, 8, 3, 3)).shape == (2, 4, 3, 3)
    head = ClassifierHead(8, 5, norm_layer="ln")
    x = torch.randn(2, 8, 3, 3)
    assert head(x).shape == (2, 5) and head(x, pre_logits=True).shape == (2, 8)
    head.reset(0)
    assert head(x).shape == (2, 8)


@pytest.mark.parametrize("patch", [1, 3, 6, 12])
def test_sope_takes_only_power_of_two_patches(patch):
    from visionzoo.layers import SOPE

    with pytest.raises(ValueError, match="power of two"):
        SOPE(3, 64, patch)


@pytest.mark.parametrize("patch,convs", [(2, 1), (8, 3), (32, 5)])
def test_sope_downsamples_by_its_patch(patch, convs):
    from visionzoo.layers import SOPE

    m = SOPE(3, 64, patch).eval()
    assert sum(isinstance(c, torch.nn.Conv2d) for c in m.modules()) == convs
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 64, 64 // patch, 64 // patch)


@pytest.mark.parametrize("layer", [nn.Linear(6, 4), nn.Linear(6, 4, bias=False), nn.Conv2d(3, 4, 3, padding=1)])
def test_fold_channel_scale_moves_a_layer_scale_into_the_layer(layer):
    from visionzoo.layers import fold_channel_scale

    torch.manual_seed(0)
    x = torch.randn(2, 5, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 5, 5)
    gamma = torch.rand(4) + 0.5
    with torch.no_grad():
        want = layer(x) * (gamma if isinstance(layer, nn.Linear) else gamma.view(-1, 1, 1))
        fold_channel_scale(layer, gamma)
        assert torch.allclose(layer(x), want, atol=1e-6)
    with pytest.raises(ValueError, match="3 scales for a layer with 4 output channels"):
        fold_channel_scale(layer, torch.ones(3))
