"""Simulated quantization (and 2:4 sparsity) of models trained here: top-1, agreement with fp32, per-layer SQNR.

Targets (issue "Quantization and pruning"): W8A8 top-1 within 0.5 points of fp32 on the trained DeiT and ConvNeXt;
W4A4 with the log quantizers better than uniform W4A4. The models are trained with ``visionzoo train`` on the
bundled digits (32 px, 1 channel, the recipe of benchmarks/train_digits.py), or read from ``--checkpoints``:

    visionzoo train --model deit_tiny_patch16_224 --img-size 32 --patch-size 8 --epochs 15 --lr 1e-3 --scale 0.7 \\
        --clip-grad 1 --hflip 0 --out runs/deit      # and the same for convnext_atto and cvt_13 (no --patch-size)
    python benchmarks/compress_quant.py --checkpoints runs/deit/model.safetensors runs/atto/model.safetensors \\
        runs/cvt/model.safetensors
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from visionzoo.compress import quantize  # noqa: E402
from visionzoo.compress.data import calibration_batches, labelled_images  # noqa: E402
from visionzoo.compress.mixed import mixed_precision  # noqa: E402
from visionzoo.compress.prune import semi_structured_2_4, sparsity  # noqa: E402
from visionzoo.compress.quantize import QuantConfig  # noqa: E402
from visionzoo.compress.report import agreement, layer_sqnr, predict, top1  # noqa: E402
from visionzoo.train.evaluate import load_trained  # noqa: E402

SCHEMES = ("w8a8", "w6a6", "w4a4", "w4a4-log2", "w4a4-logsqrt2", "w4a4-adalog", "w4a4-twin")


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def train(name: str, out: str, patch_size: int | None) -> str:
    from visionzoo.train.augment import AugConfig
    from visionzoo.train.data import load_data
    from visionzoo.train.loop import TrainConfig, build_model, fit, seed_everything

    splits = load_data("digits")
    seed_everything(0)
    model = build_model(name, splits.num_classes, splits.in_chans, 32, patch_size)
    cfg = TrainConfig(epochs=15, batch_size=64, lr=1e-3, clip_grad=1.0, progress=False,
                      aug=AugConfig(scale=(0.7, 1.0), hflip=0.0)).validate()
    return fit(model, splits, cfg, out).files["model"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", nargs="*", default=None, help="model.safetensors files from visionzoo train")
    p.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "convnext_atto", "cvt_13"],
                   help="trained here when --checkpoints is not given")
    p.add_argument("--calib-n", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench-results/compress_quant")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = args.checkpoints or [train(m, f"{args.out}/{m}", 8 if m.startswith(("deit", "vit")) else None)
                                 for m in args.models]
    print(f"{cpu_name()}, {args.threads} thread(s), torch {torch.__version__}; digits 32 px, calibration "
          f"{args.calib_n} training images, evaluation on the whole validation split")
    summary = []
    for path in paths:
        t0 = time.time()
        model, _ = load_trained(path)
        calib = calibration_batches("digits", model, n=args.calib_n)
        x, y = labelled_images("digits", model, split="val")
        ref = predict(model, x)
        fp = top1(ref, y)
        rows = [("fp32", fp, 1.0, float("inf"))]
        for scheme in SCHEMES:
            qm = quantize(model, scheme, calib)
            logits = predict(qm, x)
            s = layer_sqnr(model, qm, x[:8])
            rows.append((scheme, top1(logits, y), agreement(logits, ref), sum(s.values()) / len(s)))
        bits = mixed_precision(model, calib, budget=6.0, bits=(4, 8))
        qm = quantize(model, QuantConfig(layer_bits=bits), calib)
        logits = predict(qm, x)
        s = layer_sqnr(model, qm, x[:8])
        share = sum(1 for b, _ in bits.values() if b == 8) / len(bits)
        rows.append((f"mixed 4/8, mean 6 bits ({share:.0%} of layers at 8)", top1(logits, y), agreement(logits, ref),
                     sum(s.values()) / len(s)))
        sparse = semi_structured_2_4(model)
        nz, total = sparsity(sparse)
        logits = predict(sparse, x)
        rows.append((f"2:4 sparse (no fine-tuning), {nz / 1e6:.3f}M of {total / 1e6:.3f}M non-zero",
                     top1(logits, y), agreement(logits, ref), float("nan")))
        print(f"\n{model.name} ({path}), {time.time() - t0:.0f} s")
        print("| scheme | top-1 % | agreement % | mean layer SQNR dB |\n|---|---|---|---|")
        for name, acc, agr, sq in rows:
            print(f"| {name} | {acc:.2f} | {100 * agr:.2f} | {sq:.1f} |")
        res = {r[0]: r[1] for r in rows}
        best_log = max(("w4a4-log2", "w4a4-logsqrt2", "w4a4-adalog"), key=lambda k: res[k])
        summary.append(f"{model.name}: W8A8 {res['w8a8'] - fp:+.2f} points vs fp32 "
                       f"({'PASS' if abs(res['w8a8'] - fp) <= 0.5 else 'FAIL'} within 0.5); W4A4 best log quantizer "
                       f"({best_log}) {res[best_log] - res['w4a4']:+.2f} points vs uniform W4A4")
    print("\n" + "\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
