"""The ``attn_type`` options of ``layers.Attention`` (TransNormer's DiagAttention / NormAttention, the Gaussian mixture
mask of "RetNet viewed through convolution"), each against a direct quadratic-form computation, and their wiring
into plain ViTs (``create_model("deit_small_patch16_224", attn_type="transnormer")``)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import visionzoo
import visionzoo.tokens
from visionzoo.layers import Attention, attn_types_per_block

torch.set_num_threads(1)
DIM, HEADS = 16, 2


def _attn(attn_type: str, prefix: int = 1, **kwargs) -> Attention:
    torch.manual_seed(0)
    attn = Attention(DIM, HEADS, qkv_bias=True, prefix_tokens=prefix, attn_type=attn_type, **kwargs).double().eval()
    return attn


def _qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head q, k, v ``(B, h, N, d)`` from the module's weights, written out."""
    B, N, _ = x.shape
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(DIM, dim=-1)
    return tuple(t.reshape(B, N, HEADS, DIM // HEADS).transpose(1, 2) for t in (q, k, v))


def _out(attn: Attention, heads: torch.Tensor) -> torch.Tensor:
    B, _, N, _ = heads.shape
    return heads.transpose(1, 2).reshape(B, N, DIM) @ attn.proj.weight.T + attn.proj.bias


def test_norm_linear_equals_unscaled_quadratic_form_with_rms_norm():
    """NormAttention: RMSNorm(phi(Q) phi(K)^T V) W_o with phi = 1 + elu and no denominator, as an N x N product."""
    attn = _attn("norm_linear")
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    q, k, v = _qkv(attn, x)
    phi = lambda t: torch.where(t > 0, t + 1, torch.exp(t))  # noqa: E731 (1 + elu)
    heads = (phi(q) @ phi(k).transpose(-2, -1)) @ v  # the (N, N) kernel matrix, unnormalised
    B, _, N, _ = heads.shape
    merged = heads.transpose(1, 2).reshape(B, N, DIM)
    merged = merged / (merged.pow(2).mean(-1, keepdim=True).sqrt() + 1e-8)
    expected = merged @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected)
    assert "mask.sigma" not in attn.state_dict() and set(attn.state_dict()) == set(_attn("softmax").state_dict())


@pytest.mark.parametrize("n", [16, 21])
def test_diag_equals_block_diagonal_softmax(n: int):
    """DiagAttention: softmax over the keys of the same chunk of 8 consecutive tokens (the last chunk partial)."""
    attn = _attn("diag", chunk_size=8)
    x = torch.randn(2, n, DIM, dtype=torch.float64)
    q, k, v = _qkv(attn, x)
    logits = q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS)
    same = torch.tensor([[i // 8 == j // 8 for j in range(n)] for i in range(n)])
    probs = logits.masked_fill(~same, float("-inf")).softmax(-1)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _out(attn, probs @ v))
        torch.testing.assert_close(attn.attention_probs(x), probs)


def test_gmm_equals_masked_logits():
    """GMM: softmax((q k^T / sqrt(d)) * M) with M[i, j] = sum_k alpha exp(-d_ij^2 / (2 (sigma^2 + 1e-5))) over patch
    positions, and weight 1 in the class token's row and column."""
    attn = _attn("gmm", prefix=1, num_kernels=3)
    H, W = 3, 3
    x = torch.randn(2, 1 + H * W, DIM, dtype=torch.float64)
    q, k, v = _qkv(attn, x)
    mask = torch.ones(HEADS, 1 + H * W, 1 + H * W, dtype=torch.float64)
    for h in range(HEADS):
        for i in range(H * W):
            for j in range(H * W):
                d2 = (i // W - j // W) ** 2 + (i % W - j % W) ** 2
                mask[h, 1 + i, 1 + j] = sum(attn.mask.alpha[c, h].item() * math.exp(
                    -d2 / (2 * (attn.mask.sigma[c, h].item() ** 2 + 1e-5))) for c in range(3))
    probs = (q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS) * mask).softmax(-1)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _out(attn, probs @ v))
        torch.testing.assert_close(attn.attention_probs(x), probs)
        torch.testing.assert_close(attn(x, grid=(3, 3)), attn(x))
        with pytest.raises(ValueError, match="grid"):
            attn(x, grid=(2, 4))
    assert attn.mask.sigma.shape == (3, HEADS, 1, 1)


def test_softmax_default_keeps_layout_and_bad_type_raises():
    assert set(_attn("softmax").state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    with pytest.raises(ValueError, match="attn_type"):
        Attention(DIM, HEADS, attn_type="performer")
    with pytest.raises(ValueError, match="attn_type"):
        visionzoo.create_model("vit_test", attn_type="linear")
    assert attn_types_per_block("transnormer", 5) == ["diag"] * 2 + ["norm_linear"] * 3
    assert attn_types_per_block("retnet", 2) == ["gmm", "gmm"]


@pytest.mark.parametrize("attn_type", ["transnormer", "retnet"])
def test_vit_takes_attn_type(attn_type: str):
    """Any plain ViT takes the option; forward, backward, FX trace and the intermediates work."""
    torch.manual_seed(0)
    model = visionzoo.create_model("vit_test", attn_type=attn_type, num_classes=3)
    types = [b.attn.attn_type for b in model.blocks]
    assert types == (["diag", "norm_linear"] if attn_type == "transnormer" else ["gmm", "gmm"])
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    out.sum().backward()
    assert out.shape == (2, 3) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), model(x))
    assert [f.shape[1] for f in model.forward_intermediates(x)] == [64, 64]


def test_norm_linear_counts_fewer_macs_and_token_tools_refuse():
    soft = visionzoo.profile("deit_small_patch16_224").macs
    lin = visionzoo.profile("deit_small_patch16_224", attn_type="norm_linear").macs
    assert lin < soft  # N d^2 instead of N^2 d per head
    model = visionzoo.create_model("vit_test", attn_type="transnormer").eval()
    with pytest.raises(ValueError, match="softmax"):
        visionzoo.tokens.apply(model, "tome", r=2)
        model(torch.randn(1, 3, 64, 64))


def test_norm_linear_refuses_probabilities():
    attn = _attn("norm_linear")
    with pytest.raises(ValueError, match="no attention probabilities"):
        attn.attention_probs(torch.randn(1, 5, DIM, dtype=torch.float64))
    assert F.elu(torch.tensor(-1.0)) > -1  # phi = 1 + elu stays positive
