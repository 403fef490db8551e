"""The ESPCN head on every family at two sizes; PSNR and SSIM against hand-computed values; SR loss falls."""
from __future__ import annotations

import math

import pytest
import torch
from dense_cases import input_sides, usable

import visionzoo
from visionzoo.errors import ArgumentError
from visionzoo.heads import DenseModel, psnr, ssim


@pytest.mark.parametrize("name", visionzoo.list_models("*_test"))
def test_espcn_shapes_two_sizes(name):
    torch.manual_seed(0)
    model = usable(name, "espcn", num_classes=3, dim=16, head_kwargs={"scale": 2})
    if model is None:
        return
    sides = input_sides(model)
    m = model.input_multiple if len(sides) > 1 else 0
    for side in sides:
        x = torch.rand(2, 3, side, side + m)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, 3, 2 * side, 2 * (side + m))
        # an untrained head starts at bicubic upsampling
        up = torch.nn.functional.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
        assert torch.allclose(out, up, atol=1e-6)


def test_psnr_by_hand():
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1, :, :4] += 0.5  # half the pixels off by 0.5: MSE 0.125 -> 10 log10(8) dB
    assert psnr(b, a).tolist() == pytest.approx([20.0, 10 * math.log10(8)])
    assert math.isinf(psnr(a, a)[0].item())


def test_ssim_by_hand():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x).item() == pytest.approx(1.0)
    # constant images a and b: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.6, 0.01 ** 2
    got = ssim(torch.full((1, 1, 12, 12), a), torch.full((1, 1, 12, 12), b)).item()
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert 0 < ssim(noisy, x).item() < 0.9 and ssim(noisy, x).item() == pytest.approx(ssim(x, noisy).item())
    with pytest.raises(ArgumentError, match="at least 11x11"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_sr_loss_falls_on_fixed_batch():
    torch.manual_seed(0)
    hr = torch.rand(2, 3, 128, 128)
    hr = torch.nn.functional.avg_pool2d(hr, 3, 1, 1)  # some structure
    lr = torch.nn.functional.interpolate(hr, scale_factor=0.5, mode="bicubic", antialias=True).clamp(0, 1)
    model = DenseModel("resnet_test", "espcn", num_classes=3, dim=16)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    losses = []
    for _ in range(10):
        loss = model.loss(model(lr), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
