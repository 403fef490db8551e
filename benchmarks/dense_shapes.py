"""Dense heads learn: a ConvNet, a hierarchical Transformer and a hybrid on the procedural shapes scenes.

Every backbone gets the same head, recipe, data, budget and seed (``visionzoo.train.dense_compare``): UPerNet for
segmentation (mIoU, pixel accuracy), FCOS for detection (mAP@0.5, mAP@[.5:.95]), trained from scratch on
``shapes_scenes`` (1-3 non-overlapping shapes per image, 4 classes: the easy setting) at 128 px. Inference img/s
is measured interleaved in one process (batch 8, fp32 eager, this process's threads), so ratios between rows hold
even on a shared machine; absolute numbers depend on the load, which is printed.

    python benchmarks/dense_shapes.py --task seg        # the README numbers (tiny *_test backbones, 2-core CPU)
    python benchmarks/dense_shapes.py --task det
    python benchmarks/dense_shapes.py --task seg --models convnext_test pvt_v2_test uniformer_test \
        --n-train 480 --epochs 6 --lr 2e-3          # the shorter first run in the README
    python benchmarks/dense_shapes.py --task seg --models convnext_atto pvt_v2_b0 uniformer_small --epochs 30
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads collapse on a shared machine

import torch  # noqa: E402

from visionzoo.runtime.cpu import cpu_info  # noqa: E402
from visionzoo.train.augment import AugConfig  # noqa: E402
from visionzoo.train.dense_compare import compare_dense  # noqa: E402
from visionzoo.train.dense_data import shapes_scenes  # noqa: E402
from visionzoo.train.loop import TrainConfig  # noqa: E402

HEADS = {"seg": "upernet", "det": "fcos"}
TARGETS = {"seg": ("miou", 0.8), "det": ("map50", 0.7)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("seg", "det"), required=True)
    p.add_argument("--models", nargs="+", default=["resnet_test", "pvt_v2_test", "uniformer_test"])
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--n-train", type=int, default=640)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/dense_shapes")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train = shapes_scenes(a.n_train, a.img_size, seed=0)
    val = shapes_scenes(a.n_val, a.img_size, seed=1)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=0.05, warmup_epochs=1,
                      progress=False, aug=AugConfig(hflip=0.5))
    print(f"CPU: {cpu_info()[0]}, {a.threads} thread(s), load {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print(f"recipe: {a.task} + {HEADS[a.task]} (dim {a.head_dim}), shapes_scenes {a.n_train}/{a.n_val} at "
          f"{a.img_size}px, {a.epochs} epochs, batch {a.batch_size}, AdamW lr {a.lr} wd 0.05, warm-up 1 epoch, "
          f"cosine, hflip 0.5, seed 0, from scratch")
    t0 = time.time()
    rows = compare_dense(a.models, a.task, HEADS[a.task], train, val, cfg, os.path.join(a.out, a.task),
                         dim=a.head_dim, budget=3.0, log=None)
    key, target = TARGETS[a.task]
    print(open(os.path.join(a.out, a.task, "compare.md")).read())
    base = rows[0].img_per_s
    for r in rows:
        met = "met" if r.metrics[key] >= target else "NOT met"
        print(f"{r.model}: {key} {r.metrics[key]:.3f} (target {target}: {met}), {r.img_per_s / base:.2f}x the img/s "
              f"of {rows[0].model}")
    print(f"total {time.time() - t0:.0f} s, load {os.getloadavg()[0]:.1f}")
    return 0 if all(r.metrics[key] >= target for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
