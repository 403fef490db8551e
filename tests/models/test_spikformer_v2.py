"""Spikformer V2 specifics: the spike function and its surrogate gradient, the LIF recurrence, time steps, the
official v1 key layout."""
from __future__ import annotations

import pytest
import torch

import visionzoo
from visionzoo.models.spikformer_v2 import LIF, SpikformerV2, spike_fn

torch.set_num_threads(1)


def test_spike_is_binary_and_its_gradient_is_the_sigmoid_surrogate():
    v = torch.linspace(-2, 2, 41, dtype=torch.float64, requires_grad=True)
    s = spike_fn(v, alpha=4.0)
    torch.testing.assert_close(s.detach(), (v >= 0).double(), atol=0, rtol=0)  # exactly 0/1 forward
    s.sum().backward()
    sig = torch.sigmoid(4.0 * v.detach())
    torch.testing.assert_close(v.grad, 4.0 * sig * (1 - sig))


def test_lif_recurrence_with_hard_reset():
    """Constant input 1.5, tau 2, threshold 1: h = 0.75 (rest), 1.125 (fire, reset to 0), 0.75, 1.125, ..."""
    lif = LIF(T=6)
    x = torch.full((6 * 2, 3), 1.5)  # (T * B, C)
    spikes = lif(x).reshape(6, 2, 3)
    torch.testing.assert_close(spikes[:, 0, 0], torch.tensor([0., 1., 0., 1., 0., 1.]))
    # against a direct loop on random input
    x = torch.randn(6 * 2, 5) * 2
    v, expected = torch.zeros(2, 5), []
    for t in range(6):
        h = v + (x.reshape(6, 2, 5)[t] - v) / 2.0
        s = (h >= 1.0).float()
        v = h * (1 - s)
        expected.append(s)
    torch.testing.assert_close(lif(x), torch.stack(expected).reshape(12, 5), atol=0, rtol=0)


def test_time_steps_is_an_argument_and_runs_t_steps():
    torch.manual_seed(0)
    one = visionzoo.create_model("spikformer_v2_test", T=1, num_classes=4).eval()
    three = visionzoo.create_model("spikformer_v2_test", T=3, num_classes=4).eval()
    three.load_state_dict(one.state_dict())  # T is not a weight
    seen = []
    three.stem.proj_conv.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out1, out3 = one(x), three(x)
    assert seen == [3 * 2] and out3.shape == out1.shape == (2, 4)
    assert not torch.allclose(out1, out3)  # the membrane integrates over time: more steps, other rates
    rates = three.forward_intermediates(x, indices=[0])[0]  # mean firing over T: multiples of 1/3 (plus residual)
    assert rates.shape == (2, 32, 4, 4) and rates.max() > 0
    with pytest.raises(ValueError, match="T"):
        SpikformerV2(embed_dim=32, depth=1, num_heads=2, T=0)


def test_gradient_reaches_the_first_conv_through_the_spikes():
    model = visionzoo.create_model("spikformer_v2_test", num_classes=4).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.stem.proj_conv.weight.grad.abs().sum() > 0


def test_remap_official_keys():
    sd = {"patch_embed.proj_conv.weight": torch.zeros(4, 3, 3, 3), "block.0.attn.q_conv.weight": torch.zeros(8, 8, 1),
          "block.0.norm1.weight": torch.ones(8), "head.weight": torch.zeros(10, 8), "head.bias": torch.zeros(10)}
    out = SpikformerV2.remap(sd)
    assert set(out) == {"stem.proj_conv.weight", "blocks.0.attn.q_conv.weight", "head.fc.weight", "head.fc.bias"}
    assert out["blocks.0.attn.q_conv.weight"].shape == (8, 8, 1, 1)
    assert SpikformerV2.remap(out).keys() == out.keys()
