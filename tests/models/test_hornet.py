"""HorNet-specific checks: gnConv channel split and recursion, global-filter grids at other input sizes, FFT MACs."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visionzoo import create_model, load_checkpoint
from visionzoo.bench.flops import CUSTOM_FLOPS
from visionzoo.models.hornet import HorNetGlobalLocalFilter, HorNetGnConv

torch.set_num_threads(1)


def _randomized(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("hornet_test", num_classes=10, **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            around_one = ".gamma" in name or (p.ndim == 1 and name.endswith("weight"))
            p.copy_((1.0 if around_one else 0.0) + 0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_gnconv_split_and_recursion(order):
    torch.manual_seed(order)
    dim = 32
    g = HorNetGnConv(dim, order=order, scale=1 / 3).eval()
    assert g.dims == [dim // 2 ** (order - 1 - i) for i in range(order)]  # C/2^(n-1), ..., C/2, C
    assert g.proj_in.out_channels == 2 * dim == g.dims[0] + sum(g.dims)
    assert g.dwconv.in_channels == g.dwconv.groups == sum(g.dims)
    assert [(pw.in_channels, pw.out_channels) for pw in g.pws] == list(zip(g.dims[:-1], g.dims[1:]))
    x = torch.randn(2, dim, 8, 8)
    with torch.no_grad():
        y = g.proj_in(x)
        p, q = y[:, :g.dims[0]], g.dwconv(y[:, g.dims[0]:]) / 3
        bounds = [0, *torch.tensor(g.dims).cumsum(0).tolist()]
        p = p * q[:, bounds[0]:bounds[1]]
        for k in range(order - 1):
            p = g.pws[k](p) * q[:, bounds[k + 1]:bounds[k + 2]]
        torch.testing.assert_close(g(x), g.proj_out(p))


def test_gnconv_rejects_indivisible_dim():
    with pytest.raises(ValueError, match="multiple of 16"):
        HorNetGnConv(40, order=5)


def test_official_key_layout_and_filter_grids():
    with torch.device("meta"):
        model = create_model("hornet_tiny_gf")
    keys = model.state_dict().keys()
    for k in ("downsample_layers.0.0.weight", "downsample_layers.3.1.weight", "stages.0.1.gnconv.dwconv.weight",
              "stages.2.0.gnconv.pws.2.weight", "stages.3.1.gamma2", "norm.weight", "head.weight"):
        assert k in keys, k
    grids = [tuple(m.complex_weight.shape) for m in model.modules() if isinstance(m, HorNetGlobalLocalFilter)]
    assert grids[0] == (240, 14, 8, 2) and grids[-1] == (496, 7, 4, 2)  # the official 224 px grids
    with torch.device("meta"):
        big = create_model("hornet_tiny_gf", img_size=384)
    assert big.stages[2][0].gnconv.dwconv.complex_weight.shape[1:3] == (24, 13)  # official *_img384 grid
    assert big.stages[3][0].gnconv.dwconv.complex_weight.shape[1:3] == (12, 7)


def test_global_filter_at_other_input_sizes():
    model = _randomized()  # built for 64 px: grids 4x3 and 2x2
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref = model(x)  # filters resized on the fly to 6x5 and 3x3
    assert torch.isfinite(ref).all()
    rebuilt = create_model("hornet_test", num_classes=10, img_size=96).eval()
    load_checkpoint(rebuilt, model.state_dict())  # filters resized once, at load, to 6x4 and 3x2
    assert rebuilt.stages[2][0].gnconv.dwconv.complex_weight.shape[1:3] == (6, 4)
    x96 = x[..., :96]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x96), model(x96), atol=1e-6, rtol=0)
        small = model(torch.randn(1, 3, 32, 32))  # stage 4 is 1x1: the 2x2 filter shrinks to one point
    assert small.shape == (1, 10)


def test_fft_macs_counted():
    model = create_model("hornet_test", num_classes=10).eval()
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    ops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    expected = 0
    for gf, side in ((model.stages[2][0].gnconv.dwconv, 4), (model.stages[3][0].gnconv.dwconv, 2)):
        n = side * side
        expected += int(2.5 * n * math.log2(n) * gf.complex_weight.shape[0])  # one real transform of C/2 maps
    assert ops["aten._fft_r2c"] == expected and ops["aten._fft_c2r"] == expected
