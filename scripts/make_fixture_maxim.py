"""Parity fixture for MAXIM against the official JAX/Flax code.

Reference: ``maxim/models/maxim.py`` of google-research/maxim at commit 3c8265171ffccc80c3c9124844aef0d381609956
(2023-01-08, Apache-2.0), read from a local file and never copied into this repository. Get it from the mirror that
``fetch github:google-research/maxim`` gives::

    mkdir -p /tmp/maxim && git --git-dir=<mirror> show 3c826517:maxim/models/maxim.py > /tmp/maxim/maxim.py

It needs jax, flax and einops in the reference venv (``/work/refenv/bin/pip install jax flax einops``, CPU).

One tiny MAXIM (features 4, depth 3, two stages, one group and one bottleneck block, the three supervision scales
of the official evaluation, blocks/grids 4x4 at the high-resolution levels and 2x2 below), the Flax init with every
parameter then moved by random noise (norm scales around 1, biases around 0), on a 32x32 input. The Flax parameter
tree is flattened with "." (``stage_0_encoder_block_0.Conv_0.kernel``) and stored as is; ``MAXIM.remap`` reads it.
Input and output are stored NCHW (the official model runs NHWC). The output has std ~60, so float32 rounding of the
two frameworks differs by up to ~2e-4 (relative 1e-5): atol 5e-4. Writes ``tests/fixtures/maxim_official.*``.

Run with the reference venv, never in CI: ``/work/refenv/bin/python scripts/make_fixture_maxim.py /tmp/maxim/maxim.py``.
"""
from __future__ import annotations

import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax.traverse_util import flatten_dict
from safetensors.torch import save_file

from fixture_io import OUT, save_meta  # noqa: E402  (scripts/ is on sys.path)

TINY = dict(features=4, depth=3, num_stages=2, num_groups=1, num_bottleneck_blocks=1, num_supervision_scales=3,
            block_size_hr=(4, 4), block_size_lr=(2, 2), grid_size_hr=(4, 4), grid_size_lr=(2, 2))


def main(path: str) -> None:
    spec = importlib.util.spec_from_file_location("maxim_official", path)
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    model = official.Model(**TINY, num_outputs=3, use_bias=True, dropout_rate=0.0)
    x = jax.random.uniform(jax.random.PRNGKey(1), (1, 32, 32, 3))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    flat = flatten_dict(params)
    rng = np.random.default_rng(0)
    state = {}
    for key, value in flat.items():
        value = np.asarray(value, dtype=np.float32)
        spread = 0.05 if key[-1] in ("bias", "scale") else 0.2 * value.std() + 0.01
        value = value + spread * rng.standard_normal(value.shape).astype(np.float32)
        flat[key] = jnp.asarray(value)
        state[".".join(key)] = torch.from_numpy(value.copy())
    from flax.traverse_util import unflatten_dict

    outputs = model.apply({"params": unflatten_dict(flat)}, x, train=False)
    y = np.asarray(outputs[-1][-1])  # the last stage, full resolution (NHWC)
    name = "maxim_official"
    save_file(state, str(OUT / f"{name}.safetensors"))
    io = {"input": torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(),
          "output": torch.from_numpy(y).permute(0, 3, 1, 2).contiguous()}
    save_file(io, str(OUT / f"{name}.io.safetensors"))
    overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items() if k != "grid_size_lr"}
    save_meta(name, {"layout": "official", "model": "maxim_test", "num_classes": 1000, "img_size": None,
                     "overrides": overrides, "atol": 5e-4})  # output std ~60: float32 rounding
    print(f"{name}: {len(state)} keys, output std {y.std():.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
