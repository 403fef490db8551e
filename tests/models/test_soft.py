"""SOFT-specific checks: the Newton pseudo-inverse against torch.linalg.pinv, its gradient, the Gaussian kernel,
the softmax-free attention against a direct computation, and the soft_small discrepancy recorded."""
from __future__ import annotations

import math

import torch

from visionzoo import get_variant
from visionzoo.models.soft import SOFTKernel, gaussian_kernel, newton_pinv

torch.set_num_threads(1)


def _gram(n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(2, n, rank, generator=g, dtype=torch.float64)
    return pts @ pts.transpose(-2, -1)  # symmetric PSD with non-negative entries (as a kernel), rank `rank`


def test_newton_matches_pinv_full_rank_and_rank_deficient():
    landmarks = torch.randn(3, 12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = gaussian_kernel(landmarks, landmarks)  # the matrices SOFT inverts: SPD, non-negative
    torch.testing.assert_close(newton_pinv(k, iters=60, eps=0.0), torch.linalg.pinv(k), atol=1e-8, rtol=1e-8)
    # rank 4 of 10: the iteration converges to the Moore-Penrose pseudo-inverse (its null space stays at ~0 for a
    # while; rounding-level eigenvalues ~1e-16 double each step and would surface after ~40 steps)
    low = _gram(10, 4, 1)
    torch.testing.assert_close(newton_pinv(low, iters=20, eps=0.0), torch.linalg.pinv(low, hermitian=True),
                               atol=1e-9, rtol=1e-9)
    eye = torch.eye(12, dtype=torch.float64)  # the default: 20 steps on K + 0.01 I, as the official code
    torch.testing.assert_close(newton_pinv(k), torch.linalg.inv(k + 0.01 * eye), atol=1e-6, rtol=1e-6)


def test_newton_gradient_is_the_exact_inverse_gradient():
    landmarks = torch.randn(1, 8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    k = gaussian_kernel(landmarks, landmarks).detach().requires_grad_(True)
    w = torch.randn(1, 8, 8, dtype=torch.float64)
    (newton_pinv(k, iters=40) * w).sum().backward()
    inv = torch.linalg.inv(k.detach() + 0.01 * torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(k.grad, -inv.transpose(-2, -1) @ w @ inv.transpose(-2, -1), atol=1e-8, rtol=1e-8)


def test_gaussian_kernel_is_exp_of_squared_distance():
    q, k = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 7, 3, dtype=torch.float64)
    torch.testing.assert_close(gaussian_kernel(q, k), torch.exp(-torch.cdist(q, k) ** 2 / 2))


def test_softmax_free_attention_direct_form():
    torch.manual_seed(0)
    kern = SOFTKernel(16, 2, sr_ratio=2, conv_size=3, newton_iters=60).double().eval()
    B, h, H, W, d = 2, 2, 4, 6, 8
    q = torch.randn(B, h, H * W, d, dtype=torch.float64)
    v = torch.randn(B, h, H * W, d, dtype=torch.float64)
    with torch.no_grad():
        qs = q / d ** 0.25
        lm = kern.Qlandmark_op(qs.reshape(B * h, H, W, d).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        lm = kern.Qnorm_act(lm.reshape(B, h, -1, d))  # (B, h, m = 2*3, d)
        k1 = torch.exp(-torch.cdist(qs, lm) ** 2 / 2)
        k2 = torch.exp(-torch.cdist(lm, lm) ** 2 / 2) + 0.01 * torch.eye(lm.shape[2], dtype=torch.float64)
        attn = k1 @ torch.linalg.pinv(k2) @ k1.transpose(-2, -1)  # the N x N Nystrom kernel, formed explicitly
        conv = torch.stack([kern.conv(v[..., c].reshape(B, h, H, W)).reshape(B, h, -1) for c in range(d)], -1)
        torch.testing.assert_close(kern(q, v, (H, W)), attn @ v + conv, atol=1e-8, rtol=1e-8)


def test_soft_small_records_code_and_paper():
    v = get_variant("soft_small")
    assert math.isclose(v.params_m, 38.858462) and v.paper.params_m == 24 and v.paper.gmacs == 3.3
    assert "depth 7" in v.notes
