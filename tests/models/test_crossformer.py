"""CrossFormer specifics: padded SDA/LDA against the official detection backbone, DPB offsets, intervals, remap."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import visionzoo
from visionzoo.models.crossformer import CrossFormer, group_map, relative_offsets

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent.parent / "fixtures"
# the configuration of scripts/make_fixture_crossformer.py (three stages, group size 7 everywhere)
DET = dict(img_size=64, embed_dim=16, depths=(2, 2, 1), num_heads=(1, 2, 4), mlp_ratio=1.0, group_size=(7, 7, 7),
           merge_size=((2, 4), (2,)))


def test_padded_groups_match_official_detection_backbone():
    """96x64 input: every stage pads (SDA to multiples of 7, LDA to multiples of its interval, 6x4 -> 8x4)."""
    model = visionzoo.create_model("crossformer_test", num_classes=10, **DET).eval()
    official = load_file(str(FIXTURES / "crossformer_det_padded.safetensors"))
    missing, unexpected = model.load_state_dict(CrossFormer.remap(official), strict=False)
    assert not unexpected and set(missing) == {"norm.weight", "norm.bias", "head.fc.weight", "head.fc.bias"}
    io = load_file(str(FIXTURES / "crossformer_det_padded.io.safetensors"))
    with torch.no_grad():
        feats = model.forward_intermediates(io["input"])
    for i, f in enumerate(feats):
        torch.testing.assert_close(f, io[f"stage{i}"], atol=5e-5, rtol=1e-5)


def test_intervals_follow_img_size():
    with torch.device("meta"):
        at224 = visionzoo.create_model("crossformer_tiny")
        at256 = visionzoo.create_model("crossformer_tiny", img_size=256)
    assert [stage.blocks[0].interval for stage in at224.stages] == [8, 4, 2, 1]  # v1's H / G at 224
    assert [stage.blocks[0].interval for stage in at256.stages] == [10, 5, 3, 2]  # ceil(H / G)
    assert sum(p.numel() for p in at256.parameters()) == sum(p.numel() for p in at224.parameters())


def test_relative_offsets_index():
    offsets, index = relative_offsets(3, 5)
    assert offsets.shape == (5 * 9, 2) and index.shape == (15, 15)
    coords = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij"), -1).view(-1, 2)
    torch.testing.assert_close(offsets[index], (coords[:, None] - coords[None, :]).float())


def test_lda_groups_gather_residues():
    x = torch.arange(12 * 8).view(1, 12, 8, 1)
    groups = group_map(x, lda=True, size=4)  # (1, 4, 4, 3, 2, 1)
    assert groups.shape == (1, 4, 4, 3, 2, 1)
    rows, cols = groups[0, 1, 3, :, :, 0] // 8, groups[0, 1, 3, :, :, 0] % 8
    assert (rows % 4 == 1).all() and (cols % 4 == 3).all()
    tiles = group_map(x, lda=False, size=4)  # (1, 3, 2, 4, 4, 1)
    assert tiles[0, 2, 1, 0, 0, 0] == 8 * 8 + 4


def test_remap_official_layout(tiny_model):
    """Official keys: the merge at the end of layers.i moves to the start of stages.i+1, head -> head.fc, the DPB
    tables are dropped; our own keys pass unchanged."""
    state = tiny_model("crossformer_test").state_dict()
    official = {}
    for k, v in state.items():  # ours -> the official layout, written independently of remap
        k = re.sub(r"^stages\.(\d)\.downsample\.", lambda m: f"layers.{int(m[1]) - 1}.downsample.", k)
        official[re.sub(r"^stages\.", "layers.", k).replace("head.fc.", "head.")] = v
    assert {"layers.0.downsample.norm.weight", "layers.3.blocks.0.attn.qkv.weight", "head.weight"} <= set(official)
    assert not any(k.startswith("layers.3.downsample") for k in official)
    for table in ("biases", "relative_position_index"):
        official[f"layers.0.blocks.0.attn.{table}"] = torch.zeros(1)
    back = CrossFormer.remap(official)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert CrossFormer.remap(state).keys() == state.keys()


def test_bad_config_raises():
    with pytest.raises(ValueError, match="one entry per stage"):
        visionzoo.create_model("crossformer_test", group_size=(7, 7))
    with pytest.raises(ValueError, match="even"):
        visionzoo.create_model("crossformer_test", patch_size=(4, 7))
