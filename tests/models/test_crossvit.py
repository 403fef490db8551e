"""CrossViT specifics: the two-branch head, the class-token cross-attention, other input sizes, official and timm
keys, token reduction in the branches."""
from __future__ import annotations

import pytest
import torch

import visionzoo
from visionzoo import tokens
from visionzoo.explain import record_attention

torch.set_num_threads(1)


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return visionzoo.create_model("crossvit_test", num_classes=5, **kwargs).eval()


def test_head_averages_the_two_branch_classifiers():
    model = _model()
    x = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        feats = model.forward_features(x)
        small, large = feats[:, :32], feats[:, 32:]
        torch.testing.assert_close(model(x), (model.head.fc(small) + model.head.fc_large(large)) / 2)
    assert model.classifier == ("head.fc", "head.fc_large")
    model.reset_classifier(3)
    assert (model.head.fc.in_features, model.head.fc_large.in_features, model.head.fc.out_features) == (32, 64, 3)


def test_cross_attention_has_the_class_token_as_only_query():
    model = _model()
    with torch.no_grad(), record_attention(model) as rec:
        model(torch.randn(1, 3, 72, 72))
    cross = [m for m in rec.maps if ".fusion." in m.name]
    assert len(cross) == 4  # 2 multi-scale blocks x 2 branches
    # the small branch's class token (projected to 64) over the large branch's 4x4 patches, and the other way
    assert cross[0].probs.shape == (1, 2, 1, 1 + 16) and cross[1].probs.shape == (1, 2, 1, 1 + 36)
    assert all(m.prefix_tokens == 1 and m.grid == (0, 0) for m in cross)


def test_other_input_size_resizes_each_branch():
    model = _model()
    assert model.input_multiple == 36
    x = torch.randn(1, 3, 108, 144)
    with torch.no_grad():
        (feat,) = model.forward_intermediates(x, [-1])
    assert feat.shape == (1, 64, 6, 8)  # 108 x 144 -> 96 x 128 for the patch-16 branch
    with pytest.raises(ValueError, match="multiple of 36"):
        model(torch.randn(1, 3, 72, 84))


def test_timm_and_official_keys_are_remapped():
    model = _model()
    ours = model.state_dict()
    timm_keys = {k.replace("head.fc_large.", "head.1.").replace("head.fc.", "head.0."): v for k, v in ours.items()}
    official = {k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v
                for k, v in timm_keys.items()}
    for sd in (timm_keys, official, ours):
        assert type(model).remap(sd).keys() == ours.keys()


def test_token_reduction_runs_in_the_branches():
    model = _model()
    handle = tokens.apply(model, "tome", r=2)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 72, 72)).shape == (2, 5)
    assert handle.token_counts()[:3] == [1 + 36, 1 + 34, 1 + 32]  # the small branch: 2 patches merged per block
