"""SpectFormer-specific checks: the DFT-matrix form of the global filter (what exporters run) against torch.fft,
filter grids at other input sizes, the token-labeling head, official-layout remap, token reduction on the vanilla
model's attention blocks, FFT MACs."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from visionzoo import create_model, tokens
from visionzoo.bench.flops import CUSTOM_FLOPS
from visionzoo.layers.spectral import dft_filter, fft_filter, filter_on_grid, global_filter
from visionzoo.models.spectformer import SpectFormer

torch.set_num_threads(1)


def test_dft_matrices_equal_fft():
    torch.manual_seed(0)
    for H, W in ((8, 8), (7, 5), (6, 9), (1, 4)):
        x = torch.randn(2, H, W, 3, dtype=torch.float64)
        w = torch.randn(H, W // 2 + 1, 3, 2, dtype=torch.float64)
        torch.testing.assert_close(dft_filter(x, w), fft_filter(x, w), atol=1e-12, rtol=0)


def test_filter_is_a_circular_convolution():
    """irfft2(rfft2(x) * rfft2(k) / sqrt(HW)) (ortho) is the circular convolution of x with k: check one pixel."""
    torch.manual_seed(1)
    H, W = 5, 6
    x, k = torch.randn(1, H, W, 1, dtype=torch.float64), torch.randn(H, W, dtype=torch.float64)
    spec = torch.fft.rfft2(k, norm="ortho")[..., None]  # (H, W//2+1, 1)
    y = global_filter(x, torch.view_as_real(spec))
    direct = sum(x[0, a, b, 0] * k[(2 - a) % H, (3 - b) % W] for a in range(H) for b in range(W))
    torch.testing.assert_close(y[0, 2, 3, 0], direct / (H * W) ** 0.5)


def test_traced_path_matches_eager_and_resizes():
    model = create_model("spectformer_test", num_classes=10).eval()  # filters built for 64 px
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        eager = model(x)
        traced = torch.fx.symbolic_trace(model)(x)  # FX runs the DFT-matrix path
    torch.testing.assert_close(traced, eager, atol=1e-5, rtol=1e-5)
    w = model.stages[0].blocks[0].attn.complex_weight
    assert tuple(w.shape[:2]) == (16, 9)
    assert tuple(filter_on_grid(w, torch.zeros(1, 24, 32, 1)).shape[:2]) == (24, 17)


def test_token_label_head():
    torch.manual_seed(0)
    model = create_model("spectformer_test", num_classes=10).eval()
    assert model.classifier == ("head.fc", "head.aux_fc")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        tok = model.head.tokens(feats)
        expected = model.head.fc(tok[:, 0]) + 0.5 * model.head.aux_fc(tok[:, 1:]).amax(1)
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(tok[:, 1:], model.head.norm(feats.flatten(2).transpose(1, 2)))  # patches pass
    model.train().head.dense_training = True
    logits, dense = model(x)
    assert logits.shape == (2, 10) and dense.shape == (2, 4, 10)
    plain = create_model("spectformer_test", num_classes=10, token_label=False)
    assert plain.classifier == "head.fc" and plain.head.aux_fc is None


def test_remap_official_keys_and_idempotent():
    model = create_model("spectformer_test", num_classes=10)
    ours = model.state_dict()
    assert SpectFormer.remap(ours).keys() == ours.keys()
    official = {"patch_embed1.conv.0.weight": 0, "patch_embed1.proj.weight": 1, "patch_embed2.norm.bias": 2,
                "block1.0.attn.complex_weight": 3, "block3.0.mlp.dwconv.dwconv.weight": 4, "norm1.weight": 5,
                "norm4.weight": 6, "post_network.0.attn.q.weight": 7, "head.weight": 8, "aux_head.bias": 9}
    assert SpectFormer.remap(official) == {
        "stem.0.weight": 0, "stages.0.downsample.proj.weight": 1, "stages.1.downsample.norm.bias": 2,
        "stages.0.blocks.0.attn.complex_weight": 3, "stages.2.blocks.0.mlp.dwconv.weight": 4,
        "stages.0.norm.weight": 5, "head.norm.weight": 6, "head.block.attn.q.weight": 7, "head.fc.weight": 8,
        "head.aux_fc.bias": 9}


def test_vanilla_attention_blocks_take_token_reduction():
    model = create_model("spectformer_vit_test", num_classes=10).eval()
    h = tokens.apply(model, "tome", r=4)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    assert h.token_counts() == [16, 12, 8]  # 16 patches after the spectral block; 4 fewer per attention block


def test_ffts_are_counted():
    model = create_model("spectformer_vit_test", num_classes=10).eval()
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    counts = counter.get_flop_counts()["Global"]
    fft = {str(k): v for k, v in counts.items() if "fft" in str(k)}
    assert set(fft) == {"aten._fft_r2c", "aten._fft_c2r"}
    assert all(v > 0 for v in fft.values())
