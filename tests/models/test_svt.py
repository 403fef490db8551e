"""SVT-specific checks: the torch DTCWT against a direct computation from its definition (filter taps, symmetric
extension, quads to complex), perfect reconstruction, the scattering mixer's complex MLP, the official-layout remap
(the wavelet buffers are dropped), low-pass resizing at other input sizes, traced vs eager.

(The parity fixture ``svt_official`` checks the transform against pytorch_wavelets' DTCWT through the official
model; pytorch_wavelets is not a dependency here.)"""
from __future__ import annotations

import math

import torch

from visionzoo import create_model
from visionzoo.models.svt import _G0, _G1, _H0, _H1, SVT, SVTScatter, dtcwt_forward, dtcwt_inverse

torch.set_num_threads(1)


def _direct_filter(x: torch.Tensor, taps: tuple[float, ...], axis: int, i: int, j: int) -> float:
    """One output sample of the symmetric-extension convolution of the 2-D array ``x`` along ``axis``."""
    n, m = x.shape[axis], len(taps) // 2
    total = 0.0
    for t, h in enumerate(taps):  # y[i] = sum_t h[t] x[i + m - t] (a true convolution)
        k = (i if axis == 0 else j) + m - t
        while not 0 <= k < n:  # half-sample mirror: -1 -> 0, n -> n - 1
            k = -k - 1 if k < 0 else 2 * n - 1 - k
        total += h * float(x[k, j] if axis == 0 else x[i, k])
    return total


def test_filters_are_the_near_sym_b_pair():
    assert len(_H0) == 13 and len(_H1) == 19 and len(_G0) == 19 and len(_G1) == 13
    for taps in (_H0, _H1, _G0, _G1):
        assert taps == taps[::-1]  # symmetric
    assert math.isclose(sum(_H0), 1.0) and math.isclose(sum(_G0), 1.0)  # DC gain 1 (the 1/sqrt 2 sit in the quads)
    assert abs(sum(_H1)) < 1e-12 and abs(sum(_G1)) < 1e-12  # high-pass: no DC


def test_forward_matches_a_direct_computation():
    torch.manual_seed(0)
    H, W = 6, 10
    x = torch.randn(1, 1, H, W, dtype=torch.float64)
    ll, re, im = dtcwt_forward(x)
    img = x[0, 0]
    # separable: rows (W) first, then columns (H); build the full row-filtered maps directly
    lo = torch.tensor([[_direct_filter(img, _H0, 1, i, j) for j in range(W)] for i in range(H)], dtype=torch.float64)
    hi = torch.tensor([[_direct_filter(img, _H1, 1, i, j) for j in range(W)] for i in range(H)], dtype=torch.float64)
    assert math.isclose(ll[0, 0, 2, 3].item(), _direct_filter(lo, _H0, 0, 2, 3), abs_tol=1e-12)
    # the 45-degree band (orientation 1) comes from hh = columns-high of rows-high; quad (1, 2) of hh
    hh = lambda i, j: _direct_filter(hi, _H1, 0, i, j)  # noqa: E731
    a, b, c, d = hh(2, 4), hh(2, 5), hh(3, 4), hh(3, 5)
    s = 1 / math.sqrt(2)
    assert math.isclose(re[0, 0, 1, 1, 2].item(), s * (a - d), abs_tol=1e-12)
    assert math.isclose(im[0, 0, 1, 1, 2].item(), s * (b + c), abs_tol=1e-12)
    assert math.isclose(re[0, 0, 4, 1, 2].item(), s * (a + d), abs_tol=1e-12)  # 135 degrees: the other pair
    assert math.isclose(im[0, 0, 4, 1, 2].item(), s * (b - c), abs_tol=1e-12)


def test_perfect_reconstruction():
    torch.manual_seed(1)
    for H, W in ((8, 8), (16, 24), (4, 6)):  # 4x6: shorter than the 19-tap filters (repeated mirroring)
        x = torch.randn(2, 3, H, W, dtype=torch.float64)
        ll, re, im = dtcwt_forward(x)
        assert ll.shape == x.shape and re.shape == im.shape == (2, 3, 6, H // 2, W // 2)
        torch.testing.assert_close(dtcwt_inverse(ll, re, im), x, atol=1e-12, rtol=0)


def test_mixer_complex_mlp():
    torch.manual_seed(2)
    m = SVTScatter(8, (4, 4)).double()
    re, im = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 4, 2, dtype=torch.float64)  # 4 blocks of 2
    w, b = m.complex_weight_lh_1, m.complex_weight_lh_b1
    out_re, out_im = m._complex_linear(re, im, w, b)
    z = torch.complex(re, im)
    wz = torch.complex(w[0], w[1])
    expect = torch.stack([z[:, n] @ wz[n] for n in range(4)], dim=1) + torch.complex(b[0], b[1])
    torch.testing.assert_close(torch.complex(out_re, out_im), expect)
    # with all MLP weights zero and the low-pass weight one, the mixer keeps only the low-pass band
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.complex_weight_ll.fill_(1.0)
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    y = x.transpose(1, 2).reshape(2, 8, 4, 4)
    ll, re, im = dtcwt_forward(y)
    torch.testing.assert_close(m(x, (4, 4)), dtcwt_inverse(ll, 0 * re, 0 * im).flatten(2).transpose(1, 2))


def test_remap_drops_wavelet_buffers_and_is_idempotent():
    model = create_model("svt_test", num_classes=10)
    ours = model.state_dict()
    assert SVT.remap(ours).keys() == ours.keys()
    assert SVT.remap({"block1.0.attn.xfm.h0o": 0, "block1.0.attn.complex_weight_ll": 1, "head.weight": 2}) == {
        "stages.0.blocks.0.attn.complex_weight_ll": 1, "head.fc.weight": 2}


def test_other_sizes_and_traced_path():
    model = create_model("svt_test", num_classes=10).eval()  # low-pass weight built for 64 px: 16x16
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        eager = model(x)
        traced = torch.fx.symbolic_trace(model)(x)
    assert eager.shape == (2, 10)
    torch.testing.assert_close(traced, eager)
