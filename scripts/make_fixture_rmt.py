"""Parity fixtures for RMT against the official code.

Reference: ``classfication_release/RMT.py`` of qhfan/RMT at commit 32ea21417a4d82ba6481f930f94cb4696dda0a8e
(2024-07-29; the repository has no licence file), read from a local file and never copied into this repository.
Get it from the mirror that ``fetch github:qhfan/RMT`` gives::

    mkdir -p /tmp/rmt
    git --git-dir=<mirror> show 32ea2141:classfication_release/RMT.py > /tmp/rmt/RMT.py

then pass that path as the first argument (or in ``RMT_OFFICIAL_FILE``). The file imports ``fvcore`` at the top
(only its ``__main__`` uses it) and ``einops`` (the reference venv has einops); this script puts an empty
``fvcore.nn`` stub in ``sys.modules``. Nothing else is shimmed.

One tiny ``VisRetNet`` (dims 8/16/24/32, depths 2/1/1/1, heads 1/2/3/4, heads_ranges 1/2/3/4, mlp_ratios 2,
decomposed ("chunkwise_recurrents") in stages 1-2, whole-map attention and layer scale in stages 3-4, projection 64,
10 classes), with random weights, BatchNorm statistics and layer scales. Writes to tests/fixtures/:

- ``rmt_official``: on a 64x64 input;
- ``rmt_official_96x64``: the same weights on a 96x64 input (decay masks and rotary tables for a non-square size).

Run with the reference venv, never in CI: ``/work/refenv/bin/python scripts/make_fixture_rmt.py /tmp/rmt/RMT.py``.
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch

from fixture_io import OUT, load_module, write  # noqa: E402  (scripts/ is on sys.path)

OFFICIAL_COMMIT = "32ea21417a4d82ba6481f930f94cb4696dda0a8e"
TINY = dict(dims=(8, 16, 24, 32), depths=(2, 1, 1, 1), num_heads=(1, 2, 3, 4), init_values=(2, 2, 2, 2),
            heads_ranges=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2), decomposed=(True, True, False, False),
            layerscales=(False, False, True, True), projection=64)


def stub_fvcore() -> None:
    fv, fv_nn = types.ModuleType("fvcore"), types.ModuleType("fvcore.nn")
    fv_nn.FlopCountAnalysis = fv_nn.flop_count_table = None
    fv.nn = fv_nn
    sys.modules.update({"fvcore": fv, "fvcore.nn": fv_nn})


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial parameters and BatchNorm running statistics: norm scales around 1, biases and layer scales around
    0, weight matrices with std 1/sqrt(fan-in) (so activations, and the logits, stay of order 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = name.endswith("weight") and p.ndim == 1
            std = p[0].numel() ** -0.5 if p.ndim > 1 and not name.split(".")[-1].startswith("gamma") else 0.2
            p.copy_((1.0 if is_norm_scale else 0.0) + std * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


META = {"model": "rmt_test", "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
        "num_classes": 10, "img_size": None,
        "reference": f"qhfan/RMT@{OFFICIAL_COMMIT} classfication_release/RMT.py VisRetNet", "layout": "official"}


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("RMT_OFFICIAL_FILE")
    if not path or not Path(path).is_file():
        raise SystemExit("pass the official classfication_release/RMT.py (see the docstring) as the first argument")
    stub_fvcore()
    VisRetNet = load_module(path, "rmt_official").VisRetNet  # noqa: N806
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = VisRetNet(in_chans=3, num_classes=10, embed_dims=list(TINY["dims"]), depths=list(TINY["depths"]),
                      num_heads=list(TINY["num_heads"]), init_values=list(TINY["init_values"]),
                      heads_ranges=list(TINY["heads_ranges"]), mlp_ratios=list(TINY["mlp_ratios"]),
                      drop_path_rate=0.0, chunkwise_recurrents=list(TINY["decomposed"]),
                      projection=TINY["projection"], layerscales=list(TINY["layerscales"]), layer_init_values=1e-6)
    randomize(model, seed=1)
    write("rmt_official", model, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)), META)
    write("rmt_official_96x64", model, torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(3)), META)


if __name__ == "__main__":
    main()
