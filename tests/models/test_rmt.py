"""RMT specifics: Manhattan decay masks vs a direct computation, per-size tables, official layout, fuse of the head."""
from __future__ import annotations

import torch

import visionzoo
from visionzoo.models.rmt import decay_1d, manhattan_decay

torch.set_num_threads(1)


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
    relpos = tiny_model("rmt_test").layers[3].Relpos
    heads, init, rng = 8, 2.0, 6.0  # rmt_test stage 3: 8 heads, init_value 2, heads_range 6
    want = torch.tensor([torch.log(torch.tensor(1 - 2 ** (-init - rng * h / heads))).item() for h in range(heads)])
    assert torch.allclose(relpos.decay, want)
    assert relpos.angle.shape == (16,) and torch.equal(relpos.angle[0::2], relpos.angle[1::2])


def test_tables_per_size_decomposed_and_whole(tiny_model):
    model = tiny_model("rmt_test")
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 96, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 24, 16), (32, 12, 8), (64, 6, 4), (128, 3, 2)]
    early = model.layers[0].Relpos(24, 16, True)
    assert early.sin.shape == (24, 16, 16) and [m.shape for m in early.masks] == [(1, 24, 24), (1, 16, 16)]
    late = model.layers[2].Relpos(6, 4, False)
    assert [m.shape for m in late.masks] == [(4, 24, 24)]
    assert model.layers[2].Relpos(6, 4, False) is late  # cached per size


def test_official_layout_and_buffers(tiny_model):
    sd = tiny_model("rmt_test").state_dict()
    for k in ("patch_embed.proj.0.weight", "patch_embed.proj.10.running_var", "layers.0.Relpos.decay",
              "layers.0.Relpos.angle", "layers.0.downsample.reduction.weight", "layers.2.blocks.0.gamma_1",
              "layers.0.blocks.0.retention.lepe.conv.weight", "layers.0.blocks.0.ffn.dwconv.conv.weight",
              "proj.weight", "norm.running_mean", "head.weight"):
        assert k in sd, k
    assert "layers.3.downsample.reduction.weight" not in sd and "layers.0.blocks.0.gamma_1" not in sd


def test_loading_new_constants_rebuilds_tables(tiny_model):
    model = tiny_model("rmt_test")
    relpos = model.layers[0].Relpos
    before = relpos(4, 4, True)
    sd = model.state_dict()
    sd["layers.0.Relpos.decay"] = sd["layers.0.Relpos.decay"] * 2
    model.load_state_dict(sd)
    after = relpos(4, 4, True)
    assert torch.allclose(after.masks[0], before.masks[0] * 2)


def test_fuse_folds_head_batchnorm_into_proj():
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
