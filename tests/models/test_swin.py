"""Swin-specific checks: the shift mask, shifted-window attention against a dense reference, input sizes other
than the built one, and official-layout checkpoints (downsample at the end of a stage, ``head``, buffers)."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import visionzoo
from visionzoo.models.swin import SwinTransformer, SwinTransformerBlock, shifted_window_mask
from visionzoo.weights import load_checkpoint

torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SHIFTED = dict(depths=(2, 2, 2, 2))  # swin_test with a shifted block in every stage that is larger than its window


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_((1.0 if n.endswith("weight") and p.ndim == 1 else 0.0) + 0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("H, W, window, shift", [(8, 8, (4, 4), (2, 2)), (12, 9, (3, 3), (1, 1)),
                                                 (6, 8, (3, 4), (1, 2)), (4, 4, (2, 2), (1, 1))])
def test_shift_mask_matches_direct_definition(H, W, window, shift):
    """Two tokens of a window of the rolled map may attend iff they were just as far apart before the roll."""
    mask = shifted_window_mask((H, W), window, shift)
    wh, ww = window
    nWh, nWw = H // wh, W // ww
    assert mask.shape == (nWh * nWw, wh * ww, wh * ww)
    for a, b in itertools.product(range(nWh), range(nWw)):
        coords = [(a * wh + i, b * ww + j) for i in range(wh) for j in range(ww)]  # row-major inside the window
        for (p, (h1, w1)), (q, (h2, w2)) in itertools.product(enumerate(coords), repeat=2):
            o1, o2 = ((h1 + shift[0]) % H, (w1 + shift[1]) % W), ((h2 + shift[0]) % H, (w2 + shift[1]) % W)
            allowed = (o1[0] - o2[0], o1[1] - o2[1]) == (h1 - h2, w1 - w2)
            assert mask[a * nWw + b, p, q].item() == (0.0 if allowed else -100.0), (a, b, p, q)


def test_unshifted_mask_is_all_zero():
    assert not shifted_window_mask((8, 8), (4, 4), (0, 0)).any()


def _dense_block(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """The same block as full attention over the map: pairs outside a shifted window get -inf, the bias by offset."""
    B, H, W, C = x.shape
    (wh, ww), (sh, sw) = block.window_size, block.shift_size
    attn = block.attn
    hh, ww_ = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    hh, ww_ = hh.flatten(), ww_.flatten()
    group = torch.div(hh - sh, wh, rounding_mode="floor") * 1000 + torch.div(ww_ - sw, ww, rounding_mode="floor")
    allowed = group[:, None] == group[None, :]
    dh = (hh[:, None] - hh[None, :]).clamp(-wh + 1, wh - 1)
    dw = (ww_[:, None] - ww_[None, :]).clamp(-ww + 1, ww - 1)
    bias = attn.relative_position_bias_table[(dh + wh - 1) * (2 * ww - 1) + dw + ww - 1].permute(2, 0, 1)
    t = block.norm1(x).reshape(B, H * W, C)
    q, k, v = attn.qkv(t).reshape(B, H * W, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * attn.scale + bias
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, H * W, C)
    x = x + attn.proj(out).reshape(B, H, W, C)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("shift", [(0, 0), (2, 2)])
def test_window_attention_equals_dense_reference(shift):
    torch.manual_seed(0)
    block = SwinTransformerBlock(8, 2, (4, 4), shift).eval()
    _randomize(block)
    x = torch.randn(2, 8, 12, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _dense_block(block, x), atol=1e-5, rtol=0)


def test_windows_fixed_at_construction():
    model = visionzoo.create_model("swin_test", **SHIFTED)
    got = [(s.window_size, s.shift_size) for s in model.layers]  # maps 16, 8, 4, 2 with window 4
    assert got == [((4, 4), (2, 2)), ((4, 4), (2, 2)), ((4, 4), (0, 0)), ((2, 2), (0, 0))]
    assert [b.shift_size for b in model.layers[0].blocks] == [(0, 0), (2, 2)]


@pytest.mark.parametrize("size", [(96, 96), (32, 32), (96, 64)])
def test_other_input_sizes_pad(size):
    """Built for 64 px with window 5 (stages 0-1 shifted), run at other sizes: maps are padded to the window."""
    torch.manual_seed(0)
    model = visionzoo.create_model("swin_test", num_classes=10, window_size=5, **SHIFTED).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        assert model(x).shape == (2, 10)
    for f, info in zip(feats, model.feature_info, strict=True):
        assert f.shape == (2, info.channels, size[0] // info.reduction, size[1] // info.reduction)
    for i in (0, 1):
        H, W = size[0] // 4 // 2**i, size[1] // 4 // 2**i
        padded = (-(-H // 5) * 5, -(-W // 5) * 5)
        assert [k[:2] for k in model.layers[i].blocks[1]._masks] == [padded]


def test_padded_sizes_trace():
    """At a size that pads (and so masks a padded, shifted map) the FX graph matches eager, and it takes another such
    size: the padding and the masks are computed at run time, not baked in. (torch.export at a padded size was
    checked by hand; it takes seconds.)"""
    torch.manual_seed(0)
    model = visionzoo.create_model("swin_test", num_classes=10, window_size=5, **SHIFTED).eval()
    _randomize(model)
    x, other = torch.randn(2, 3, 96, 64), torch.randn(1, 3, 64, 96)
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gm(other), model(other), atol=1e-5, rtol=1e-5)


def test_other_size_on_meta_device():
    p = visionzoo.profile("swin_tiny_patch4_window7_224", input_size=256)  # 64x64 maps padded to 70x70 windows
    assert p.gmacs > visionzoo.profile("swin_tiny_patch4_window7_224").gmacs


def test_mask_made_under_inference_mode_serves_training():
    torch.manual_seed(0)
    model = visionzoo.create_model("swin_test", num_classes=10, **SHIFTED)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
    assert model.layers[0].blocks[1].attn.relative_position_bias_table.grad is not None


def test_no_weight_decay_is_the_bias_tables():
    model = visionzoo.create_model("swin_test", **SHIFTED)
    nwd = model.no_weight_decay()
    assert len(nwd) == sum(SHIFTED["depths"])
    assert all(n.endswith("attn.relative_position_bias_table") for n in nwd)


def _to_official(state: dict[str, torch.Tensor], model: SwinTransformer) -> dict[str, torch.Tensor]:
    """Our keys -> the official layout: merging at the end of the previous stage, ``head``, persistent buffers."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            k = ".".join(["layers", str(int(parts[1]) - 1), *parts[2:]])
        out[k.replace("head.fc.", "head.")] = v
    for name, m in model.named_modules():
        if hasattr(m, "relative_position_index"):
            out[f"{name}.relative_position_index"] = m.relative_position_index
        if getattr(m, "shift_size", (0, 0)) != (0, 0) and hasattr(m, "attn"):
            out[f"{name}.attn_mask"] = torch.zeros(1)
    return out


def test_official_layout_round_trip():
    torch.manual_seed(0)
    model = visionzoo.create_model("swin_test", num_classes=10, **SHIFTED).eval()
    _randomize(model)
    official = _to_official(model.state_dict(), model)
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    assert SwinTransformer.remap(official).keys() == model.state_dict().keys()
    again = visionzoo.create_model("swin_test", num_classes=10, **SHIFTED).eval()
    assert load_checkpoint(again, official) == "official"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_remap_only_drops_buffers_of_a_timm_layout_dict():
    model = visionzoo.create_model("swin_test", **SHIFTED)
    state = dict(model.state_dict())
    stale = {**state, "layers.1.blocks.0.attn.relative_position_index": torch.zeros(1)}
    assert SwinTransformer.remap(stale).keys() == state.keys()


def test_official_fixture_needs_the_remap():
    official = load_file(str(FIXTURES / "swin_official.safetensors"))
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    assert any(k.endswith("attn_mask") for k in official)
    model = visionzoo.create_model("swin_test", num_classes=10, depths=(2, 2, 2, 2), embed_dim=6, mlp_ratio=2.0)
    assert SwinTransformer.remap(official).keys() == model.state_dict().keys()
