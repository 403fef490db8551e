"""The per-CPU kernel choice behind ``eager_tuned`` and the roofline's per-kernel peaks, printed for this machine.

    PYTHONPATH=src python benchmarks/kernels.py                 # 2 threads, fp32 and bf16
    PYTHONPATH=src python benchmarks/kernels.py --threads 1 --dtype fp32

For each op (Linear, Conv2d) it measures aten (torch's default path) against oneDNN with prepacked weights on
chains of distinct layers from the line-up's backbones (``visionzoo.runtime.kernels.CALIBRATION``), interleaved,
and prints GFLOP/s per case and the ratio oneDNN/aten: the measurement ``visionzoo.deploy`` and ``visionzoo bench``
(backend ``eager_tuned``) make once per CPU and cache. Then the square-matmul peak of each kernel (aten/MKL,
oneDNN, onnxruntime's MLAS, oneDNN bf16): the peaks MFU is taken against (``visionzoo bench --roofline``).
Measured afresh (the cache is neither read nor written).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from visionzoo.bench.roofline import kernel_peaks  # noqa: E402
from visionzoo.runtime.cpu import cpu_info, has_bf16  # noqa: E402
from visionzoo.runtime.kernels import OPS, measure_kernels  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    name, flags = cpu_info()
    print(f"CPU: {name} ({' '.join(flags)}); {args.threads} thread(s); torch {torch.__version__}")
    for dtype in args.dtype:
        if dtype == "bf16" and not has_bf16():
            print("bf16: this CPU has no bf16 hardware; skipped")
            continue
        for op in OPS:
            c = measure_kernels(op, dtype, rounds=args.rounds)
            print(f"\n{c.summary()}\n  {'case':44s} {'aten':>8s} {'onednn':>8s} {'onednn/aten':>11s}")
            for label, a, o in zip(c.cases, c.gflops["aten"], c.gflops.get("onednn", [None] * len(c.cases))):
                ratio = f"{o / a:11.2f}" if o else f"{'-':>11s}"
                print(f"  {label:44s} {a:8.1f} {o or 0:8.1f} {ratio}")
    peaks = kernel_peaks()
    best = max((v, k) for k, v in peaks.items() if k.endswith("fp32"))
    print("\nsquare 2048 matmul peaks, GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
          + f"; best fp32 kernel: {best[1]} ({best[0] / peaks['aten_fp32']:.2f}x aten)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
