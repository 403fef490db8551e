"""SN-Net v2 specifics: every stitch configuration runs, the configurations are the official ones, the route
changes widths and features, stitching-layer init and LoRA fuse, token reduction across anchors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import visionzoo
from visionzoo import tokens
from visionzoo.models.snnet import stitch_configs

torch.set_num_threads(1)


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return visionzoo.create_model("snnet_test", num_classes=5, **kwargs).eval()


def test_every_stitch_configuration_runs():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    outs = []
    with torch.no_grad():
        for i, cfg in enumerate(model.configs):
            model.set_stitch(i)
            feats = model.forward_intermediates(x)
            tokens_ = model.forward_features(x)
            outs.append(model(x))
            widths = [16 if a == 0 else 32 for a, (b, e) in zip(cfg["comb"], cfg["route"]) for _ in range(b, e + 1)]
            assert [f.shape[1] for f in feats] == widths == model.feature_info.channels()
            last = 16 if cfg["comb"][-1] == 0 else 32  # the route's last anchor (after its stitching layer)
            assert tokens_.shape == (2, 17, last) and model.num_features == model.head_hidden_size == last
    assert len(outs) == 15 and all(o.shape == (2, 5) for o in outs)
    assert len({round(o.sum().item(), 4) for o in outs}) == 15  # fifteen different networks
    assert model.stitch_ids == [i for i in range(15) if i != 5]  # the SL stitch after the last small block


def test_configurations_are_the_official_ones():
    ref = json.loads((Path(__file__).parent / "snnet_official_configs.json").read_text())
    ours = stitch_configs(tuple(ref["depths"]))
    assert [list(c["comb"]) for c in ours] == [c["comb"] for c in ref["configs"]]
    for c, r in zip(ours, ref["configs"]):
        if len(c["comb"]) > 1:  # the official route ends one past the last block (its loop stops there)
            assert [[b, e] for b, e in c["route"][:-1]] == r["route"][:-1]
            assert c["route"][-1][0] == r["route"][-1][0] and c["layers"] == r["layers"]
    assert len(stitch_configs((12, 24))) == 135  # SN-Netv2 DeiT3-S + DeiT3-L: 134 sampled + 1


def test_stitching_init_lora_fuse_and_errors():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    model.init_stitching(x)  # least squares from the anchors' block features
    model.set_stitch(10)
    with torch.no_grad():
        ref = model(x)
        for m in model.modules():
            if hasattr(m, "lora_A"):
                m.lora_B.normal_(std=0.5)
        ref = model(x)
        model.fuse()
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    assert all(not m.lora_B.any() for m in model.modules() if hasattr(m, "lora_B"))
    with pytest.raises(ValueError, match="stitch must be an int in 0..14"):
        model.set_stitch(15)
    with pytest.raises(ValueError, match="plain ViT with one class token"):
        visionzoo.create_model("snnet_test", anchors=("deit_test", "vit_test"), anchor_args=((), ()))
    assert model.sample_stitch() in model.stitch_ids


@pytest.mark.parametrize("stitch", [0, 1])
def test_tome_runs_on_an_anchor_route(stitch):
    """Token reduction keeps one state per anchor's block list (the token seam groups blocks by parent), so it
    applies to the anchor routes; a stitched route crosses two lists (see the family docstring)."""
    model = _model(stitch=stitch)
    h = tokens.apply(model, "tome", r=2)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    if stitch == 0:  # token_counts reads the first block list (anchor 0)
        assert min(h.token_counts()) < 17
