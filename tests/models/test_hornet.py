"""HorNet-specific checks: gnConv channel split and recursion, official-layout remap, global-filter grids at other
input sizes, the DFT-matrix form of the global filter (what exporters run), FFT MACs."""
from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visionzoo import create_model, load_checkpoint
from visionzoo.bench.flops import CUSTOM_FLOPS
from visionzoo.models.hornet import (
    HorNet,
    HorNetGlobalLocalFilter,
    HorNetGnConv,
    dft_filter,
    fft_filter,
    resize_filter,
)

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


def _to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys -> raoyongming/HorNet keys; the inverse of HorNet.remap."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[k] = v
    return out


def test_key_layout_and_filter_grids():
    with torch.device("meta"):
        model = create_model("hornet_tiny_gf")
    keys = model.state_dict().keys()
    for k in ("stem.0.weight", "stages.3.downsample.1.weight", "stages.0.blocks.1.gnconv.dwconv.weight",
              "stages.2.blocks.0.gnconv.pws.2.weight", "stages.3.blocks.1.gamma2", "head.norm.weight",
              "head.fc.weight"):
        assert k in keys, k
    grids = [tuple(m.complex_weight.shape) for m in model.modules() if isinstance(m, HorNetGlobalLocalFilter)]
    assert grids[0] == (240, 14, 8, 2) and grids[-1] == (496, 7, 4, 2)  # the official 224 px grids
    with torch.device("meta"):
        big = create_model("hornet_tiny_gf", img_size=384)
    assert big.stages[2].blocks[0].gnconv.dwconv.complex_weight.shape[1:3] == (24, 13)  # official *_img384 grid
    assert big.stages[3].blocks[0].gnconv.dwconv.complex_weight.shape[1:3] == (12, 7)


def test_official_checkpoint_loads_through_remap():
    model = _randomized()
    sd = model.state_dict()
    official = _to_official(sd)
    for k in ("downsample_layers.0.1.weight", "downsample_layers.3.1.weight", "stages.2.0.gnconv.dwconv.complex_weight",
              "norm.weight", "head.weight"):
        assert k in official, k
    assert HorNet.remap(official).keys() == sd.keys()
    assert HorNet.remap(sd).keys() == sd.keys()  # our own keys pass through unchanged
    fresh = create_model("hornet_test", num_classes=10).eval()
    assert load_checkpoint(fresh, official) == "official"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_global_filter_at_other_input_sizes():
    model = _randomized()  # built for 64 px: grids 4x3 and 2x2
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref = model(x)  # filters resized on the fly to 6x5 and 3x3
    assert torch.isfinite(ref).all()
    rebuilt = create_model("hornet_test", num_classes=10, img_size=96).eval()
    load_checkpoint(rebuilt, model.state_dict())  # filters resized once, at load, to 6x4 and 3x2
    assert rebuilt.stages[2].blocks[0].gnconv.dwconv.complex_weight.shape[1:3] == (6, 4)
    x96 = x[..., :96]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x96), model(x96), atol=1e-6, rtol=0)
        small = model(torch.randn(1, 3, 32, 32))  # stage 4 is 1x1: the 2x2 filter shrinks to one point
    assert small.shape == (1, 10)


@pytest.mark.parametrize("size", [(4, 4), (6, 5), (7, 8), (1, 1), (3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dft_filter_equals_fft(size, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size, generator=g, dtype=dtype)
    weight = torch.randn(3, size[0], size[1] // 2 + 1, 2, generator=g, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(dft_filter(x, weight), fft_filter(x, weight), atol=tol, rtol=tol)


def test_global_filter_keeps_float64_and_casts_bfloat16_back():
    torch.manual_seed(0)
    gf = HorNetGlobalLocalFilter(8, 4, 3).eval().double()
    torch.nn.init.normal_(gf.complex_weight)
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        out = gf(x)
        x_local, x_global = gf.pre_norm(x).chunk(2, dim=1)
        x_global = fft_filter(x_global, resize_filter(gf.complex_weight, (6, 3)))  # every step in float64
        ref = gf.post_norm(torch.stack((gf.dw(x_local), x_global), dim=2).flatten(1, 2))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)  # float32 FFTs would be off by about 1e-7
    with torch.no_grad():
        assert gf.bfloat16()(x.bfloat16()).dtype == torch.bfloat16


def test_global_filter_exports_to_onnx_and_traces_with_fx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    gf = HorNetGlobalLocalFilter(8, 4, 3).eval()  # a 4x3 grid run at 6x5: resized, odd W
    torch.nn.init.normal_(gf.complex_weight)
    x, x3 = torch.randn(2, 8, 6, 5), torch.randn(3, 8, 6, 5)
    with torch.no_grad():
        refs = [gf(x), gf(x3)]  # eager: torch.fft
        gm = torch.fx.symbolic_trace(gf)
        assert "dft_bases" in gm.code and "fft" not in gm.code.replace("dft", "")
        torch.testing.assert_close(gm(x), refs[0], atol=1e-5, rtol=1e-5)
    ep = torch.export.export(gf, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onx = torch.onnx.export(ep, dynamo=True, optimize=False, verbose=False)
    path = tmp_path / "gf.onnx"
    onx.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for t, ref in zip((x, x3), refs):
        (out,) = sess.run(None, {sess.get_inputs()[0].name: t.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-5, rtol=1e-5)


def test_fft_macs_counted():
    model = create_model("hornet_test", num_classes=10).eval()
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    ops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    expected = 0
    for gf, side in ((model.stages[2].blocks[0].gnconv.dwconv, 4), (model.stages[3].blocks[0].gnconv.dwconv, 2)):
        n = side * side
        expected += int(2.5 * n * math.log2(n) * gf.complex_weight.shape[0])  # one real transform of C/2 maps
    assert ops["aten._fft_r2c"] == expected and ops["aten._fft_c2r"] == expected
