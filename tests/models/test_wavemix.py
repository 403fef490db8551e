"""WaveMix-specific checks: the Haar DWT against a direct computation (and under FX), the official key remap, BN
folding of the transposed convs and of the stem, and the per-level input multiple."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import randomize_bn
from visionzoo import create_model, profile
from visionzoo.layers.wavelet import HaarDWT, haar_dwt2d
from visionzoo.models.wavemix import WaveMix

torch.set_num_threads(1)


def _direct_haar(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel sums and differences of each 2x2 block [[a, b], [c, d]], written out one block at a time."""
    B, C, H, W = x.shape
    ll = torch.zeros(B, C, H // 2, W // 2, dtype=x.dtype)
    highs = torch.zeros(B, C, 3, H // 2, W // 2, dtype=x.dtype)
    for n in range(B):
        for ch in range(C):
            for i in range(H // 2):
                for j in range(W // 2):
                    a, b = x[n, ch, 2 * i, 2 * j], x[n, ch, 2 * i, 2 * j + 1]
                    c, d = x[n, ch, 2 * i + 1, 2 * j], x[n, ch, 2 * i + 1, 2 * j + 1]
                    ll[n, ch, i, j] = (a + b + c + d) / 2
                    highs[n, ch, 0, i, j] = (a + b - c - d) / 2  # rows low-pass, columns high-pass
                    highs[n, ch, 1, i, j] = (a - b + c - d) / 2  # rows high-pass, columns low-pass
                    highs[n, ch, 2, i, j] = (a - b - c + d) / 2
    return ll, highs


def test_haar_matches_direct_computation():
    x = torch.randn(2, 2, 4, 6, dtype=torch.float64)
    ll, highs = haar_dwt2d(x)
    ref_ll, ref_highs = _direct_haar(x)
    torch.testing.assert_close(ll, ref_ll, atol=1e-12, rtol=0)
    torch.testing.assert_close(highs, ref_highs, atol=1e-12, rtol=0)


def test_haar_odd_sides_pad_zeros_at_the_end():
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    padded = torch.zeros(1, 2, 6, 8, dtype=torch.float64)
    padded[..., :5, :7] = x
    for got, ref in zip(haar_dwt2d(x), _direct_haar(padded)):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_haar_is_orthonormal_and_multilevel_repeats_on_ll():
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    ll, highs = HaarDWT(3)(x)
    energy = ll.square().sum() + sum(h.square().sum() for h in highs)
    torch.testing.assert_close(energy, x.square().sum())  # lossless: Parseval
    ll1, h1 = haar_dwt2d(x)
    ll2, h2 = haar_dwt2d(ll1)
    torch.testing.assert_close(highs[0], h1)
    torch.testing.assert_close(highs[1], h2)
    assert [h.shape[-1] for h in highs] == [8, 4, 2] and ll.shape == (2, 4, 2, 2)


def test_haar_traces_with_fx_and_pads_odd_sides_at_run_time():
    gm = torch.fx.symbolic_trace(HaarDWT(2))  # the padding is one opaque node, run on the real sizes
    for x in (torch.randn(1, 2, 8, 8, dtype=torch.float64), torch.randn(2, 3, 5, 7, dtype=torch.float64)):
        ll, highs = gm(x)
        ref_ll, ref_highs = HaarDWT(2)(x)
        torch.testing.assert_close(ll, ref_ll, atol=1e-12, rtol=0)
        for got, ref in zip(highs, ref_highs):
            torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_dwt_macs_are_counted_as_a_depthwise_conv():
    p = profile(HaarDWT(1), input_size=(4, 8, 8))
    assert p.macs == 4 * 4 * 8 * 8  # 4 MACs per coefficient, 4 coefficients per input pixel


def test_remap_from_official_keys():
    model = create_model("wavemix_test", num_classes=10)
    ours = model.state_dict()
    official = {}
    for k, v in ours.items():
        k = k.replace("stem.", "conv.", 1) if k.startswith("stem.") else k
        k = k.replace("blocks.", "layers.", 1) if k.startswith("blocks.") else k
        k = k.replace("head.fc.", "pool.2.", 1) if k.startswith("head.fc.") else k
        official[k] = v
    assert "layers.0.feedforward2.4.weight" in official and "conv.4.running_var" in official
    assert WaveMix.remap(official).keys() == ours.keys()


def test_level1_blocks_keep_the_official_mlp_name():
    model = create_model("wavemix_test", num_classes=10, level=1)
    keys = model.state_dict().keys()
    assert "blocks.0.feedforward.4.weight" in keys and not any("feedforward1" in k for k in keys)


@pytest.mark.parametrize("overrides", [{}, dict(stem="strided", stride=2, level=1)])
def test_fuse_folds_deconv_and_stem_bn(overrides):
    torch.manual_seed(0)
    model = create_model("wavemix_test", num_classes=10, **overrides).eval()
    with torch.no_grad():
        randomize_bn(model, seed=1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model.fuse()
        out = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_input_multiple_follows_stem_and_levels():
    assert create_model("wavemix_test").input_multiple == 4 * 2**2
    with torch.device("meta"):
        big = create_model("wavemix_256_16_l4_s2")
    assert big.input_multiple == big.min_input_size == 2 * 2 * 2**4
    with pytest.raises(ValueError, match="multiple of 64"):
        big(torch.empty(1, 3, 224, 224, device="meta"))
    assert [f.reduction for f in big.feature_info] == [4] * 16


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="level"):
        create_model("wavemix_test", level=5)
    with pytest.raises(ValueError, match="stem"):
        create_model("wavemix_test", stem="conv")
    with pytest.raises(ValueError, match="multiple of 4"):
        create_model("wavemix_test", dim=30)
