"""Hyena-ViT-specific checks: the long 2-D convolution (FFT and direct forms against explicit sums), the implicit
filter's layout, the block placement of the official ``--method`` s, token reduction on the hybrid's attention
blocks, other input sizes, the official-layout remap."""
from __future__ import annotations

import pytest
import torch

from visionzoo import create_model, tokens
from visionzoo.layers import PreNormBlock
from visionzoo.models.hyena_vit import HyenaBlock, HyenaViT, long_conv_direct, long_conv_fft

torch.set_num_threads(1)


@pytest.mark.parametrize("H, W", [(4, 4), (3, 5)])
def test_long_convolution_forms_equal_explicit_sums(H, W):
    torch.manual_seed(0)
    u, k = torch.randn(1, 2, H, W, dtype=torch.float64), torch.randn(2, H, W, dtype=torch.float64)
    direct = long_conv_direct(u, k)
    torch.testing.assert_close(long_conv_fft(u, k).double(), direct.double(), atol=1e-6, rtol=0)
    i, j = H - 1, W - 2
    expect = sum(u[0, 1, a, b] * k[1, i - a, j - b] for a in range(i + 1) for b in range(j + 1)) / (2 * H)
    torch.testing.assert_close(direct[0, 1, i, j].double(), expect, atol=1e-6, rtol=0)


def test_filter_layout_and_methods():
    model = create_model("hyena_vit_test", num_classes=10)
    kinds = [type(b) for b in model.blocks]
    assert kinds == [HyenaBlock] * 3 + [PreNormBlock] * 2  # hyena2dattn: Hyena up to block depth // 2
    assert [b.attn.flip for b in model.blocks[:3]] == [True, False, True]  # "seq": even blocks flipped
    f = model.blocks[0].attn.filter_fn
    h = f.filter2d(torch.zeros(1, 1, 4, 4))
    assert h.shape == (1, 4, 4, 64)
    with torch.no_grad():  # entry [i, j] is the MLP of (z[i], z[j]) times the row and column decays
        z, t = f.pos_emb.z[0], f.pos_emb.t[0]
        mlp = f.implicit_filter(torch.cat([z[2], z[1]])[None])[0]
        dx, dy = f.modulation.Xdeltas.abs()[0, 0], f.modulation.Ydeltas.abs()[0, 0]
        decay = torch.exp(-t[2] * dx) * torch.exp(-t[1] * dy)
        torch.testing.assert_close(h[0, 2, 1], mlp * decay)
    pure = create_model("hyena_vit_test", num_classes=10, method="hyena2d")
    assert not pure.has_attention and all(isinstance(b, HyenaBlock) for b in pure.blocks)
    with pytest.raises(ValueError, match="method must be one of"):
        create_model("hyena_vit_test", method="onebyone")


def test_token_reduction_on_hybrid_attention_blocks():
    model = create_model("hyena_vit_test", num_classes=10).eval()
    h = tokens.apply(model, "tome", r=4)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert h.token_counts() == [16, 12, 8]


def test_other_sizes_and_traced_path():
    model = create_model("hyena_vit_test", num_classes=10).eval()  # built for 64 px: a 4x4 grid
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        eager = model(x)
        traced = torch.fx.symbolic_trace(model)(x)  # FX runs the direct convolution
    torch.testing.assert_close(traced, eager, atol=1e-5, rtol=1e-5)


def test_remap():
    assert HyenaViT.remap({"head.weight": 1, "blocks.0.attn.in_proj.weight": 2}) == {
        "head.fc.weight": 1, "blocks.0.attn.in_proj.weight": 2}
    ours = create_model("hyena_vit_test", num_classes=10).state_dict()
    assert HyenaViT.remap(ours).keys() == ours.keys()
