"""Parity fixture for Spikformer V2's v1 path (``stem="sps"``) against the official Spikformer code.

Reference: ``imagenet/model.py`` of ZK-Zhou/spikformer (MIT) at commit 6212689818270a66c0b80bf5d9e6b6c0c2b2ab65
(the v2 code is unreleased), read from a local file and never copied into this repository:
``git --git-dir=<mirror> show HEAD:imagenet/model.py > /tmp/spikformer_v1_model.py``. The official file imports
``spikingjelly.clock_driven.neuron.MultiStepLIFNode`` (with the CUDA ``cupy`` backend); this script serves that
name with spikingjelly 2.0's own ``LIFNode(step_mode="m")`` (torch path, same tau / threshold / detached hard reset /
sigmoid surrogate), so the reference neuron is the library's, not ours. Needs ``pip install spikingjelly loguru`` in
the reference venv.

Tiny configuration: embed_dim 32, depth 2, 4 heads, T=4 (the official forward hard-codes T=4), 10 classes, 64 px.
Weights ~ N(0, 1/fan_in) with BatchNorm statistics spread, so that a fair share of neurons fire.

Run: ``/work/refenv/bin/python scripts/make_fixture_spikformer_v2.py /tmp/spikformer_v1_model.py``.
"""
from __future__ import annotations

import sys
import types
from functools import partial

import torch
from spikingjelly.activation_based import neuron
from torch import nn

from fixture_io import OUT, load_module, randomize_fan_in, write  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "6212689818270a66c0b80bf5d9e6b6c0c2b2ab65"


def _lif(tau: float = 2.0, v_threshold: float = 1.0, detach_reset: bool = False, backend: str = "torch"):
    return neuron.LIFNode(tau=tau, v_threshold=v_threshold, detach_reset=detach_reset, step_mode="m")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("pass the official imagenet/model.py (see the docstring) as the first argument")
    shim = types.ModuleType("spikingjelly.clock_driven.neuron")
    shim.MultiStepLIFNode = _lif
    sys.modules["spikingjelly.clock_driven"] = types.ModuleType("spikingjelly.clock_driven")
    sys.modules["spikingjelly.clock_driven.neuron"] = shim
    official = load_module(sys.argv[1], "spikformer_official").Spikformer
    OUT.mkdir(parents=True, exist_ok=True)
    tiny = dict(embed_dim=32, depth=2, num_heads=4, T=4, stem="sps")
    torch.manual_seed(0)
    model = official(img_size_h=64, img_size_w=64, patch_size=16, embed_dims=32, num_heads=4, mlp_ratios=4,
                     in_channels=3, num_classes=10, qkv_bias=False, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                     depths=2, sr_ratios=1)
    randomize_fan_in(model, 1, kernels=("Conv1d",))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):  # the SSA's norms (randomize_fan_in spreads only BatchNorm2d)
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    meta = {"model": "spikformer_v2_test", "overrides": tiny, "num_classes": 10, "layout": "official",
            "reference": f"ZK-Zhou/spikformer@{COMMIT} imagenet/model.py Spikformer (LIF: spikingjelly 2.0 LIFNode)"}
    write("spikformer_v2_official", model, 2.0 * torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)),
          meta)


if __name__ == "__main__":
    main()
