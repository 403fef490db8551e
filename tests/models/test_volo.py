"""VOLO specifics: outlook attention against its direct definition, the token-labelling head (timm's inference sum,
the dense training output), timm's head keys, token reduction on the transformer stages, other input sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import visionzoo
from visionzoo import tokens

torch.set_num_threads(1)


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return visionzoo.create_model("volo_test", num_classes=5, **kwargs).eval()


def test_outlook_attention_matches_its_definition():
    """softmax of the predicted k^2 x k^2 logits per pooled location, applied to unfolded values, folded back."""
    attn = _model().network[0][0].attn
    x = torch.randn(2, 8, 8, 32)
    B, H, W, C = x.shape
    heads, k2, d = attn.num_heads, 9, C // attn.num_heads
    with torch.no_grad():
        v = F.unfold(attn.v(x).permute(0, 3, 1, 2), 3, padding=1, stride=2)  # (B, C * 9, 16)
        v = v.reshape(B, heads, d, k2, 16).permute(0, 1, 4, 3, 2)  # (B, heads, L, 9, d)
        a = attn.attn(F.avg_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1))
        a = (a.reshape(B, 16, heads, k2, k2).permute(0, 2, 1, 3, 4) * d ** -0.5).softmax(-1)
        y = (a @ v).permute(0, 1, 4, 3, 2).reshape(B, C * k2, 16)
        y = attn.proj(F.fold(y, (H, W), 3, padding=1, stride=2).permute(0, 2, 3, 1))
        torch.testing.assert_close(attn(x), y, atol=1e-5, rtol=1e-5)


def test_head_adds_half_the_max_of_the_token_logits_and_dense_training():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        expected = model.head.fc(feats[:, 0]) + 0.5 * model.head.aux_head(feats[:, 1:]).amax(1)
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 0])
    assert model.classifier == ("head.fc", "head.aux_head")
    model.train()
    assert model(x).shape == (2, 5)
    model.set_dense_training(True)
    cls_logits, token_logits = model(x)
    assert cls_logits.shape == (2, 5) and token_logits.shape == (2, 16, 5)
    model.reset_classifier(0)
    assert model.eval()(x).shape == (2, 64)
    with pytest.raises(ValueError, match="use_aux_head"):
        _model(use_aux_head=False).set_dense_training(True)


def test_timm_head_keys_are_remapped():
    model = _model()
    sd = model.state_dict()
    timm_sd = {{"head.fc.weight": "head.weight", "head.fc.bias": "head.bias"}.get(k, k.replace("head.aux_head.",
                                                                                               "aux_head.")): v
               for k, v in sd.items()}
    assert "aux_head.weight" in timm_sd and "head.weight" in timm_sd
    remapped = type(model).remap(timm_sd)
    assert remapped.keys() == sd.keys()
    assert type(model).remap(remapped).keys() == sd.keys()  # idempotent on our keys


def test_token_reduction_on_the_transformer_stage():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 1 + 16, 64)
        tokens.apply(model, "tome", r=3)
        assert model.forward_features(x).shape == (2, 1 + 16 - 2 * 3, 64)
        assert model(x).shape == (2, 5)


def test_other_input_size_resamples_the_position_table():
    model = _model()
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        assert [tuple(f.shape) for f in feats] == [(1, 32, 12, 10), (1, 64, 6, 5)]
        assert model(x).shape == (1, 5)
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.randn(1, 3, 72, 64))
