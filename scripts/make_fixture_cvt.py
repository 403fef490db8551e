"""Parity fixtures for CvT against the official code.

Reference: ``lib/models/cls_cvt.py`` of microsoft/CvT (MIT) at commit f851e681966390779b71380d2600b52360ff4fe1
(the HEAD the mirror holds), read from a local file and never copied into this repository. Get it from the mirror
that ``fetch github:microsoft/CvT`` gives:
``git --git-dir=<mirror> show f851e681:lib/models/cls_cvt.py > /tmp/cvt/cls_cvt.py``, then pass that path as the
first argument (or in ``CVT_OFFICIAL_FILE``). It needs einops (``/work/refenv/bin/pip install einops``); its
imports of ``torch._six`` (gone from torch 2), ``scipy`` (used only to resize position tables, which CvT's configs
do not have) and the package-relative ``.registry`` are stubbed here. The model is built from a spec dict in the
form of the ``MODEL.SPEC`` of ``experiments/imagenet/cvt/*.yaml`` (dw_bn projections, kv stride 2, class token
in the last stage), with the factory's QuickGELU and LayerNorm(eps=1e-5).

One tiny configuration (dims 8/16/32, depths 1/2/2, heads 1/2/4, 10 classes), two fixtures in the official key
layout (loaded through ``remap``), with random BatchNorm statistics:

- ``cvt_official``: a 64x64 input;
- ``cvt_official_rect``: an 80x48 input (non-square maps in every stage).

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_cvt.py /tmp/cvt/cls_cvt.py``.
"""
from __future__ import annotations

import collections.abc
import os
import sys
import types
from functools import partial
from pathlib import Path

import torch

from fixture_io import OUT, load_module, randomize_all, write  # noqa: E402  (scripts/ is on sys.path)

OFFICIAL_COMMIT = "f851e681966390779b71380d2600b52360ff4fe1"
TINY = dict(embed_dims=(8, 16, 32), depths=(1, 2, 2), num_heads=(1, 2, 4))


def load_official(path: str) -> types.ModuleType:
    sys.modules.setdefault("torch._six", types.SimpleNamespace(container_abcs=collections.abc))
    sys.modules.setdefault("scipy", types.ModuleType("scipy"))
    package = types.ModuleType("cvt_official")
    package.__path__ = [str(Path(path).parent)]
    registry = types.ModuleType("cvt_official.registry")
    registry.register_model = lambda fn: fn
    sys.modules.update({"cvt_official": package, "cvt_official.registry": registry})
    return load_module(path, "cvt_official.cls_cvt")


def official_spec() -> dict:
    n = len(TINY["depths"])
    return dict(NUM_STAGES=n, PATCH_SIZE=[7, 3, 3], PATCH_STRIDE=[4, 2, 2], PATCH_PADDING=[2, 1, 1],
                DIM_EMBED=list(TINY["embed_dims"]), NUM_HEADS=list(TINY["num_heads"]), DEPTH=list(TINY["depths"]),
                MLP_RATIO=[4.0] * n, ATTN_DROP_RATE=[0.0] * n, DROP_RATE=[0.0] * n, DROP_PATH_RATE=[0.0] * n,
                QKV_BIAS=[True] * n, CLS_TOKEN=[False] * (n - 1) + [True], POS_EMBED=[False] * n,
                QKV_PROJ_METHOD=["dw_bn"] * n, KERNEL_QKV=[3] * n, PADDING_KV=[1] * n, STRIDE_KV=[2] * n,
                PADDING_Q=[1] * n, STRIDE_Q=[1] * n)


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CVT_OFFICIAL_FILE")
    if not path or not Path(path).is_file():
        raise SystemExit("pass the official lib/models/cls_cvt.py (see the docstring) as the first argument")
    official = load_official(path)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"model": "cvt_test", "overrides": {k: list(v) for k, v in TINY.items()}, "num_classes": 10,
            "img_size": None, "layout": "official",
            "reference": f"microsoft/CvT@{OFFICIAL_COMMIT} lib/models/cls_cvt.py ConvolutionalVisionTransformer"}
    for name, shape, seed in (("cvt_official", (2, 3, 64, 64), 1), ("cvt_official_rect", (2, 3, 80, 48), 3)):
        torch.manual_seed(0)
        model = official.ConvolutionalVisionTransformer(
            in_chans=3, num_classes=10, act_layer=official.QuickGELU,
            norm_layer=partial(official.LayerNorm, eps=1e-5), spec=official_spec())
        randomize_all(model, seed)
        write(name, model, torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1)), meta)


if __name__ == "__main__":
    main()
