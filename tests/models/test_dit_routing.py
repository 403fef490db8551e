"""DiT routing specifics: deterministic, traceable routing at inference (gate = logit > 0), a bypassed token keeps
its value, stochastic straight-through gates in training, bad arguments."""
from __future__ import annotations

import pytest
import torch

import visionzoo

torch.set_num_threads(1)


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = visionzoo.create_model("dit_routing_test", num_classes=5, **kwargs).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "router"):
                m.router.fc.weight.normal_(std=1.0)  # routes that depend on the token
                m.router.fc.bias.zero_()
    return model


def test_inference_routing_is_deterministic_and_mixed():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        gates = model.forward_routes(x)
        again = model.forward_routes(x)
        out = model(x)
    assert [tuple(g.shape) for g in gates] == [(2, 16, 16), (2, 8, 8), (2, 4, 4), (2, 2, 2)]
    assert all(torch.equal(a, b) for a, b in zip(gates, again))
    assert all(set(g.unique().tolist()) <= {0.0, 1.0} for g in gates)
    rate = model.routing_rate(x)
    assert 0.0 < rate.min() and rate.max() < 1.0  # some tokens take the block, some go around it
    with torch.no_grad():
        traced = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(traced(x), out, atol=1e-5, rtol=1e-5)


def test_a_bypassed_token_keeps_its_value():
    model = _model()
    block = model.stages[0].blocks[0]
    x = torch.randn(1, 256, 16)  # a 16 x 16 map of stage 0 (its keys are reduced 8 times per side)
    with torch.no_grad():
        y, gate = block(x, (16, 16))
    off = gate[0, :, 0] == 0
    assert off.any() and (~off).any()
    torch.testing.assert_close(y[0, off], x[0, off])
    assert not torch.allclose(y[0, ~off], x[0, ~off])


def test_training_gates_are_stochastic_and_differentiable():
    model = _model().train()
    router = model.stages[0].blocks[0].router
    x = torch.randn(2, 16, 16)
    torch.manual_seed(1)
    a = router(x)
    torch.manual_seed(2)
    b = router(x)
    assert set(a.detach().unique().tolist()) <= {0.0, 1.0} and not torch.equal(a, b)
    a.sum().backward()
    assert router.fc.weight.grad is not None and router.fc.weight.grad.abs().sum() > 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="tau must be > 0"):
        visionzoo.create_model("dit_routing_test", tau=0.0)
    with pytest.raises(ValueError, match="one entry per stage"):
        visionzoo.create_model("dit_routing_test", depths=(1, 1, 1))
