"""ViT / DeiT specifics: position-table resampling, the distilled head, pooling options, timm's head keys,
input-size errors."""
from __future__ import annotations

import pytest
import torch

import visionzoo

torch.set_num_threads(1)

TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _model(name: str = "vit_test", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = visionzoo.create_model(name, num_classes=5, **{**TINY, **kwargs}).eval()
    with torch.no_grad():  # a non-trivial position table, so resampling it changes the output
        model.pos_embed.normal_(std=0.5)
    return model


def test_checkpoint_of_another_grid_is_resampled():
    """A 32 px checkpoint loaded into a 48 px model equals the 32 px model run on 48 px (resampled on the fly)."""
    small = _model(img_size=32)
    big = visionzoo.create_model("vit_test", num_classes=5, img_size=48, **TINY).eval()
    visionzoo.load_checkpoint(big, small.state_dict())
    assert big.pos_embed.shape == (1, 1 + 6 * 6, 32)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(big(x), small(x), atol=1e-5, rtol=0)


def test_non_square_input_grid():
    model = _model(img_size=32)
    x = torch.randn(1, 3, 48, 24)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        tokens = model.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(1, 32, 6, 3)] * 2
    assert tokens.shape == (1, 1 + 18, 32)
    # the last intermediate is the last block's patch tokens, before the final norm
    patches = model.norm(feats[-1].flatten(2).transpose(1, 2))  # (B, C, H, W) -> (B, HW, C)
    torch.testing.assert_close(patches, tokens[:, 1:])


def test_distilled_head_averages_both_tokens():
    model = _model("deit_test")
    assert model.num_prefix_tokens == 2 and model.classifier == ("head.fc", "head.fc_dist")
    assert all(b.attn.core.prefix_tokens == 2 for b in model.blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        expected = (model.head.fc(tokens[:, 0]) + model.head.fc_dist(tokens[:, 1])) / 2
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, :2].mean(1))
    model.train()
    assert model(x).shape == (2, 5)  # the mean in training too, until distilled training is asked for
    model.set_distilled_training(True)
    assert model.distilled_training
    logits, logits_dist = model(x)
    assert logits.shape == logits_dist.shape == (2, 5)
    model.eval()
    assert model(x).shape == (2, 5)


def test_distilled_reset_classifier_replaces_both_heads():
    model = _model("deit_test")
    model.reset_classifier(3)
    assert model.head.fc.out_features == model.head.fc_dist.out_features == 3
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 32)


def test_avg_pool_moves_the_final_norm():
    model = _model(global_pool="avg")
    keys = set(model.state_dict())
    assert "head.norm.weight" in keys and "norm.weight" not in keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), model.head.norm(tokens[:, 1:].mean(1)))


@pytest.mark.parametrize(("name", "kwargs"), [("vit_test", {"global_pool": "avg"}), ("deit_test", {})])
def test_timm_head_keys_are_remapped(name, kwargs):
    """timm's (and the official DeiT's) ``head``, ``head_dist`` and ``fc_norm`` load into ``head.fc``,
    ``head.fc_dist`` and ``head.norm``; our own keys load unchanged."""
    model = _model(name, **kwargs)
    ours = model.state_dict()
    rename = {"head.fc.": "head.", "head.fc_dist.": "head_dist.", "head.norm.": "fc_norm."}
    timm = {next((new + k[len(old):] for old, new in rename.items() if k.startswith(old)), k): v
            for k, v in ours.items()}
    assert {"head.weight", "fc_norm.weight" if kwargs else "head_dist.weight"} <= set(timm)
    assert model.remap(timm).keys() == ours.keys()
    assert model.remap(ours).keys() == ours.keys()
    fresh = visionzoo.create_model(name, num_classes=5, **{**TINY, **kwargs}).eval()
    assert visionzoo.load_checkpoint(fresh, timm) == "official"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_bad_arguments_and_sizes_raise():
    with pytest.raises(ValueError, match="global_pool must be 'token'"):
        visionzoo.create_model("deit_test", global_pool="avg")
    with pytest.raises(ValueError, match="global_pool must be one of"):
        visionzoo.create_model("vit_test", global_pool="max")
    model = _model()
    with pytest.raises(ValueError, match=r"input 36x32 must be at least 8x8 and a multiple of 8"):
        model(torch.randn(1, 3, 36, 32))
    with torch.device("meta"):
        big_patch = visionzoo.create_model("vit_base_patch32_224")
    assert big_patch.input_multiple == big_patch.min_input_size == 32
    assert big_patch.feature_info.reduction() == [32] * 12
    with pytest.raises(ValueError, match="multiple of 32"):
        big_patch(torch.empty(1, 3, 224, 240, device="meta"))
