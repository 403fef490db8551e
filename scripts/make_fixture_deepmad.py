"""Parity fixtures for DeepMAD against the official alibaba/lightweight-neural-architecture-search code.

Official code: alibaba/lightweight-neural-architecture-search@8ccaf889fcd06079d268a355c765e9d0af071612,
``tinynas/deploy/cnnnet/cnnnet.py`` (``CnnNet(classfication=True)``) and its ``modules/`` package (ConvKXBN[RELU],
SE, SuperResK1KXK1 / ResK1KXK1, SuperResK1DWSEK1 / ResK1DWSEK1), official key layout (``block_list``,
``fc_linear``). Two tiny structures, written in the format of ``configs/classification/models/deepmad-*.txt``,
10 classes, 64 px input:

- ``deepmad_official_k1kxk1``: ResK1KXK1 super-blocks (the DeepMAD-R18/R34/R50 block), a stride-1 super-block in
  the middle as in those structures, mixed kernel sizes, L = 1 or 2;
- ``deepmad_official_k1dwsek1``: ResK1DWSEK1 super-blocks (the DeepMAD-29M/50M/89M block) with a stride-1 first
  super-block, an in == out stride-2 super-block (avg-pooled identity shortcut), and the final 1x1 ConvKXBNRELU.

Every parameter and every BatchNorm running statistic is randomised.

The official files are not copied into this repository: pass the official git directory with ``--official PATH``
or ``DEEPMAD_OFFICIAL``; the deploy package is read at the pinned commit into a temporary directory.

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_deepmad.py --official /path/to/<repo>/.git``.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fixture_io import OUT, official_path, randomize_fan_in, save_fixture, save_meta  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "8ccaf889fcd06079d268a355c765e9d0af071612"
DEPLOY = "tinynas/deploy/cnnnet"
NUM_CLASSES = 10

# name: (block class, stem out, [(L, btn, out, s, k), ...], final 1x1 out or 0)
CONFIGS = {
    "deepmad_official_k1kxk1": ("K1KXK1", 8, [(1, 8, 16, 2, 5), (2, 8, 24, 2, 3), (2, 16, 32, 2, 5),
                                              (1, 16, 32, 1, 3), (2, 16, 48, 2, 3)], 0),
    "deepmad_official_k1dwsek1": ("K1DWSEK1", 8, [(2, 24, 8, 1, 5), (2, 32, 16, 2, 5), (1, 48, 16, 2, 3),
                                                  (2, 64, 24, 2, 5), (1, 96, 32, 2, 3)], 64),
}


def structure(block: str, stem: int, stages: list[tuple[int, int, int, int, int]], head: int) -> list[dict]:
    """The official structure list, as in configs/classification/models/deepmad-*.txt."""
    rows = [{"class": "ConvKXBNRELU", "in": 3, "k": 3, "out": stem, "s": 2}]
    in_dim = stem
    for L, btn, out, s, k in stages:
        rows.append({"L": L, "btn": btn, "class": f"SuperRes{block}", "in": in_dim, "inner_class": f"Res{block}",
                     "k": k, "out": out, "s": s})
        in_dim = out
    if head:
        rows.append({"class": "ConvKXBNRELU", "in": in_dim, "k": 1, "out": head, "s": 1})
    return rows


def load_official(git_dir: str) -> type[torch.nn.Module]:
    """Write the deploy package at COMMIT into a temp dir and import ``CnnNet`` (it imports ``modules``)."""
    root = Path(tempfile.mkdtemp())
    files = subprocess.run(["git", "--git-dir", git_dir, "ls-tree", "-r", "--name-only", COMMIT, DEPLOY],
                           check=True, capture_output=True, text=True).stdout.split()
    for f in files:
        dst = root / Path(f).relative_to(DEPLOY)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(subprocess.run(["git", "--git-dir", git_dir, "show", f"{COMMIT}:{f}"], check=True,
                                      capture_output=True, text=True).stdout)
    sys.path.insert(0, str(root))
    return importlib.import_module("cnnnet").CnnNet


def main() -> None:
    official_dir = official_path(__doc__.splitlines()[0], "DEEPMAD_OFFICIAL",
                                 "git dir of alibaba/lightweight-neural-architecture-search")
    CnnNet = load_official(official_dir)
    OUT.mkdir(parents=True, exist_ok=True)
    for i, (name, (block, stem, stages, head)) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = CnnNet(num_classes=NUM_CLASSES, structure_info=structure(block, stem, stages, head),
                       classfication=True)
        randomize_fan_in(model, 10 + i)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(20 + i))
        y, state = save_fixture(name, model, x)
        depths, btn_dims, dims, strides, kernel_sizes = (list(c) for c in zip(*stages))
        ours = dict(block=block.lower(), stem_dim=stem, depths=depths, btn_dims=btn_dims, dims=dims, strides=strides,
                    kernel_sizes=kernel_sizes, head_dim=head)
        save_meta(name, {"model": "deepmad_test", "overrides": ours, "num_classes": NUM_CLASSES, "img_size": None,
                         "reference": f"alibaba/lightweight-neural-architecture-search@{COMMIT} "
                                      f"{DEPLOY}/cnnnet.py CnnNet", "layout": "official"})
        print(name, tuple(x.shape), "->", tuple(y.shape), f"{sum(v.numel() for v in state.values())} values")


if __name__ == "__main__":
    main()
