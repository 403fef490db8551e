"""DeepMAD-specific checks: the official key layout and shortcut rules, and the official stage split."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from visionzoo import create_model

torch.set_num_threads(1)


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def test_official_key_layout_and_forced_projection_r18():
    model = _meta("deepmad_r18")
    keys = set(model.state_dict())
    assert len(model.block_list) == 6  # stem + 5 super-blocks, no final 1x1 conv
    assert {"block_list.0.conv1.weight", "block_list.0.bn1.running_var", "fc_linear.weight",
            "block_list.5.block_list.11.conv3.bn1.num_batches_tracked"} <= keys
    # the first block of every ResK1KXK1 super-block has a projection, even at 384 -> 384 (force_resproj)
    assert "block_list.3.block_list.0.residual_proj.conv1.weight" in keys
    assert not any(k.startswith("block_list.3.block_list.1.residual_proj") for k in keys)
    assert model.block_list[2].block_list[0].conv2.conv1.kernel_size == (5, 5)


def test_inverted_bottleneck_shortcut_and_se_width_29m():
    model = _meta("deepmad_29m")
    first, widen = model.block_list[1].block_list[0], model.block_list[2].block_list[0]
    assert first.has_shortcut and isinstance(first.residual_proj, nn.Identity)  # 40 -> 40, stride 1
    assert not widen.has_shortcut and not hasattr(widen, "residual_proj")  # 40 -> 85: no shortcut at all
    assert first.se2.conv1.conv1.weight.shape == (56, 240, 1, 1)  # round(240 / 4) // 8 * 8
    assert first.conv2.conv1.groups == 240
    assert model.block_list[-1].conv1.weight.shape == (1792, 312, 1, 1)


@pytest.mark.parametrize("name, modules", [("deepmad_r50", [1, 2, 4, 5]), ("deepmad_29m", [2, 3, 4, 6]),
                                           ("deepmad_29m_288", [1, 2, 4, 6]), ("deepmad_89m", [1, 2, 3, 6])])
def test_stages_follow_the_official_stage_idx(name, modules):
    model = _meta(name)
    assert [f.module for f in model.feature_info] == [f"block_list.{i}" for i in modules]
    assert [f.reduction for f in model.feature_info] == [4, 8, 16, 32]


def test_features_match_official_stage_outputs():
    torch.manual_seed(0)
    model = create_model("deepmad_test", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    outs, y = [], x
    with torch.no_grad():
        for i, blk in enumerate(model.block_list):
            y = blk(y)
            if f"block_list.{i}" in model.feature_info.module_name():
                outs.append(y)
        feats = model.forward_intermediates(x)
    assert len(feats) == len(outs) == 4
    for a, b in zip(feats, outs):
        torch.testing.assert_close(a, b)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="block must be"):
        create_model("deepmad_test", block="k1kx")
    with pytest.raises(ValueError, match="one entry per"):
        create_model("deepmad_test", depths=(1, 1))
    with pytest.raises(ValueError, match="stride"):
        create_model("deepmad_test", strides=(1, 2, 3, 2, 2))
