"""Parity fixtures for RepLKNet against the official DingXiaoH/RepLKNet-pytorch code, train and merged forms.

Reference: DingXiaoH/RepLKNet-pytorch@b76808ac2c763eaed6af9d286c6163c9345b4d5f, ``replknet.py`` ``RepLKNet``
(built with ``use_sync_bn=False``). Writes two fixtures to tests/fixtures/, each a 4-stage network with depths
(1, 2, 1, 1), widths (8, 16, 24, 32), large kernels (13, 11, 9, 7) and a 5x5 small kernel, 10 classes, on a 64 px
input:

- ``replknet_official``: the train-time model (parallel large and small depthwise convs, each with its BN);
- ``replknet_merged``: another one (large-kernel width ``dw_ratio=1.5``) after the official
  ``structural_reparam()``: its state_dict has ``large_kernel.lkb_reparam`` keys and is loaded into our
  ``small_kernel_merged=True`` model.

Every parameter and BatchNorm statistic is randomised. The official file is not copied into this repository: give
a git directory of the official repository (read at the pinned commit) or the path of its ``replknet.py``, via
``--official PATH`` or the environment variable ``REPLKNET_OFFICIAL``. It imports ``DropPath`` from timm.

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_replknet.py --official /path/to/RepLKNet-pytorch/.git``.
"""
from __future__ import annotations

import contextlib
import io

import torch

from fixture_io import import_official, official_path, randomize_fan_in, reparameterise, write  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "b76808ac2c763eaed6af9d286c6163c9345b4d5f"
META = {"model": "replknet_test", "num_classes": 10, "img_size": None,
        "reference": f"DingXiaoH/RepLKNet-pytorch@{COMMIT} replknet.py RepLKNet (use_sync_bn=False)"}
CONFIG = dict(depths=[1, 2, 1, 1], dims=[8, 16, 24, 32], large_kernels=[13, 11, 9, 7], small_kernel=5)


def build(official: type[torch.nn.Module], dw_ratio: float = 1.0) -> torch.nn.Module:
    with contextlib.redirect_stdout(io.StringIO()):  # the official blocks print their drop-path module
        return official(large_kernel_sizes=CONFIG["large_kernels"], layers=CONFIG["depths"], channels=CONFIG["dims"],
                        drop_path_rate=0.0, small_kernel=CONFIG["small_kernel"], dw_ratio=dw_ratio,
                        num_classes=META["num_classes"], use_sync_bn=False)


def main() -> None:
    path = official_path(__doc__.splitlines()[0], "REPLKNET_OFFICIAL",
                         "git dir of DingXiaoH/RepLKNet-pytorch, or its replknet.py")
    official = import_official(path, COMMIT, "replknet.py", "official_replknet").RepLKNet

    torch.manual_seed(0)
    model = build(official)
    randomize_fan_in(model, 10)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(20))
    write("replknet_official", model, x, {**META, "overrides": dict(CONFIG)})

    torch.manual_seed(1)
    model = build(official, dw_ratio=1.5).eval()
    randomize_fan_in(model, 11)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(21))
    reparameterise(model, x, "structural_reparam")
    write("replknet_merged", model, x, {**META, "overrides": dict(CONFIG, dw_ratio=1.5, small_kernel_merged=True)})


if __name__ == "__main__":
    main()
