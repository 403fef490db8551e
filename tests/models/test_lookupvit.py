"""LookupViT specifics: one attention map used both ways (gather and scatter), a fixed compressed grid for any
input size, bad arguments."""
from __future__ import annotations

import pytest
import torch

import visionzoo

torch.set_num_threads(1)


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return visionzoo.create_model("lookupvit_test", num_classes=5, **kwargs).eval()


def test_scatter_uses_the_transposed_gather_map():
    model = _model()
    block = model.blocks[0]
    x = model.forward_stem(torch.randn(2, 3, 64, 64))
    c, lookup = block.norm_c(x[:, :4]), block.norm_l(x[:, 4:])
    with torch.no_grad(), visionzoo.explain.record_attention(model) as rec:
        gathered, q, k = block.cross.gather(c, lookup, block.compressed_grid)
    (amap,) = [m for m in rec.maps if m.name == "blocks.0.cross.core"]
    assert amap.probs.shape == (2, 2, 4, 16) and amap.grid == (2, 2)  # (B, heads, M, N)
    v = block.cross.v_scatter(c).reshape(2, 4, 2, 16).transpose(1, 2)  # (B, M, D) -> (B, h, M, d)
    expected = block.cross.proj_scatter((amap.probs.transpose(-2, -1) @ v).transpose(1, 2).reshape(2, 16, 32))
    with torch.no_grad():
        torch.testing.assert_close(block.cross.scatter(c, q, k), expected, atol=1e-5, rtol=1e-5)


def test_compressed_grid_is_fixed_for_any_input_size():
    model = _model(compressed_grid=(2, 3))
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        feats = model.forward_intermediates(x)
    assert tokens.shape == (1, 6 + 24, 32)
    assert [tuple(f.shape) for f in feats] == [(1, 32, 6, 4)] * 2


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="compressed_grid must be positive"):
        visionzoo.create_model("lookupvit_test", compressed_grid=0)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        visionzoo.create_model("lookupvit_test", num_heads=3)
