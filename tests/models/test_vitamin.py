"""ViTamin specifics: the GeGLU MLP, timm's head keys, token reduction on the transformer blocks, the position-free
XL form, other input sizes, and what the registered numbers mean."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import visionzoo
from visionzoo import tokens

torch.set_num_threads(1)


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return visionzoo.create_model("vitamin_test", num_classes=5, **kwargs).eval()


def test_geglu_mlp():
    mlp = _model().blocks[0].mlp
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        h = F.layer_norm(x, (64,), mlp.norm.weight, mlp.norm.bias, eps=1e-6)
        expected = mlp.w2(F.gelu(mlp.w0(h)) * mlp.w1(h))
        torch.testing.assert_close(mlp(x), expected)
    assert mlp.w0.out_features == 128  # mlp_ratio 2


def test_timm_head_keys_are_remapped():
    model = _model()
    sd = model.state_dict()
    names = {"head.fc.weight": "head.weight", "head.fc.bias": "head.bias", "head.norm.weight": "fc_norm.weight",
             "head.norm.bias": "fc_norm.bias"}
    timm_sd = {names.get(k, k): v for k, v in sd.items()}
    remapped = type(model).remap(timm_sd)
    assert remapped.keys() == sd.keys()
    assert type(model).remap(remapped).keys() == sd.keys()  # idempotent on our keys


def test_token_reduction_runs_and_reduces_tokens():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        assert model.forward_features(x).shape == (2, 16, 64)
        tokens.apply(model, "tome", r=2)
        assert model.forward_features(x).shape == (2, 12, 64)
        assert model(x).shape == ref.shape


def test_xlarge_form_has_no_position_table_and_any_size_resamples():
    nopos = _model(pos_embed=False)
    assert nopos.pos_embed is None and "pos_embed" not in nopos.state_dict()
    with torch.device("meta"):
        xl = visionzoo.create_model("vitamin_xlarge_384")
    assert xl.pos_embed is None
    model = _model()
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        feats = model.forward_intermediates(x, [0, 1, -1])
        assert [tuple(f.shape) for f in feats] == [(1, 16, 24, 20), (1, 32, 12, 10), (1, 64, 6, 5)]
        assert model(x).shape == (1, 5)


def test_numbers_are_clip_zero_shot():
    v = visionzoo.get_variant("vitamin_large_224")
    assert "zero-shot" in v.notes and "zero-shot" in v.paper.source and v.paper.top1 == 80.8
