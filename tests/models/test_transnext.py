"""TransNeXt specifics: size-dependent tables (vs direct computation), per-size cache, official keys."""
from __future__ import annotations

import math

import pytest
import torch

import visionzoo
from visionzoo.models.transnext import local_window_tables, relative_position_cpb

torch.set_num_threads(1)


def test_relative_coordinates_match_direct_computation():
    (qh, qw), sr, pre = (4, 6), 2, (5, 5)
    index, coords = relative_position_cpb((qh, qw), (qh // sr, qw // sr), pre)
    assert index.shape == (qh * qw * (qh // sr) * (qw // sr),)
    want = []
    for q in range(qh * qw):
        for k in range((qh // sr) * (qw // sr)):
            qy, qx = divmod(q, qw)
            ky, kx = divmod(k, qw // sr)
            # a pooled key sits at the centre of its sr x sr cell
            dy = (qy - (ky * sr + (sr - 1) / 2)) / (pre[0] - 1) * 8
            dx = (qx - (kx * sr + (sr - 1) / 2)) / (pre[1] - 1) * 8
            want.append([math.copysign(math.log2(abs(v) + 1) / 3, v) for v in (dy, dx)])
    assert torch.allclose(coords[index], torch.tensor(want), atol=1e-6, rtol=0)
    assert len(coords) == len({tuple(r) for r in coords.tolist()})  # one row per distinct offset


def test_local_window_tables_count_neighbours_inside_the_map():
    H, W, win = 3, 4, 3
    count, mask = local_window_tables((H, W), win)
    for y in range(H):
        for x in range(W):
            inside = [0 <= y + dy < H and 0 <= x + dx < W for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            assert mask[y * W + x].tolist() == [not v for v in inside]
            assert count[y * W + x].item() == sum(inside)


def test_tables_are_per_size_and_not_state(tiny_model):
    model = tiny_model("transnext_test")
    model._tables.clear()
    assert not any("relative" in k and "bias_local" not in k for k in model.state_dict())
    assert {"block1.0.attn.learnable_tokens", "block4.0.attn.qkv.weight", "patch_embed1.proj.weight",
            "norm4.weight", "head.weight"} <= set(model.state_dict())
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 10)
    sizes = {(i, H, W) for i, H, W, *_ in model._tables}
    assert sizes == {(0, 16, 24), (1, 8, 12), (2, 4, 6), (3, 2, 3)}
    t = model._tables[(0, 16, 24, torch.device("cpu"), torch.float32)]
    # stage 0 pools 16x24 to 2x3 keys; a corner query sees 4 window neighbours + 6 pooled tokens
    assert t.padding_mask.shape == (16 * 24, 9) and t.index.shape == (16 * 24 * 6,)
    assert math.isclose(t.seq_scale[0, 0].item(), math.log(4 + 6), rel_tol=1e-6)
    full = model._tables[(3, 2, 3, torch.device("cpu"), torch.float32)]
    assert full.padding_mask is None and math.isclose(full.seq_scale.item(), math.log(6), rel_tol=1e-6)


def test_tables_made_in_inference_mode_serve_training(tiny_model):
    model = tiny_model("transnext_test")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model(x)
    model.train()
    model(x).sum().backward()


def test_no_weight_decay_follows_official_keywords(tiny_model):
    nwd = tiny_model("transnext_test").no_weight_decay()
    assert "block1.0.attn.cpb_fc1.weight" in nwd and "block4.0.attn.temperature" in nwd
    assert "block1.0.attn.relative_pos_bias_local" in nwd and "block1.0.attn.query_embedding" in nwd
    assert "block1.0.attn.q.weight" not in nwd


def test_pretrain_size_must_leave_two_positions_per_stage():
    with pytest.raises(ValueError, match="pretrain_size"):
        visionzoo.create_model("transnext_test", pretrain_size=32)
