"""DHVT specifics: head tokens (placement does not matter, merged into the class token), DAFF's class-token gate,
the SOPE depth per patch size, the official CIFAR counts, the official head key, and why token reduction refuses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import visionzoo
from visionzoo import tokens

torch.set_num_threads(1)


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return visionzoo.create_model("dhvt_test", num_classes=5, **kwargs).eval()


def test_head_tokens_appended_as_in_the_official_code_give_the_same_output():
    """Plain softmax attention over [cls, patches, head tokens] (official order), then cls += mean(head outputs)."""
    attn = _model().blocks[0].attn
    x = torch.randn(2, 1 + 12, 32)
    B, N, C = x.shape
    h, d = attn.num_heads, attn.head_dim
    with torch.no_grad():
        seq = torch.cat([x, attn.head_tokens(x)], dim=1)
        q, k, v = attn.qkv(seq).reshape(B, N + h, 3, h, d).permute(2, 0, 3, 1, 4)
        y = ((q @ k.transpose(-2, -1)) * d ** -0.5).softmax(-1) @ v
        y = attn.proj(y.transpose(1, 2).reshape(B, N + h, C))
        expected = torch.cat([y[:, :1] + y[:, N:].mean(1, keepdim=True), y[:, 1:N]], dim=1)
        torch.testing.assert_close(attn(x, (3, 4)), expected, atol=1e-5, rtol=1e-5)
    assert attn.core.prefix_tokens == 1 + h


def test_daff_gates_the_class_token_without_sigmoid():
    daff = _model().blocks[0].mlp
    x = torch.randn(2, 1 + 6, 32)
    with torch.no_grad():
        out = daff(x, (2, 3))
        patches = out[:, 1:].transpose(1, 2).reshape(2, 32, 2, 3)
        gate = daff.excitation(F.gelu(daff.compress(patches.mean((2, 3)))))
        torch.testing.assert_close(out[:, 0], x[:, 0] * gate)


@pytest.mark.parametrize("patch, convs", [(16, 4), (4, 2), (2, 1)])
def test_sope_has_log2_patch_convs(patch, convs):
    model = _model(patch_size=patch)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.patch_embed.modules()) == convs
    assert isinstance(model.patch_embed.proj[-1], torch.nn.GELU) == (patch == 2)
    x = torch.randn(1, 3, 2 * patch, 3 * patch)
    with torch.no_grad():
        assert model.forward_features(x).shape == (1, 1 + 6, 32)


def test_official_cifar_counts_with_100_classes():
    for name, official in (("dhvt_tiny_cifar_p4", 6.00865), ("dhvt_small_cifar_p2", 22.766698)):
        with torch.device("meta"):
            model = visionzoo.create_model(name, num_classes=100)
        assert sum(p.numel() for p in model.parameters()) == round(official * 1e6)


def test_official_head_key_and_token_reduction_refusal():
    model = _model()
    sd = model.state_dict()
    official = {{"head.fc.weight": "head.weight", "head.fc.bias": "head.bias"}.get(k, k): v for k, v in sd.items()}
    assert type(model).remap(official).keys() == sd.keys() == type(model).remap(sd).keys()
    assert "spatial map" in tokens.can_apply(model)  # DAFF puts the tokens back on their map in every block
