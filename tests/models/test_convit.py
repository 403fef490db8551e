"""ConViT specifics: the recorded GPSA map is the gated mix, the convolutional init, token reduction on the MHSA
blocks, non-square inputs."""
from __future__ import annotations

import torch

import visionzoo
from visionzoo import tokens
from visionzoo.explain import record_attention
from visionzoo.models.convit import rel_offsets

torch.set_num_threads(1)


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return visionzoo.create_model("convit_test", num_classes=5, **kwargs).eval()


def test_recorded_gpsa_map_is_the_gated_mix():
    model = _model()
    with torch.no_grad():
        model.blocks[0].attn.gating_param.normal_()
    x = torch.randn(2, 3, 64, 48)
    grab = {}
    model.blocks[0].attn.register_forward_pre_hook(lambda m, a: grab.setdefault("x", a[0]))
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
        gpsa = model.blocks[0].attn
        t = grab["x"]  # (B, H, W, C) after norm1
        B, H, W, C = t.shape
        q, k = gpsa.qk(t.reshape(B, H * W, C)).reshape(B, H * W, 2, 4, C // 4).permute(2, 0, 3, 1, 4)
        content = ((q @ k.transpose(-2, -1)) * gpsa.scale).softmax(-1)
        positional = gpsa.pos_proj(rel_offsets(t)).permute(2, 0, 1).softmax(-1)
        g = torch.sigmoid(gpsa.gating_param).view(1, -1, 1, 1)
        expected = (1 - g) * content + g * positional
    first = rec.maps[0]
    assert first.name == "blocks.0.attn.core" and first.grid == (4, 3) and first.prefix_tokens == 0
    torch.testing.assert_close(first.probs, expected, atol=1e-5, rtol=1e-4)
    assert rec.maps[-1].prefix_tokens == 1 and rec.maps[-1].probs.shape[-1] == 1 + 12


def test_local_init_makes_positional_heads_look_at_kernel_offsets():
    gpsa = _model().blocks[0].attn  # 4 heads: a 2x2 kernel, each head peaks at its own offset
    offsets = rel_offsets(torch.zeros(1, 5, 5, 1))  # (25, 25, 3)
    scores = gpsa.pos_proj(offsets)[12]  # from the centre patch: (25 keys, 4 heads)
    peaks = {divmod(i, 5) for i in scores.argmax(0).tolist()}
    assert len(peaks) == 4 and torch.equal(gpsa.v.weight, torch.eye(64))


def test_token_reduction_runs_on_the_mhsa_blocks():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    handle = tokens.apply(model, "tome", r=4)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    assert handle.token_counts() == [17, 13, 9]  # the class token and 16 patches, then 4 fewer per MHSA block
