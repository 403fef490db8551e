"""RMT specifics: Manhattan decay masks vs a direct computation, per-size tables (eager cache, FX), the official layout
translated by remap, fuse of the projection."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import visionzoo
from visionzoo.models.rmt import RMT, decay_1d, manhattan_decay

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

torch.set_num_threads(1)


class Features(torch.nn.Module):
    """``model.forward_features`` as a module, for torch.fx (the head is the generic tests' business)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def test_manhattan_decay_matches_direct_computation():
    H, W = 2, 3
    decay = torch.tensor([-0.5, -0.25])
    mask = manhattan_decay(H, W, decay)
    assert mask.shape == (2, H * W, H * W)
    for h in range(2):
        for i in range(H * W):
            for j in range(H * W):
                (yi, xi), (yj, xj) = divmod(i, W), divmod(j, W)
                assert mask[h, i, j].item() == decay[h].item() * (abs(yi - yj) + abs(xi - xj))
    line = decay_1d(4, decay)
    assert line.shape == (2, 4, 4)
    assert line[1, 0, 3].item() == -0.75 and line[0, 2, 1].item() == -0.5 and line[0, 1, 1].item() == 0.0


def test_decay_per_head_follows_gamma_schedule(tiny_model):
    relpos = tiny_model("rmt_test").stages[3].relpos
    heads, init, rng = 8, 2.0, 6.0  # rmt_test stage 3: 8 heads, init_value 2, heads_range 6
    want = torch.tensor([torch.log(torch.tensor(1 - 2 ** (-init - rng * h / heads))).item() for h in range(heads)])
    assert torch.allclose(relpos.decay, want)
    assert relpos.angle.shape == (16,) and torch.equal(relpos.angle[0::2], relpos.angle[1::2])


def test_tables_per_size_decomposed_and_whole(tiny_model):
    model = tiny_model("rmt_test")
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 96, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 24, 16), (32, 12, 8), (64, 6, 4), (128, 3, 2)]
    early = model.stages[0].relpos(torch.zeros(1, 24, 16, 16))
    assert early.sin.shape == (24, 16, 16) and [m.shape for m in early.masks] == [(1, 24, 24), (1, 16, 16)]
    late = model.stages[2].relpos(torch.zeros(1, 6, 4, 64))
    assert [m.shape for m in late.masks] == [(4, 24, 24)]
    assert model.stages[2].relpos(torch.zeros(2, 6, 4, 64)) is late  # cached per size
    wide = model.stages[2].relpos(torch.zeros(1, 6, 4, 64, dtype=torch.float64))
    assert wide.masks[0].dtype == torch.float64 and torch.equal(wide.masks[0].float(), late.masks[0])


def test_fx_graph_builds_tables_for_each_input_size(tiny_model):
    model = tiny_model("rmt_test")
    gm = torch.fx.symbolic_trace(Features(model))  # the tables are one leaf call per stage, run on the real sizes
    x = torch.randn(1, 3, 96, 64)  # the generic export test runs 64 x 64
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model.forward_features(x), atol=1e-5, rtol=1e-5)


def test_official_layout_translates_to_stages():
    official = load_file(str(FIXTURES / "rmt_official.safetensors"))
    for k in ("layers.0.Relpos.decay", "layers.0.downsample.reduction.weight", "layers.2.blocks.0.gamma_1",
              "proj.weight", "head.weight"):
        assert k in official, k
    ours = RMT.remap(official)
    assert RMT.remap(ours).keys() == ours.keys()  # idempotent
    assert ours["stages.1.downsample.reduction.weight"] is official["layers.0.downsample.reduction.weight"]
    assert ours["stages.0.relpos.decay"] is official["layers.0.Relpos.decay"]
    assert ours["proj.weight"].shape == (*official["proj.weight"].shape, 1, 1)
    assert "head.fc.weight" in ours and not any(k.startswith("layers.") for k in ours)
    model = visionzoo.create_model("rmt_test", num_classes=10, dims=(8, 16, 24, 32), depths=(2, 1, 1, 1),
                                   num_heads=(1, 2, 3, 4), heads_ranges=(1, 2, 3, 4), projection=64)
    assert ours.keys() == model.state_dict().keys()
    assert "stages.0.downsample.reduction.weight" not in ours and "stages.0.blocks.0.gamma_1" not in ours


def test_loading_new_constants_rebuilds_tables(tiny_model):
    model = tiny_model("rmt_test")
    relpos = model.stages[0].relpos
    x = torch.zeros(1, 4, 4, 16)
    before = relpos(x)
    sd = model.state_dict()
    sd["stages.0.relpos.decay"] = sd["stages.0.relpos.decay"] * 2
    model.load_state_dict(sd)
    after = relpos(x)
    assert torch.allclose(after.masks[0], before.masks[0] * 2)


def test_fuse_folds_projection_batchnorm():
    model = visionzoo.create_model("rmt_test", num_classes=5).eval()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
        model.norm.weight.uniform_(0.5, 2)
        x = torch.randn(2, 3, 64, 64)
        ref = model(x)
        model.fuse()
        assert isinstance(model.norm, torch.nn.Identity)
        assert torch.allclose(model(x), ref, atol=1e-5, rtol=0)
