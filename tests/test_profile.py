"""MAC/FLOP counting: attention counted on the CPU kernel, meta and real devices agree."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import visionzoo
from visionzoo.bench.flops import CUSTOM_FLOPS


def test_deit_small_is_4_6_gmacs():
    p = visionzoo.profile("deit_small_patch16_224")
    assert abs(p.params_m - 22.05) < 0.01
    assert abs(p.gmacs - 4.61) < 0.05, p.gmacs


def test_attention_term_counted_on_cpu():
    torch.manual_seed(0)
    model = visionzoo.create_model("vit_test").eval()
    x = torch.randn(1, 3, *model.data_config["input_size"][1:])
    with torch.no_grad():
        plain = FlopCounterMode(display=False)
        with plain:
            model(x)
    with_attn = visionzoo.profile(model).flops
    blocks = [m for m in model.modules() if type(m).__name__ == "Attention"]
    a = blocks[0]
    n_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    # QK^T and AV: 2 matmuls of (N x d) by (d x N) per head, 2 FLOPs per multiply-add
    expected = len(blocks) * 2 * 2 * a.num_heads * n_tokens * n_tokens * a.head_dim
    assert CUSTOM_FLOPS, "no CPU attention formula registered"
    assert with_attn - plain.get_total_flops() == expected


def test_meta_and_cpu_counts_agree():
    torch.manual_seed(0)
    real = visionzoo.profile(visionzoo.create_model("convnext_test"))
    meta = visionzoo.profile("convnext_test")
    assert (real.params, real.macs, real.activations) == (meta.params, meta.macs, meta.activations)
    assert real.flops == 2 * real.macs and real.activations > 0


@pytest.mark.parametrize("batch", [1, 3])
def test_per_image_numbers(batch):
    p = visionzoo.profile("resnet_test", batch_size=batch)
    one = visionzoo.profile("resnet_test")
    assert p.macs == batch * one.macs and abs(p.gmacs - one.gmacs) < 1e-12
