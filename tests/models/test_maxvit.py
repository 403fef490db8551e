"""MaxViT-specific checks: the TF-style relative position bias, block / grid attention on padded maps against a dense
reference, TF "SAME" padding, inputs that are not multiples of the window, and loading tables of another window."""
from __future__ import annotations

import pytest
import torch

import visionzoo
from visionzoo.models.maxvit import MaxViTPartitionAttention, MaxViTRelPosBias, pad_same

torch.set_num_threads(1)


class Features(torch.nn.Module):
    """``model.forward_features`` as a module, for torch.fx (the head is the generic tests' business)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

WINDOW3 = dict(window_size=3, grid_size=3)  # maxvit_test at 64 px has maps 16, 8, 4, 2: every stage is padded


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_((1.0 if n.endswith("weight") and p.ndim == 1 else 0.0) + 0.3 * torch.randn(p.shape, generator=g))


def test_rel_pos_bias_is_indexed_by_key_minus_query():
    rel = MaxViTRelPosBias((2, 3), num_heads=2)
    _randomize(rel)
    bias = rel()
    assert bias.shape == (1, 2, 6, 6)
    table = rel.relative_position_bias_table
    for q in range(6):
        for k in range(6):
            dh, dw = k // 3 - q // 3, k % 3 - q % 3
            torch.testing.assert_close(bias[0, :, q, k], table[:, dh + 1, dw + 2])


def _dense_attend(block: MaxViTPartitionAttention, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Full attention over the real tokens: pairs of different windows (grid groups) masked, bias by offset."""
    B, H, W, C = x.shape
    p = block.size[0]
    Hp, Wp = -(-H // p) * p, -(-W // p) * p
    hh, ww = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    hh, ww = hh.flatten(), ww.flatten()
    if kind == "block":
        group, pos = hh // p * 1000 + ww // p, (hh % p, ww % p)
    else:
        sh, sw = Hp // p, Wp // p
        group, pos = hh % sh * 1000 + ww % sw, (hh // sh, ww // sw)
    attn = block.attn
    table = attn.rel_pos.relative_position_bias_table
    bias = table[:, pos[0][None, :] - pos[0][:, None] + p - 1, pos[1][None, :] - pos[1][:, None] + p - 1]
    q, k, v = attn.qkv(x.reshape(B, H * W, C)).reshape(B, H * W, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * attn.scale + bias
    logits = logits.masked_fill(group[:, None] != group[None, :], float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, H * W, C)
    return attn.proj(out).reshape(B, H, W, C)


@pytest.mark.parametrize("kind", ["block", "grid"])
@pytest.mark.parametrize("size", [(6, 9), (5, 7), (2, 4)])
def test_partition_attention_equals_dense_reference(kind, size):
    torch.manual_seed(0)
    block = MaxViTPartitionAttention(16, kind, (3, 3), dim_head=8).eval()
    _randomize(block)
    x = torch.randn(2, *size, 16)
    with torch.no_grad():
        torch.testing.assert_close(block.attend(x), _dense_attend(block, x, kind), atol=1e-5, rtol=0)


def test_pad_same_is_tensorflow_same():
    x = torch.ones(1, 1, 4, 6)
    y = pad_same(x, 3, 2)  # even sides: the one pad pixel goes to the bottom / right
    assert y.shape == (1, 1, 5, 7) and y[..., :4, :6].all() and not y[..., 4, :].any() and not y[..., :, 6].any()
    assert pad_same(torch.ones(1, 1, 5, 5), 3, 2).shape == (1, 1, 7, 7)  # odd: one on each side
    assert pad_same(x, 1, 1) is x


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (32, 32)])
def test_inputs_that_are_not_window_multiples(size):
    torch.manual_seed(0)
    model = visionzoo.create_model("maxvit_test", num_classes=10, **WINDOW3).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    for f, info in zip(feats, model.feature_info, strict=True):
        assert f.shape == (2, info.channels, size[0] // info.reduction, size[1] // info.reduction)


def test_padded_model_trains_and_runs_on_meta():
    model = visionzoo.create_model("maxvit_test", num_classes=10, **WINDOW3)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.stages[0].blocks[0].attn_grid.attn.rel_pos.relative_position_bias_table.grad is not None
    with torch.device("meta"):  # the key masks are built on the input's device (profile() counts on meta)
        meta = visionzoo.create_model("maxvit_test", num_classes=10, **WINDOW3).eval()
        assert meta(torch.randn(1, 3, 96, 64)).shape == (1, 10)


def test_padded_model_traces_with_fx_at_any_size():
    torch.manual_seed(0)
    model = visionzoo.create_model("maxvit_test", num_classes=10, **WINDOW3).eval()
    gm = torch.fx.symbolic_trace(Features(model))  # padding and key masks are leaf calls, run on the real sizes
    for size in [(64, 64), (96, 64)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model.forward_features(x), atol=1e-5, rtol=1e-5)


def test_checkpoint_of_another_window_is_resampled(tmp_path):
    torch.manual_seed(0)
    small = visionzoo.create_model("maxvit_test", num_classes=10)  # 64 px: window 2, 3x3 tables
    path = visionzoo.save(small, tmp_path / "w2.safetensors")
    big = visionzoo.create_model("maxvit_test", num_classes=10, img_size=96, checkpoint_path=str(path))  # window 3
    key = "stages.1.blocks.0.attn_block.attn.rel_pos.relative_position_bias_table"
    old, new = small.state_dict()[key], big.state_dict()[key]
    assert old.shape[-2:] == (3, 3) and new.shape[-2:] == (5, 5)
    torch.testing.assert_close(new[:, ::2, ::2], old)  # align_corners: the old offsets land on every other entry
    assert torch.equal(big.state_dict()["stem.conv1.weight"], small.state_dict()["stem.conv1.weight"])


def test_no_weight_decay_is_the_bias_tables():
    model = visionzoo.create_model("maxvit_test")
    nwd = model.no_weight_decay()
    assert len(nwd) == 2 * 4 and all(n.endswith("relative_position_bias_table") for n in nwd)
