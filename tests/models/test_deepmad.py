"""DeepMAD-specific checks: shortcut rules, the official stage split, and official (flat) checkpoints placed into
stage modules by the model's own split."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from visionzoo import create_model, load_checkpoint

torch.set_num_threads(1)


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _official(model: nn.Module, i: int) -> nn.Module:
    """Official block ``block_list.{i}`` of ``model``."""
    return model.get_submodule(model.official_paths[i])


def test_key_layout_and_forced_projection_r18():
    model = _meta("deepmad_r18")  # strides 2, 2, 2, 1, 2 and no final 1x1 conv: stage 2 holds two super-blocks
    assert model.official_paths == ["stem", "stages.0.0", "stages.1.0", "stages.2.0", "stages.2.1", "stages.3.0"]
    keys = set(model.state_dict())
    assert {"stem.conv1.weight", "stem.bn1.running_var", "head.fc.weight",
            "stages.3.0.block_list.11.conv3.bn1.num_batches_tracked"} <= keys
    # the first block of every ResK1KXK1 super-block has a projection, even at 384 -> 384 (force_resproj)
    assert "stages.2.1.block_list.0.residual_proj.conv1.weight" in keys
    assert not any(k.startswith("stages.2.1.block_list.1.residual_proj") for k in keys)
    assert _official(model, 2).block_list[0].conv2.conv1.kernel_size == (5, 5)


def test_inverted_bottleneck_shortcut_and_se_width_29m():
    model = _meta("deepmad_29m")
    first, widen = _official(model, 1).block_list[0], _official(model, 2).block_list[0]
    assert first.has_shortcut and isinstance(first.residual_proj, nn.Identity)  # 40 -> 40, stride 1
    assert not widen.has_shortcut and not hasattr(widen, "residual_proj")  # 40 -> 85: no shortcut at all
    assert first.se2.conv1.conv1.weight.shape == (56, 240, 1, 1)  # round(240 / 4) // 8 * 8
    assert first.conv2.conv1.groups == 240
    assert model.stages[-1][-1].conv1.weight.shape == (1792, 312, 1, 1)  # the final 1x1 conv ends the last stage


@pytest.mark.parametrize("name, stage_idx", [("deepmad_r50", [1, 2, 4, 5]), ("deepmad_29m", [2, 3, 4, 6]),
                                             ("deepmad_29m_288", [1, 2, 4, 6]), ("deepmad_89m", [1, 2, 3, 6])])
def test_stages_end_at_the_official_stage_idx(name, stage_idx):
    model = _meta(name)
    assert [model.official_paths[i] for i in stage_idx] == [f"stages.{s}.{len(st) - 1}"
                                                            for s, st in enumerate(model.stages)]
    assert [f.module for f in model.feature_info] == [f"stages.{s}" for s in range(4)]
    assert [f.reduction for f in model.feature_info] == [4, 8, 16, 32]


def test_features_match_official_stage_outputs():
    torch.manual_seed(0)
    model = create_model("deepmad_test", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    outs, y = [], x
    with torch.no_grad():
        for i in range(len(model.official_paths)):  # the official flat forward, block by block
            y = _official(model, i)(y)
            if i in (2, 3, 4, 6):  # the official stage_idx of this structure, less its first entry
                outs.append(y)
        feats = model.forward_intermediates(x)
    assert len(feats) == len(outs) == 4
    for a, b in zip(feats, outs):
        torch.testing.assert_close(a, b)


def _to_official(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict in the official flat layout (``block_list.{i}``, ``fc_linear``)."""
    index = {path: i for i, path in enumerate(model.official_paths)}
    out = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^head\.fc\.", "fc_linear.", k)
        m = re.match(r"(stem|stages\.\d+\.\d+)\.(.*)$", k)
        out[f"block_list.{index[m[1]]}.{m[2]}" if m else k] = v
    return out


def test_official_checkpoint_loads_into_stages():
    torch.manual_seed(0)
    model = create_model("deepmad_test", num_classes=10).eval()
    official = _to_official(model)
    assert {"block_list.0.conv1.weight", "block_list.6.bn1.running_var", "fc_linear.weight"} <= official.keys()
    fresh = create_model("deepmad_test", num_classes=10).eval()
    assert load_checkpoint(fresh, official) == "official"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    backbone = create_model("deepmad_test", num_classes=0).eval()
    with pytest.warns(UserWarning, match="classes"):
        load_checkpoint(backbone, official)  # every block placed; only the classifier is left out
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_features(x), model.forward_features(x), atol=0, rtol=0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="block must be"):
        create_model("deepmad_test", block="k1kx")
    with pytest.raises(ValueError, match="one entry per"):
        create_model("deepmad_test", depths=(1, 1))
    with pytest.raises(ValueError, match="stride"):
        create_model("deepmad_test", strides=(1, 2, 3, 2, 2))
