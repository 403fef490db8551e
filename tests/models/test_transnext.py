"""TransNeXt specifics: size-dependent tables (vs direct computation), per-size cache, the official flat layout
(remap), the recorded maps of aggregated attention."""
from __future__ import annotations

import math
import re

import pytest
import torch

import visionzoo
import visionzoo.explain
from visionzoo.models.transnext import TransNeXt, local_window_tables, relative_position_cpb

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
    for stage in model.stages:
        stage._tables.clear()
    assert not any("relative" in k and "bias_local" not in k for k in model.state_dict())
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 10)
    sizes = [{(H, W) for H, W, *_ in stage._tables} for stage in model.stages]
    assert sizes == [{(16, 24)}, {(8, 12)}, {(4, 6)}, {(2, 3)}]
    t = model.stages[0]._tables[(16, 24, torch.device("cpu"), torch.float32)]
    # stage 0 pools 16x24 to 2x3 keys; a corner query sees 4 window neighbours + 6 pooled tokens
    assert t.local_valid.shape == (4 * 6, 4 * 4, 6 * 6) and t.index.shape == (16 * 24 * 6,)
    assert t.local_valid[0].sum(-1)[0].item() == 4 and t.local_valid.sum().item() == 9 * 16 * 24 - 2 * 3 * (16 + 24) + 4
    assert math.isclose(t.seq_scale[0, 0].item(), math.log(4 + 6), rel_tol=1e-6)
    full = model.stages[3]._tables[(2, 3, torch.device("cpu"), torch.float32)]
    assert full.local_valid is None and math.isclose(full.seq_scale.item(), math.log(6), rel_tol=1e-6)
    with torch.no_grad():
        model.to(torch.float64)(torch.randn(1, 3, 64, 96, dtype=torch.float64))
    assert model.stages[0]._tables[(16, 24, torch.device("cpu"), torch.float64)].coords.dtype == torch.float64


def test_official_flat_layout_remap(tiny_model):
    """Official keys (also those of pre-seams visionzoo checkpoints) -> stages.i; ours pass unchanged."""
    state = tiny_model("transnext_test").state_dict()
    official = {}
    for k, v in state.items():  # ours -> the official layout, written independently of remap
        k = re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"block{int(m[1]) + 1}.", k)
        k = re.sub(r"^stages\.(\d)\.(patch_embed|norm)\.", lambda m: f"{m[2]}{int(m[1]) + 1}.", k)
        official[k.replace("head.fc.", "head.")] = v
    assert {"block1.0.attn.learnable_tokens", "block4.0.attn.qkv.weight", "patch_embed1.proj.weight",
            "norm4.weight", "head.weight"} <= set(official)
    back = TransNeXt.remap(official)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert TransNeXt.remap(state).keys() == state.keys()


def test_aggregated_attention_recorded_per_tile(tiny_model):
    """Aggregated attention runs on tiles of queries: probabilities (B * nT, h, t*t, K + P) with grid (t, t), the K halo
    keys first; each query's mass on the halo sits on its own window neighbours inside the map."""
    model = tiny_model("transnext_test")
    with torch.no_grad(), visionzoo.explain.record_attention(model) as rec:
        model(torch.randn(2, 3, 64, 96))
    first = next(m for m in rec.maps if m.name == "stages.0.blocks.0.attn.core")
    t, side, P = 4, 4 + 2, 2 * 3  # stage 0: 16x24 map, 4x4 tiles, 6x6 halos, 2x3 pooled tokens
    assert first.probs.shape == (2 * 4 * 6, 1, t * t, side * side + P) and first.grid == (t, t)
    halo = first.probs[..., :side * side].reshape(2, 4, 6, t, t, side, side)  # (B, nh, nw, qy, qx, ky, kx)
    qy, qx, ky, kx = torch.meshgrid(*(torch.arange(n) for n in (t, t, side, side)), indexing="ij")
    near = ((ky - qy) >= 0) & ((ky - qy) < 3) & ((kx - qx) >= 0) & ((kx - qx) < 3)
    assert halo[..., ~near].eq(0).all() and halo[..., near].gt(0).any()
    assert halo[:, 0, 0, 0, 0, 0, :].eq(0).all()  # the top halo row of the top-left tile lies outside the map
    last = next(m for m in rec.maps if m.name == "stages.3.blocks.0.attn.core")
    assert last.probs.shape == (2, 4, 2 * 3, 2 * 3) and last.grid == (2, 3)


def test_tables_made_in_inference_mode_serve_training(tiny_model):
    model = tiny_model("transnext_test")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model(x)
    model.train()
    model(x).sum().backward()


def test_no_weight_decay_follows_official_keywords(tiny_model):
    nwd = tiny_model("transnext_test").no_weight_decay()
    assert "stages.0.blocks.0.attn.cpb_fc1.weight" in nwd and "stages.3.blocks.0.attn.temperature" in nwd
    assert "stages.0.blocks.0.attn.relative_pos_bias_local" in nwd and "stages.0.blocks.0.attn.query_embedding" in nwd
    assert "stages.0.blocks.0.attn.q.weight" not in nwd


def test_pretrain_size_must_leave_two_positions_per_stage():
    with pytest.raises(ValueError, match="pretrain_size"):
        visionzoo.create_model("transnext_test", pretrain_size=32)
