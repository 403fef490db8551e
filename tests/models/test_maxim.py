"""MAXIM specifics: the image output seam, the block/grid token groups of its gated MLP, the multi-stage outputs, the
Flax key remap, and the tools that need class logits refusing it."""
from __future__ import annotations

import pytest
import torch

import visionzoo
import visionzoo.tokens
from visionzoo.explain import explain
from visionzoo.models.maxim import MAXIM, MaximSpatialMix

torch.set_num_threads(1)


def _model() -> MAXIM:
    torch.manual_seed(0)
    return visionzoo.create_model("maxim_test").eval()


def test_spatial_mix_groups_match_the_official_block_and_grid_layout():
    """Block: a dense layer over the tokens of each (fh, fw) window; grid: over the (gh, gw) tokens that share an
    offset inside the H/gh x W/gw cells, i.e. the official ``n (gh fh) (gw fw) c -> n (gh gw) (fh fw) c`` layout
    mixed along ``(fh fw)`` resp. ``(gh gw)``."""
    torch.manual_seed(0)
    B, H, W, C = 2, 8, 12, 3
    x = torch.randn(B, H, W, C)
    for partition, (a, b) in (("block", (2, 3)), ("grid", (4, 2))):
        mix = MaximSpatialMix(partition, (a, b))
        if partition == "block":
            fh, fw = a, b
        else:
            fh, fw = H // a, W // b
        gh, gw = H // fh, W // fw
        t = x.reshape(B, gh, fh, gw, fw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, gh * gw, fh * fw, C)
        axis = 2 if partition == "block" else 1
        mixed = torch.movedim(mix.mix(torch.movedim(t, axis, -1)), -1, axis)
        expected = mixed.reshape(B, gh, gw, fh, fw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        with torch.no_grad():
            torch.testing.assert_close(mix(x), expected)


def test_image_out_every_stage_and_scale():
    model = visionzoo.create_model("maxim_test", num_supervision_scales=2, depth=2).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        outs = model.forward_all(x)
        y = model(x)
    assert [[tuple(o.shape) for o in stage] for stage in outs] == [[(1, 3, 32, 32), (1, 3, 16, 16)]] * 2
    torch.testing.assert_close(outs[-1][0], y)
    assert model.input_multiple == 8 and visionzoo.create_model("maxim_s2_derain").input_multiple == 64
    with pytest.raises(ValueError, match="multiple of 8"):
        model(torch.rand(1, 3, 36, 36))


def test_remap_reads_flax_names_and_keeps_ours():
    model = _model()
    ours = model.state_dict()
    assert MAXIM.remap(ours).keys() == ours.keys()
    flax = {"stage_0_encoder_block_0.Conv_0.kernel": torch.randn(1, 1, 16, 8),
            "stage_0_encoder_block_0.SplitHeadMultiAxisGmlpLayer_0.GridGmlpLayer.GridGatingUnit.Dense_0.kernel":
                torch.randn(4, 4),
            "stage_1_decoder_block_1.ConvTranspose_0.kernel": torch.randn(2, 2, 16, 8),
            "stage_1_cross_gating_block_0.SplitHeadMultiAxisGating_y.Dense_1.bias": torch.randn(4),
            "stage_0_supervised_attention_module_0.Conv_1.kernel": torch.randn(3, 3, 8, 3),
            "UpSampleRatio_5.Conv_0.bias": torch.randn(8), "UpSampleRatio_6.Conv_0.bias": torch.randn(8)}
    out = MAXIM.remap(flax)
    assert out["stages.0.encoders.0.proj.weight"].shape == (8, 16)
    assert "stages.0.encoders.0.blocks.0.mab.grid.gate.mix.weight" in out
    assert out["stages.1.decoders.1.up.weight"].shape == (16, 8, 2, 2)
    assert "stages.1.skip_gates.0.gate_y.block_mix.mix.bias" in out
    assert out["stages.0.sams.0.conv_img.weight"].shape == (3, 8, 3, 3)
    # 2 * depth**2 resizers per stage (depth from the encoder blocks: 1 here): 5 -> stage 2, decoder section
    assert "stages.2.dec_resize.0.0.proj.bias" in out and "stages.3.skip_resize.0.0.proj.bias" in out


def test_tools_that_need_logits_refuse():
    model = _model()
    x = torch.rand(1, 3, 32, 32)
    for call in (lambda: model.reset_classifier(3), model.get_classifier, lambda: explain(model, x, "gradcam"),
                 lambda: model.forward_head(model.forward_features(x))):
        with pytest.raises(ValueError, match="image-to-image"):
            call()
    with pytest.raises(ValueError):
        visionzoo.tokens.apply(model, "tome", r=2)
    assert visionzoo.create_model("maxim_test", num_classes=7)(x).shape == x.shape  # num_classes is ignored
