"""PVT (v1) specifics: per-stage position tables (resampled for other input sizes and other checkpoints), the class
token of the last stage, and the official key layout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import visionzoo

torch.set_num_threads(1)


def _model(img_size: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    model = visionzoo.create_model("pvt_test", num_classes=5, img_size=img_size).eval()
    with torch.no_grad():  # non-trivial tables, so that resampling them changes the output
        for i in range(1, 5):
            getattr(model, f"pos_embed{i}").normal_(std=0.5)
    return model


def test_tables_and_class_token_layout():
    model = _model(64)
    grids = [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert model.grids == grids
    for i, ((h, w), dim) in enumerate(zip(grids, (16, 32, 48, 64)), 1):
        assert getattr(model, f"pos_embed{i}").shape == (1, h * w + (i == 4), dim)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        last = model.forward_intermediates(x, indices=[-1])[0]
    assert tokens.shape == (2, 1 + 4, 64)
    assert last.shape == (2, 64, 2, 2)  # the class token is left out of the map


def test_other_input_size_resamples_bilinearly():
    """A 96x64 input: stage 1 uses its 16x16 table bilinearly resized to 24x16 (no antialias), as the official code."""
    model = _model(64)
    x = torch.randn(1, 3, 96, 64)
    pos = model.pos_embed1.reshape(1, 16, 16, -1).permute(0, 3, 1, 2)  # (1, N, C) -> (1, C, 16, 16)
    expected = F.interpolate(pos, size=(24, 16), mode="bilinear").flatten(2).transpose(1, 2)
    seen = {}

    def grab(module, args):  # noqa: ANN001, ANN202
        seen["x"] = args[0]

    hook = model.block1[0].register_forward_pre_hook(grab)
    with torch.no_grad():
        embedded = model.patch_embed1(x).flatten(1, 2)  # (B, H, W, C) -> (B, N, C)
        model(x)
    hook.remove()
    torch.testing.assert_close(seen["x"], embedded + expected, atol=1e-6, rtol=0)


def test_checkpoint_of_another_img_size_is_resampled():
    """A 64 px checkpoint loaded into a 128 px model equals the 64 px model run on 128 px (resampled on the fly)."""
    small = _model(64)
    big = visionzoo.create_model("pvt_test", num_classes=5, img_size=128).eval()
    visionzoo.load_checkpoint(big, small.state_dict())
    assert big.pos_embed1.shape == (1, 32 * 32, 16) and big.pos_embed4.shape == (1, 1 + 4 * 4, 64)
    torch.testing.assert_close(big.pos_embed4[:, :1], small.pos_embed4[:, :1])  # the class token's row is kept
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(big(x), small(x), atol=1e-5, rtol=0)


def test_official_key_layout():
    keys = set(_model(64).state_dict())
    for k in ("patch_embed1.proj.weight", "patch_embed4.norm.bias", "pos_embed3", "cls_token", "block2.0.attn.q.weight",
              "block1.0.attn.sr.weight", "block1.0.attn.norm.weight", "block4.0.mlp.fc2.bias", "norm.weight",
              "head.weight"):
        assert k in keys, k
    assert not any(k.startswith("block4.0.attn.sr") for k in keys)  # sr_ratio 1 in the last stage


def test_last_stage_needs_sr_ratio_one():
    with pytest.raises(ValueError, match="sr_ratio must be 1"):
        visionzoo.create_model("pvt_test", sr_ratios=(8, 4, 2, 2))
