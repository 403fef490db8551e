"""T2T-ViT specifics: the soft split equals nn.Unfold, the fixed sinusoidal table equals the official one, which
attentions are softmax (recorded) and which are not (Performer), official keys, qk_scale, token reduction."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import visionzoo
from visionzoo import tokens
from visionzoo.explain import record_attention
from visionzoo.models.t2t_vit import T2TViT, sinusoid_table, soft_split

torch.set_num_threads(1)
FIXTURE = Path(__file__).parent.parent / "fixtures" / "t2t_vit_official_performer.safetensors"


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return visionzoo.create_model("t2t_vit_test", num_classes=5, **kwargs).eval()


def test_soft_split_is_unfold():
    x = torch.randn(2, 3, 40, 24)
    for k, s, p in ((7, 4, 2), (3, 2, 1)):
        tokens, grid = soft_split(x, k, s, p)
        torch.testing.assert_close(tokens, F.unfold(x, k, padding=p, stride=s).transpose(1, 2), rtol=0, atol=0)
        assert grid == ((40 + 2 * p - k) // s + 1, (24 + 2 * p - k) // s + 1)


def test_sinusoid_table_is_the_official_one():
    official = load_file(str(FIXTURE))["pos_embed"]  # (1, 1 + 16, 64), stored by the official model
    torch.testing.assert_close(sinusoid_table(17, 64), official, rtol=0, atol=1e-6)
    model = _model()
    assert not model.pos_embed.requires_grad and not model.tokens_to_token.attention1.w.requires_grad


def test_performer_is_not_recorded_and_the_transformer_t2t_layer_is():
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    assert [m.name for m in rec.maps] == ["blocks.0.attn.core", "blocks.1.attn.core"]
    model = _model(tokens_type="transformer")
    with torch.no_grad(), record_attention(model) as rec:
        model(torch.randn(1, 3, 64, 48))
    t2t = [m for m in rec.maps if m.name.startswith("tokens_to_token.")]
    assert [m.grid for m in t2t] == [(16, 12), (8, 6)] and t2t[0].probs.shape == (1, 1, 192, 192)


def test_official_keys_and_qk_scale():
    model = _model()
    ours = model.state_dict()
    official = {k.replace("head.fc.", "head.").replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2.")
                if k.startswith(("head.", "tokens_to_token.")) else k: v for k, v in ours.items()}
    assert "tokens_to_token.attention1.mlp.0.weight" in official and "head.weight" in official
    assert T2TViT.remap(official).keys() == ours.keys() and T2TViT.remap(ours).keys() == ours.keys()
    assert _model(qk_scale=64 ** -0.5).blocks[0].attn.scale == 64 ** -0.5
    assert model.blocks[0].attn.scale == 32 ** -0.5


def test_token_reduction_runs():
    model = _model()
    handle = tokens.apply(model, "tome", r=4)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    assert handle.token_counts() == [17, 13, 9]
