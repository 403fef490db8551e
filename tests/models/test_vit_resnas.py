"""ViT-ResNAS-specific checks: the residual spatial reduction (against its definition), the searched per-block
widths, the flat official layout remap, the patch-token head, position tables at another input size."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from visionzoo import create_model, get_variant
from visionzoo.models.vit_resnas import ViTResNAS, ViTResNASReduction

torch.set_num_threads(1)


def test_reduction_matches_its_definition():
    torch.manual_seed(0)
    r = ViTResNASReduction(4, 6, (2, 2)).eval()
    with torch.no_grad():
        for p in r.parameters():
            p.normal_()
    fmap, cls = torch.randn(2, 4, 4, 4), torch.randn(2, 1, 4)
    y, c = r(fmap, cls)
    tokens = torch.cat([cls, fmap.flatten(2).transpose(1, 2)], 1)
    normed = F.layer_norm(tokens, (4,), r.norm.weight, r.norm.bias, 1e-6)
    nmap = normed[:, 1:].transpose(1, 2).reshape(2, 4, 4, 4)
    conv = F.conv2d(nmap, r.patch_reduce.weight, r.patch_reduce.bias, stride=2, padding=1)
    pos = r.pos_embed.transpose(1, 2).reshape(1, 6, 2, 2)
    pooled = F.avg_pool2d(fmap, 2)
    expect = conv + pos + torch.cat([pooled, torch.zeros(2, 2, 2, 2)], 1)  # residual zero-padded to 6 channels
    torch.testing.assert_close(y, expect)
    expect_cls = F.linear(normed[:, :1], r.token_transform.weight, r.token_transform.bias) + F.pad(cls, (0, 2))
    torch.testing.assert_close(c, expect_cls)


def test_searched_widths():
    with torch.device("meta"):
        model = create_model("vit_resnas_tiny")
    blocks = [b for s in model.stages for b in s.blocks]
    assert len(blocks) == 16 and [s.downsample is None for s in model.stages] == [True, False, False]
    assert [(b.attn.num_heads, b.attn.head_dim, b.mlp.fc1.out_features) for b in model.stages[1].blocks][:2] == [
        (10, 48, 1408), (8, 48, 1408)]
    assert model.stages[2].blocks[0].attn.qkv.out_features == 3 * 10 * 64
    assert get_variant("vit_resnas_tiny").args == {}  # the defaults are the tiny network


def test_remap_flat_official_layout():
    official = {"tokens": 0, "pos_embed": 1, "blocks.0.attn.qkv.weight": 2, "blocks.1.patch_reduce.weight": 3,
                "blocks.1.pos_embed": 4, "blocks.2.mlp.fc1.weight": 5, "blocks.3.norm1.weight": 6,
                "blocks.4.token_transform.weight": 7, "blocks.5.norm2.bias": 8, "norm.weight": 9,
                "cls_head.weight": 10, "patch_head.bias": 11, "patch_embed.conv1.bn.running_mean": 12}
    assert ViTResNAS.remap(official) == {
        "cls_token": 0, "pos_embed": 1, "stages.0.blocks.0.attn.qkv.weight": 2,
        "stages.1.downsample.patch_reduce.weight": 3, "stages.1.downsample.pos_embed": 4,
        "stages.1.blocks.0.mlp.fc1.weight": 5, "stages.1.blocks.1.norm1.weight": 6,
        "stages.2.downsample.token_transform.weight": 7, "stages.2.blocks.0.norm2.bias": 8, "head.norm.weight": 9,
        "head.fc.weight": 10, "head.patch_fc.bias": 11, "patch_embed.conv1.bn.running_mean": 12}
    ours = create_model("vit_resnas_test", num_classes=10).state_dict()
    assert ViTResNAS.remap(ours).keys() == ours.keys()


def test_patch_head_and_other_sizes():
    torch.manual_seed(0)
    model = create_model("vit_resnas_test", num_classes=10, patch_output=True)
    assert model.classifier == ("head.fc", "head.patch_fc")
    x = torch.randn(2, 3, 112, 168)  # built for 112: the position tables are resampled
    model.train()
    assert model(x).shape == (2, 10)  # the class token only, unless patch_training is set
    model.head.patch_training = True
    logits, patch = model(x)
    assert logits.shape == (2, 10) and patch.shape == (2, 2 * 3, 10)  # 112x168 -> a 2x3 map in stage 3
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model(x), model.head.fc(model.head.norm(feats[:, 0])))
