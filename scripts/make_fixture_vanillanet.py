"""Parity fixtures for VanillaNet against the official huawei-noah/VanillaNet code, train and deploy forms.

Reference: huawei-noah/VanillaNet@6aaf7311d8cadddcec9db7595f071bfda6c480f4, ``models/vanillanet.py`` ``VanillaNet``.
Writes two fixtures to tests/fixtures/, each a 5-layer network (stem + 4 layers, one of stride 1), 10 classes,
on a 64 px input:

- ``vanillanet_train``: the train-time model half-way up the deep-training ramp (``change_act(0.3)``, so the
  leaky_relu between paired convs is not the identity) with a 5x5 activation kernel (``act_num=2``);
- ``vanillanet_deploy``: a train-time model at ``act_learn=1`` after the official ``switch_to_deploy()``: its
  state_dict has the deploy key layout (``stem``, ``stages.i.conv``, ``act.bias``, ``cls``) and is loaded into
  our ``deploy=True`` model.

Every weight and BatchNorm statistic is randomised (``fixture_io.randomize_fan_in``; the official init,
trunc-normal 0.02, would make the output nearly constant).

The official file is not copied into this repository: give a git directory of the official repository (read at
the pinned commit) or the path of its ``models/vanillanet.py``, via ``--official PATH`` or the environment
variable ``VANILLANET_OFFICIAL``. It imports ``timm.models.layers.weight_init``, which timm 1.0 moved to
``timm.layers.weight_init``; this script adds that alias before the import.

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_vanillanet.py --official /path/to/VanillaNet/.git``.
"""
from __future__ import annotations

import timm.layers.weight_init
import timm.models.layers
import torch

from fixture_io import import_official, official_path, randomize_fan_in, reparameterise, write  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "6aaf7311d8cadddcec9db7595f071bfda6c480f4"
META = {"model": "vanillanet_test", "num_classes": 10, "img_size": None,
        "reference": f"huawei-noah/VanillaNet@{COMMIT} models/vanillanet.py VanillaNet"}
DIMS, STRIDES = [16, 16, 24, 32, 48], [1, 2, 2, 2]


def main() -> None:
    path = official_path(__doc__.splitlines()[0], "VANILLANET_OFFICIAL",
                         "git dir of huawei-noah/VanillaNet, or its models/vanillanet.py")
    timm.models.layers.weight_init = timm.layers.weight_init  # the import path of timm 0.6
    official = import_official(path, COMMIT, "models/vanillanet.py", "official_vanillanet").VanillaNet

    torch.manual_seed(0)
    model = official(dims=DIMS, strides=STRIDES, act_num=2, num_classes=META["num_classes"])
    randomize_fan_in(model, 10, kernels=("activation",))  # the activation's depthwise kernel too
    model.change_act(0.3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(20))
    write("vanillanet_train", model, x, {**META, "overrides": dict(dims=DIMS, strides=STRIDES, act_num=2,
                                                                   act_learn=0.3)})

    torch.manual_seed(1)
    model = official(dims=DIMS, strides=STRIDES, num_classes=META["num_classes"]).eval()
    randomize_fan_in(model, 11, kernels=("activation",))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(21))
    reparameterise(model, x, "switch_to_deploy")
    write("vanillanet_deploy", model, x, {**META, "overrides": dict(dims=DIMS, strides=STRIDES, deploy=True)})


if __name__ == "__main__":
    main()
