"""Parity fixture for SOFT against the official fudan-zvg/SOFT@d3febc3 (CPU path).

Reads ``models/softmax_free_vision_transformer.py``, ``models/softmax_free_transformer.py`` and
``SOFT/kernel/inverse.py`` from a git dir of the repository into a temporary package. The official code runs its
Gaussian kernel and Newton inverse only on CUDA; for the CPU path the script (1) builds the model with
``kernel_method="torch"`` after replacing the module's torch kernel (which allocates its ones on ``.cuda()``) by the
same sum ``q^2 1 + 1 k^2 - 2 q k`` on the input's device, and (2) replaces ``newton_inverse_kernel`` (a CUDA-only
autograd wrapper) by the official forward it wraps, ``SOFT.kernel.inverse.newton_inv``. The compiled ``SOFT._C``
(Gaussian-subtraction CUDA op) is stubbed, and ``cv2`` (imported, unused) too.

Writes ``soft_official`` to tests/fixtures/: the ``soft_test`` widths (16/32/48/64, one block per stage) with the
official 224 px position tables (so a 96x64 input resizes them, and the landmark grids are 3x2, 3x2, 3x2),
random weights and BatchNorm statistics, eval mode. Keys are the official ones; ``SOFT.remap`` translates them.

Run with the reference venv, never in CI:
``PYTHONPATH=src /work/refenv/bin/python scripts/make_fixture_soft.py --official <git dir of fudan-zvg/SOFT>``
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

from fixture_io import official_path, randomize_fan_in, write  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "d3febc3"
FILES = ("SOFT/kernel/inverse.py", "models/softmax_free_transformer.py", "models/softmax_free_vision_transformer.py")


def _import(git_dir: str) -> types.ModuleType:
    root = Path(tempfile.mkdtemp())
    for f in FILES:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text(subprocess.run(["git", "--git-dir", git_dir, "show", f"{COMMIT}:{f}"], check=True,
                                             capture_output=True, text=True).stdout)
    for pkg in ("SOFT", "SOFT/kernel", "models"):
        (root / pkg / "__init__.py").write_text("")
    (root / "SOFT/kernel/subtraction.py").write_text("def subtraction_gaussian_kernel(q, k):\n"
                                                     "    raise NotImplementedError('CUDA only')\n")
    sys.modules["cv2"] = types.ModuleType("cv2")
    sys.path.insert(0, str(root))
    import timm.models.registry

    timm.models.registry.register_model = lambda fn: fn
    import models.softmax_free_transformer as sft
    from SOFT.kernel.inverse import newton_inv

    def gaussian_sq_dist(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # q (.., N, C), k (.., C, M)
        ones_k = torch.ones(k.shape[-2:], dtype=q.dtype, device=q.device)
        ones_q = torch.ones(q.shape[-2:], dtype=q.dtype, device=q.device)
        return (q ** 2.0) @ ones_k + ones_q @ (k ** 2.0) - 2.0 * (q @ k)

    sft.subtraction_gaussian_kernel_torch = gaussian_sq_dist
    sft.newton_inverse_kernel = newton_inv
    import models.softmax_free_vision_transformer as sv

    return sv


def main() -> None:
    path = official_path(__doc__, "SOFT_OFFICIAL", "git dir of fudan-zvg/SOFT")
    sv = _import(path)
    torch.manual_seed(0)
    model = sv.SoftmaxFreeVisionTransformer(
        img_size=224, patch_size=4, embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 2, 2], mlp_ratios=[8, 8, 4, 4],
        qkv_bias=True, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1],
        kernel_method="torch", num_classes=10)
    randomize_fan_in(model, 1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("pos_embed", "cls_token")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(2))
    write("soft_official", model, x, {"model": "soft_test", "num_classes": 10, "img_size": 224,
                                      "reference": f"fudan-zvg/SOFT@{COMMIT} {FILES[2]} SoftmaxFreeVisionTransformer "
                                                   f"(CPU path: torch Gaussian kernel, newton_inv)"})


if __name__ == "__main__":
    main()
