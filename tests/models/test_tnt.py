"""TNT specifics: official-checkpoint key names, the word stream's windowed attention, the token-tool refusal."""
from __future__ import annotations

import pytest
import torch

import visionzoo
from visionzoo import tokens
from visionzoo.explain import record_attention

torch.set_num_threads(1)


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return visionzoo.create_model("tnt_test", num_classes=5, **kwargs).eval()


def test_official_keys_are_remapped():
    """The official checkpoint names (outer_pos, inner_attn, word table as (1, words, c)) load into ours."""
    model = _model()
    renames = {"patch_pos": "outer_pos", "pixel_embed": "patch_embed", "norm_in": "inner_norm1",
               "attn_in": "inner_attn", "norm_mlp_in": "inner_norm2", "mlp_in": "inner_mlp",
               "norm_out": "outer_norm1", "attn_out": "outer_attn", "norm_mlp.": "outer_norm2.", "mlp.": "outer_mlp."}
    official = {}
    for k, v in model.state_dict().items():
        if k == "pixel_pos":
            official["inner_pos"] = v.flatten(2).transpose(1, 2)  # (1, c, 4, 4) -> (1, 16, c)
            continue
        if k.startswith("head.fc."):
            k = "head." + k.split(".")[-1]
        for new, old in renames.items():
            if new.endswith(".") and k.startswith("blocks."):
                k = k.replace("." + new, "." + old)
            elif not new.endswith("."):
                k = k.replace(new, old)
        k = k.replace("norm1_proj", "proj_norm1").replace("norm2_proj", "proj_norm2")
        official[k] = v
    official["outer_tokens"] = torch.zeros(1)
    mapped = type(model).remap(official)
    assert set(mapped) == set(model.state_dict())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(mapped[k], v)
    assert type(model).remap(model.state_dict()).keys() == model.state_dict().keys()  # idempotent on ours


def test_word_attention_is_per_patch_on_a_4x4_grid():
    model = _model()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    inner = [m for m in rec.maps if ".attn_in." in m.name]
    outer = [m for m in rec.maps if ".attn_out." in m.name]
    assert len(inner) == len(outer) == 2
    assert inner[0].probs.shape == (2 * 4 * 3, 2, 16, 16) and inner[0].grid == (4, 4)
    assert outer[0].probs.shape == (2, 2, 1 + 12, 1 + 12) and outer[0].grid == (4, 3) and outer[0].prefix_tokens == 1


def test_other_input_size_resamples_the_patch_table():
    model = _model()
    with torch.no_grad():
        model.patch_pos.normal_(std=0.5)
        out = model.forward_features(torch.randn(1, 3, 96, 64))
    assert out.shape == (1, 1 + 6 * 4, 64)


def test_token_reduction_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="word"):
        tokens.apply(_model(), "tome", r=2)
