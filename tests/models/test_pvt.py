"""PVT (v1) specifics: per-stage position tables (resampled for other input sizes and other checkpoints), the class
token of the last stage, and the official flat key layout (remap)."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import visionzoo
from visionzoo.models.pvt import PyramidVisionTransformer

torch.set_num_threads(1)


def _model(img_size: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    model = visionzoo.create_model("pvt_test", num_classes=5, img_size=img_size).eval()
    with torch.no_grad():  # non-trivial tables, so that resampling them changes the output
        for stage in model.stages:
            stage.pos_embed.normal_(std=0.5)
    return model


def test_tables_and_class_token_layout():
    model = _model(64)
    grids = [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert model.grids == grids
    for i, ((h, w), dim) in enumerate(zip(grids, (16, 32, 48, 64))):
        assert model.stages[i].pos_embed.shape == (1, h * w + (i == 3), dim)
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
    pos = model.stages[0].pos_embed.reshape(1, 16, 16, -1).permute(0, 3, 1, 2)  # (1, N, C) -> (1, C, 16, 16)
    expected = F.interpolate(pos, size=(24, 16), mode="bilinear").flatten(2).transpose(1, 2)
    seen = {}

    def grab(module, args):  # noqa: ANN001, ANN202
        seen["x"] = args[0]

    hook = model.stages[0].blocks[0].register_forward_pre_hook(grab)
    with torch.no_grad():
        embedded = model.stages[0].patch_embed(x).flatten(1, 2)  # (B, H, W, C) -> (B, N, C)
        model(x)
    hook.remove()
    torch.testing.assert_close(seen["x"], embedded + expected, atol=1e-6, rtol=0)


def test_checkpoint_of_another_img_size_is_resampled():
    """A 64 px checkpoint loaded into a 128 px model equals the 64 px model run on 128 px (resampled on the fly)."""
    small = _model(64)
    big = visionzoo.create_model("pvt_test", num_classes=5, img_size=128).eval()
    visionzoo.load_checkpoint(big, small.state_dict())
    assert big.stages[0].pos_embed.shape == (1, 32 * 32, 16) and big.stages[3].pos_embed.shape == (1, 1 + 4 * 4, 64)
    torch.testing.assert_close(big.stages[3].pos_embed[:, :1], small.stages[3].pos_embed[:, :1])  # class token row
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(big(x), small(x), atol=1e-5, rtol=0)


def test_official_flat_layout_remap():
    """Official keys (also those of pre-seams visionzoo checkpoints) -> stages.i; ours pass unchanged."""
    model = _model(64)
    state = model.state_dict()
    official = {}
    for k, v in state.items():  # ours -> the official layout, written independently of remap
        k = re.sub(r"^stages\.(\d)\.patch_embed\.", lambda m: f"patch_embed{int(m[1]) + 1}.", k)
        k = re.sub(r"^stages\.(\d)\.pos_embed$", lambda m: f"pos_embed{int(m[1]) + 1}", k)
        k = re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"block{int(m[1]) + 1}.", k)
        official[re.sub(r"^stages\.3\.cls_token$", "cls_token", k.replace("head.fc.", "head."))] = v
    for k in ("patch_embed1.proj.weight", "patch_embed4.norm.bias", "pos_embed3", "cls_token", "block2.0.attn.q.weight",
              "block1.0.attn.sr.weight", "block1.0.attn.norm.weight", "block4.0.mlp.fc2.bias", "norm.weight",
              "head.weight"):
        assert k in official, k
    assert not any(k.startswith("block4.0.attn.sr") for k in official)  # sr_ratio 1 in the last stage
    back = PyramidVisionTransformer.remap(official)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert PyramidVisionTransformer.remap(state).keys() == state.keys()
    again = visionzoo.create_model("pvt_test", num_classes=5, img_size=64)
    assert visionzoo.load_checkpoint(again, official) == "official"


def test_last_stage_needs_sr_ratio_one():
    with pytest.raises(ValueError, match="sr_ratio must be 1"):
        visionzoo.create_model("pvt_test", sr_ratios=(8, 4, 2, 2))
