"""Parity fixtures for HorNet against the official code (raoyongming/HorNet, MIT).

Reference: ``hornet.py`` of raoyongming/HorNet at commit ac9e21058935f1cf8e27fcca72bbf598fa691d69, read from a local
git directory or file and never copied into this repository. Get the git directory with the ``fetch`` tool
(``fetch github:raoyongming/HorNet``) and pass it (or ``git --git-dir=<mirror> show ac9e210:hornet.py >
/tmp/hornet/hornet_official.py`` and pass that file) via ``--official PATH`` or ``HORNET_OFFICIAL``. The file imports
timm's ``DropPath``/``trunc_normal_``/``register_model``, so it runs in the reference venv.

All three use the official ``HorNet`` class with depths 1/1/1/1, base_dim 4 (dims 4/8/16/32), gnConv orders 2/3/4/5
and scale 1/3, 10 classes, every parameter randomised (``fixture_io.randomize_all``; layer-scale ``gamma``
starts at 1e-6, which would hide every block), on a 2x3x64x64 input. Writes to tests/fixtures/:

- ``hornet_7x7``: depthwise 7x7 gnConv in every stage (the ``*_7x7`` variants);
- ``hornet_gf``: GlobalLocalFilter in stages 3-4 with the grid the official code would use for a 64 px build
  (h, w = 4, 3 and 2, 2), so no filter resizing happens; ours is built with ``img_size=64``;
- ``hornet_gf_224grid``: the same with the official fixed 224 px grid (h, w = 14, 8 and 7, 4, as in
  ``hornet_*_gf``) run on the 64 px input, so the official code resizes the filters bilinearly on the fly; ours is
  built with ``img_size=224`` and must resize them the same way.

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_hornet.py --official /path/to/HorNet/.git``.
"""
from __future__ import annotations

import contextlib
import io
import os
from functools import partial

import torch

from fixture_io import OUT, import_official, official_path, randomize_all, save_fixture, save_meta  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "ac9e21058935f1cf8e27fcca72bbf598fa691d69"
NUM_CLASSES = 10
DEPTHS, BASE_DIM, ORDERS = [1, 1, 1, 1], 4, (2, 3, 4, 5)


def build(official, gf_sizes: list | None):  # noqa: ANN001, ANN201
    """The official HorNet with the tiny config; ``gf_sizes`` = (h, w) for stages 3 and 4, or None for 7x7."""
    s = 1.0 / 3.0
    layers = []
    for i, order in enumerate(ORDERS):
        if gf_sizes is not None and i >= 2:
            h, w = gf_sizes[i - 2]
            layers.append(partial(official.gnconv, order=order, s=s, h=h, w=w, gflayer=official.GlobalLocalFilter))
        else:
            layers.append(partial(official.gnconv, order=order, s=s))
    with contextlib.redirect_stdout(io.StringIO()):  # the official gnconv prints its config
        return official.HorNet(depths=DEPTHS, base_dim=BASE_DIM, gnconv=layers, num_classes=NUM_CLASSES)


def write(name: str, model: torch.nn.Module, seed: int, global_filter: bool, img_size: int | None) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    y, state = save_fixture(name, model, x)
    overrides = dict(depths=DEPTHS, dims=[BASE_DIM * 2**i for i in range(4)], orders=list(ORDERS),
                     global_filter=[False, False, global_filter, global_filter])
    meta = {"model": "hornet_test", "overrides": overrides, "num_classes": NUM_CLASSES, "img_size": img_size,
            "reference": f"raoyongming/HorNet@{COMMIT} hornet.py HorNet", "layout": "official"}
    save_meta(name, meta, indent=1)
    sizes = [os.path.getsize(OUT / f"{name}{s}") for s in (".safetensors", ".io.safetensors")]
    print(f"{name}: {tuple(x.shape)} -> {tuple(y.shape)}, |y| max {y.abs().max():.3f}, files {sizes} bytes")


def main() -> None:
    official_dir = official_path(__doc__.splitlines()[0], "HORNET_OFFICIAL",
                                 "git dir of raoyongming/HorNet, or its hornet.py")
    official = import_official(official_dir, COMMIT, "hornet.py", "hornet_official")
    OUT.mkdir(parents=True, exist_ok=True)
    cases = [("hornet_7x7", None, None), ("hornet_gf", [(4, 3), (2, 2)], 64),
             ("hornet_gf_224grid", [(14, 8), (7, 4)], 224)]
    for i, (name, gf_sizes, img_size) in enumerate(cases):
        torch.manual_seed(i)
        model = build(official, gf_sizes)
        randomize_all(model, 10 + i)
        write(name, model, 20 + i, gf_sizes is not None, img_size)


if __name__ == "__main__":
    main()
