"""PVT v2 specifics: the official-layout remap, the two spatial reductions and inputs of other sizes."""
from __future__ import annotations

import re

import torch

import visionzoo
from visionzoo.layers.sr_attention import SpatialReductionAttention
from visionzoo.models.pvt_v2 import PyramidVisionTransformerV2

torch.set_num_threads(1)


def _to_official(state: dict) -> dict:
    """Our (timm) keys -> whai362/PVT's, written independently of ``remap``."""
    out = {}
    for k, v in state.items():
        k = k.replace("head.fc.", "head.")
        k = k.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
        k = re.sub(r"^patch_embed\.", "patch_embed1.", k)
        k = re.sub(r"^stages\.(\d)\.downsample\.", lambda m: f"patch_embed{int(m[1]) + 1}.", k)
        k = re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"block{int(m[1]) + 1}.", k)
        k = re.sub(r"^stages\.(\d)\.norm\.", lambda m: f"norm{int(m[1]) + 1}.", k)
        out[k] = v
    return out


def test_remap_round_trip_and_timm_keys_untouched():
    torch.manual_seed(0)
    model = visionzoo.create_model("pvt_v2_test", num_classes=5, linear=True)
    state = model.state_dict()
    official = _to_official(state)
    assert "block1.0.mlp.dwconv.dwconv.weight" in official and "norm4.weight" in official
    assert "patch_embed2.proj.weight" in official and "head.weight" in official
    back = PyramidVisionTransformerV2.remap(official)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert PyramidVisionTransformerV2.remap(state).keys() == state.keys()  # ours: unchanged
    timm = {k.replace("head.fc.", "head."): v for k, v in state.items()}
    assert PyramidVisionTransformerV2.remap(timm).keys() == state.keys()  # timm's head.weight -> head.fc.weight
    again = visionzoo.create_model("pvt_v2_test", num_classes=5, linear=True)
    assert visionzoo.load_checkpoint(again, official) == "official"


def test_strided_reduction_shrinks_keys_by_sr_squared():
    attn = SpatialReductionAttention(16, 2, sr_ratio=4)
    x = torch.randn(2, 12 * 8, 16)
    assert attn.reduce(x, (12, 8)).shape == (2, 3 * 2, 16)
    assert attn(x, (12, 8)).shape == x.shape


def test_linear_reduction_pools_to_seven_whatever_the_size():
    attn = SpatialReductionAttention(16, 2, sr_ratio=8, linear=True)
    assert attn.sr.kernel_size == (1, 1)
    for h, w in ((16, 16), (24, 8), (3, 2)):
        assert attn.reduce(torch.randn(1, h * w, 16), (h, w)).shape == (1, 49, 16)


def test_non_square_input():
    torch.manual_seed(0)
    model = visionzoo.create_model("pvt_v2_test", num_classes=5).eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 96, 32))
    assert [tuple(f.shape[-2:]) for f in feats] == [(24, 8), (12, 4), (6, 2), (3, 1)]
