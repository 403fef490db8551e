"""Real int8 on this CPU: torchao (PT2E static, dynamic linears) and onnxruntime (static QDQ, dynamic) against our
fp32 eager and compiled models, timed interleaved in one process at batch 16; agreement and logit SQNR vs fp32.

Target (issue "Quantization and pruning"): real int8 >= 1.5x our fp32 eager for the ViTs of the line-up; and say
where int8 loses. Random weights (speed does not depend on them); agreement is measured on random images, where a
random-weight model's top classes are close, so it is a strict fidelity measure.

    python benchmarks/compress_int8.py --models deit_small_patch16_224 convnext_tiny --threads 2
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import visionzoo  # noqa: E402
from visionzoo.compress.int8 import (  # noqa: E402
    _compile,
    export_fp32,
    ort_dynamic,
    ort_runner,
    ort_static,
    torchao_dynamic,
    torchao_static,
)
from visionzoo.compress.quantizers import sqnr_db  # noqa: E402
from visionzoo.compress.report import agreement, predict, time_interleaved  # noqa: E402


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _builders(model: torch.nn.Module, calib: list[torch.Tensor], work: str, fp32_path: str) -> dict:
    return {
        "fp32 eager": lambda: model,
        "fp32 compiled": lambda: _compile(copy.deepcopy(model)),
        "torchao int8 static": lambda: torchao_static(model, calib).run,
        "torchao int8 dynamic": lambda: torchao_dynamic(model).run,
        "onnxruntime fp32": lambda: ort_runner(fp32_path),
        "onnxruntime int8 dynamic": lambda: ort_dynamic(model, work, fp32_path).run,
        "onnxruntime int8 static": lambda: ort_static(model, calib, work, fp32_path).run,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "convnext_tiny"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=6.0, help="timed seconds per row (over 3 interleaved rounds)")
    p.add_argument("--eval-n", type=int, default=32)
    p.add_argument("--skip", nargs="*", default=[], help="rows to skip, e.g. 'fp32 compiled'")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}, batch {args.batch}, load average "
          f"{os.getloadavg()[0]:.1f}")
    for name in args.models:
        torch.manual_seed(0)
        model = visionzoo.create_model(name).eval()
        size = model.data_config["input_size"][-1]
        g = torch.Generator().manual_seed(0)
        calib = [torch.randn(args.batch, 3, size, size, generator=g) for _ in range(2)]
        x_eval = torch.randn(args.eval_n, 3, size, size, generator=g)
        work = tempfile.mkdtemp(prefix=f"int8-{name}-")
        t0 = time.time()
        fp32_path = export_fp32(model, os.path.join(work, "model.fp32.onnx"))
        builders = _builders(model, calib, work, fp32_path)
        runs, notes = {}, {}
        for row, build in builders.items():
            if row in args.skip:
                continue
            t1 = time.time()
            try:
                runs[row] = build()
                notes[row] = f"built in {time.time() - t1:.0f} s"
            except Exception as e:  # noqa: BLE001
                notes[row] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        ref = predict(model, x_eval, args.batch)
        fidelity = {}
        for row, run in runs.items():
            logits = predict(run, x_eval, args.batch)
            fidelity[row] = (agreement(logits, ref), sqnr_db(ref, logits))
        rates = time_interleaved(runs, calib[0], args.budget)
        eager = rates["fp32 eager"]
        print(f"\n{name} ({size} px; set-up {time.time() - t0:.0f} s)")
        print("| path | img/s | vs fp32 eager | agreement % | logit SQNR dB | note |\n|---|---|---|---|---|---|")
        for row in builders:
            if row in rates:
                agr, sq = fidelity[row]
                print(f"| {row} | {rates[row]:.1f} | {rates[row] / eager:.2f}x | {100 * agr:.1f} | "
                      f"{sq:.1f} | {notes[row]} |")
            elif row in notes:
                print(f"| {row} | - | - | - | - | {notes[row]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
