"""Acceptance for visionzoo.explain (issue 15): explanations and robustness of a small ConvNet and a small ViT.

1. Train ``convnext_test`` and ``vit_test`` (patch 8: an 8x8 token grid at 64 px), about 0.1 M parameters each,
   with one recipe on the synthetic localisation set (``--data shapes``: four shapes with known boxes on a random
   textured background), through ``visionzoo.train.fit``.
2. On held-out images with their boxes: pointing-game accuracy of Grad-CAM (both models) and of attention
   rollout (the ViT) against the random baseline (the mean box-area fraction: a uniformly random point's hit
   rate); deletion and insertion AUC of every method against a random ranking of the pixels.
3. The robustness table of both models: shift consistency, corruption accuracy per severity, FGSM/PGD accuracy,
   random and adversarial 16x16 patches.

    PYTHONPATH=src python benchmarks/explain_acceptance.py [--out runs/explain_acceptance] [--epochs 40]

Runs on one thread (a shared 2-core machine): about 10 minutes of training, then a few minutes of evaluation;
``--skip-train`` reuses the trained weights in ``--out``. Prints the tables and the CPU model.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

MODELS = (("convnext_test", None), ("vit_test", 8))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def train(out: Path, epochs: int, n_train: int, n_val: int, only: str | None = None) -> None:
    from visionzoo.train.augment import AugConfig
    from visionzoo.train.loop import TrainConfig, build_model, fit, seed_everything
    from visionzoo.train.synthetic import shapes_splits

    splits = shapes_splits(n_train, n_val, 64, seed=0)
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, weight_decay=0.05, warmup_epochs=2, seed=0,
                      crop_pct=1.0, progress=False, aug=AugConfig(scale=(1.0, 1.0), hflip=0.5, smoothing=0.0))
    for name, patch in MODELS:
        if only and name != only:
            continue
        seed_everything(0)
        model = build_model(name, splits.num_classes, 3, 64, patch)
        t = time.perf_counter()
        res = fit(model, splits, cfg, out / name, log=lambda s, n=name: print(n, s, flush=True))
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M params, val top-1 "
              f"{res.metrics.top1:.1f}% after {epochs} epochs ({time.perf_counter() - t:.0f} s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/explain_acceptance")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--only", default=None, help="train only this model")
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-val", type=int, default=600)
    p.add_argument("--n-eval", type=int, default=200, help="held-out images for the explanation metrics")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    print(f"CPU: {cpu_model()}, torch {torch.__version__}, {args.threads} thread(s)", flush=True)
    if not args.skip_train:
        train(out, args.epochs, args.n_train, args.n_val, args.only)
    if "evaluate" in globals():
        evaluate(out, args)  # noqa: F821


if __name__ == "__main__":
    main()
