"""NiNformer specifics: the official key layout, the one input size, the shared block norm."""
from __future__ import annotations

import pytest
import torch

import visionzoo
from visionzoo.models.ninformer import NiNformer

torch.set_num_threads(1)


def test_remap_official_keys_and_keep_ours():
    model = visionzoo.create_model("ninformer_test", num_classes=5)
    ours = model.state_dict()
    official = {"patcher.weight": 0, "classifier.bias": 1, "model.1.norm.weight": 2,
                "model.0.mgu.Mixer.token_mix.0.bias": 3, "model.0.mgu.Mixer.token_mix.2.net.3.weight": 4,
                "model.0.mgu.Mixer.channel_mix.1.net.0.bias": 5, "model.0.mgu.proj.weight": 6,
                "model.1.ffn.net.3.bias": 7}
    out = NiNformer.remap(official)
    assert set(out) <= set(ours) and len(out) == len(official)
    assert NiNformer.remap(ours).keys() == ours.keys()


def test_one_input_size_and_one_norm_per_block():
    model = visionzoo.create_model("ninformer_test", num_classes=5).eval()
    with pytest.raises(ValueError, match="must be 32x32"):
        model(torch.randn(1, 3, 64, 64))
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in model.blocks[0].children()) == 1  # both branches share it
    big = visionzoo.create_model("ninformer_test", num_classes=5, img_size=64).eval()
    assert big(torch.randn(1, 3, 64, 64)).shape == (1, 5)
