"""ChannelViT specifics: one token per channel per patch, hierarchical channel sampling (train only), channel
subsets, any in_chans, official key layouts, token reduction."""
from __future__ import annotations

import pytest
import torch

import visionzoo
from visionzoo import tokens

torch.set_num_threads(1)


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return visionzoo.create_model("channelvit_test", num_classes=5, **kwargs).eval()


def _token_counts(model, x, **kwargs) -> list[int]:
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with torch.no_grad():
        model(x, **kwargs)
    hook.remove()
    return seen


def test_eval_uses_every_channel_and_training_samples_channels():
    model = _model(in_chans=4)
    x = torch.randn(2, 4, 64, 64)
    assert _token_counts(model, x) == [1 + 4 * 16]  # class token + C x (64/16)^2
    model.train()
    torch.manual_seed(0)
    counts = [_token_counts(model, x)[0] for _ in range(40)]
    ks = {(n - 1) // 16 for n in counts}
    assert all((n - 1) % 16 == 0 for n in counts)
    assert ks == {1, 2, 3, 4}  # k ~ U{1..C}: every subset size occurs
    model.hcs = False
    assert _token_counts(model, x) == [1 + 4 * 16]


def test_channel_subset_follows_the_channel_embedding():
    model = _model(in_chans=4)
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        a = model.forward_channels(x[:, [0, 2]], torch.tensor([0, 2]))
        b = model.forward_channels(x[:, [2, 0]], torch.tensor([2, 0]))  # same channels, other order: same class token
        c = model.forward_channels(x[:, [0, 2]], torch.tensor([0, 3]))  # another channel embedding: another output
        feats = model.forward_intermediates(x[:, [1]], channels=torch.tensor([1]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)
    assert [tuple(f.shape) for f in feats] == [(1, 32, 4, 4)] * 2
    with pytest.raises(ValueError, match="channels must index the 4 channels"):
        model.forward_channels(x[:, :2], torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="one index per input channel"):
        model.forward_channels(x[:, :2], torch.tensor([0]))


def test_official_non_hcs_channel_table_and_head_are_remapped():
    model = _model(in_chans=3)
    ours = model.state_dict()
    official = {("backbone." + k if not k.startswith("head.") else k.replace("head.fc.", "head.")): v
                for k, v in ours.items()}
    table = official.pop("backbone.patch_embed.channel_embed.weight")
    official["backbone.patch_embed.channel_embed"] = table.t().reshape(1, 32, 3, 1, 1)
    remapped = model.remap(official)
    assert remapped.keys() == ours.keys()
    torch.testing.assert_close(remapped["patch_embed.channel_embed.weight"], table)
    assert model.remap(ours).keys() == ours.keys()


def test_tome_reduces_channel_tokens():
    model = _model()
    h = tokens.apply(model, "tome", r=8)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    assert h.token_counts() == [49, 41, 33]
