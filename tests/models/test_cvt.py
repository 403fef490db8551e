"""CvT specifics: the attention against a direct transcription of the official one (whole-width scale, class token
outside the conv projections), BatchNorm folding, three stages, stochastic depth in the last stage only, the official
keys."""
from __future__ import annotations

import torch

import visionzoo
from visionzoo.layers import DropPath
from visionzoo.models.cvt import CvTAttention

torch.set_num_threads(1)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_((1.0 if n.endswith("weight") and p.ndim == 1 else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


def _reference(attn: CvTAttention, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The official computation: conv+BN on the map, class token concatenated after, softmax(q k^T / sqrt(dim)) v."""
    B, N, C = x.shape
    cls, t = x[:, :1], x[:, 1:]
    fmap = t.transpose(1, 2).reshape(B, C, H, W)
    qkv = []
    for conv, linear in ((attn.conv_proj_q, attn.proj_q), (attn.conv_proj_k, attn.proj_k),
                         (attn.conv_proj_v, attn.proj_v)):
        y = conv.bn(conv.conv(fmap)).flatten(2).transpose(1, 2)
        y = linear(torch.cat([cls, y], dim=1))
        qkv.append(y.reshape(B, y.shape[1], attn.num_heads, -1).transpose(1, 2))
    q, k, v = qkv
    weights = (torch.einsum("bhlk,bhtk->bhlt", q, k) * C ** -0.5).softmax(-1)
    out = torch.einsum("bhlt,bhtv->bhlv", weights, v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(out)


def test_attention_matches_official_formula():
    torch.manual_seed(0)
    attn = CvTAttention(16, 4, num_prefix_tokens=1).eval()
    _randomize(attn)
    x = torch.randn(2, 1 + 6 * 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, (6, 5)), _reference(attn, x, 6, 5), atol=1e-5, rtol=0)


def test_fuse_folds_every_projection_bn_into_its_conv():
    torch.manual_seed(0)
    model = visionzoo.create_model("cvt_test", num_classes=5).eval()
    _randomize(model)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        ref = model(x)
        model.fuse()
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
    proj = model.stages[2].blocks[0].attn.conv_proj_k
    assert isinstance(proj.bn, torch.nn.Identity) and proj.conv.bias is not None and proj.conv.stride == (2, 2)


def test_three_stages_and_class_token_in_the_last():
    model = visionzoo.create_model("cvt_test", num_classes=5, features_only=True)
    assert model.feature_info.reduction() == [4, 8, 16]
    assert model.stages[0].cls_token is None and model.stages[1].cls_token is None
    assert model.stages[2].cls_token.shape == (1, 1, 64)


def test_drop_path_only_in_the_last_stage():
    model = visionzoo.create_model("cvt_test", depths=(1, 1, 3), drop_path_rate=0.2)
    rates = [[b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in s.blocks]
             for s in model.stages]
    assert rates[:2] == [[0.0], [0.0]]
    assert rates[2] == [0.0, 0.1, 0.2]


def test_official_keys_are_remapped():
    model = visionzoo.create_model("cvt_test", num_classes=5)
    ours = model.state_dict()
    official = {k.replace("stages.", "stage", 1).replace("head.fc.", "head.", 1): v for k, v in ours.items()}
    assert {"stage0.patch_embed.proj.weight", "stage2.cls_token", "head.weight"} <= set(official)
    assert list(model.remap(official)) == list(ours)
    assert list(model.remap(ours)) == list(ours)  # ours pass unchanged
