"""UniFormer-specific checks: BatchNorm folding with the S+ conv embeddings, head dimensions per variant, other input
sizes (no position tables), and the official flat key layout translated to stage modules."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import visionzoo
from conftest import randomize_bn
from visionzoo.layers import FrozenBatchNorm2d
from visionzoo.models.uniformer import UniFormerCBlock

torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_cblock_norms_fold_exactly():
    torch.manual_seed(0)
    block = UniFormerCBlock(8).eval()
    randomize_bn(block)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ref = block(x)
        block.fuse()
        out = block(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in block.modules())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_fuse_with_conv_stem():
    torch.manual_seed(0)
    model = visionzoo.create_model("uniformer_test", num_classes=10, conv_stem=True).eval()
    assert model.first_conv == "stages.0.downsample.proj.0"
    randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    n_before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        ref = model(x)
        out = model.fuse()(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.norm.bn, FrozenBatchNorm2d)  # the final BN follows a residual sum: a frozen affine
    assert sum(p.numel() for p in model.parameters()) < n_before
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, heads", [("uniformer_small", (5, 8)), ("uniformer_small_plus", (10, 16)),
                                         ("uniformer_base", (5, 8))])
def test_head_dim_per_variant(name, heads):
    with torch.device("meta"):
        model = visionzoo.create_model(name)
    assert (model.stages[2].blocks[0].attn.num_heads, model.stages[3].blocks[0].attn.num_heads) == heads


@pytest.mark.parametrize("conv_stem", [False, True])
def test_other_input_sizes(conv_stem):
    torch.manual_seed(0)
    model = visionzoo.create_model("uniformer_test", num_classes=10, conv_stem=conv_stem).eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        assert model(x).shape == (1, 10)
    for f, info in zip(feats, model.feature_info, strict=True):
        assert f.shape == (1, info.channels, 96 // info.reduction, 160 // info.reduction)


@pytest.mark.parametrize("fixture, conv_stem", [("uniformer_official", False), ("uniformer_official_convstem", True)])
def test_official_keys_translate_to_ours(fixture, conv_stem):
    official = load_file(str(FIXTURES / f"{fixture}.safetensors"))
    model = visionzoo.create_model("uniformer_test", num_classes=10, dims=(8, 16, 24, 32), depths=(1, 2, 1, 1),
                                   head_dim=8, conv_stem=conv_stem)
    first = "patch_embed1.proj.0.weight" if conv_stem else "patch_embed1.proj.weight"
    assert {first, "blocks2.1.attn.weight", "norm.running_var", "head.weight"} <= official.keys()
    ours = model.remap(official)
    assert ours.keys() == model.state_dict().keys()
    assert model.remap(ours).keys() == ours.keys()  # idempotent
    assert ours["stages.1.blocks.1.attn.weight"] is official["blocks2.1.attn.weight"]
