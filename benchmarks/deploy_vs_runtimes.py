"""Issue 11's fp32 targets, measured in one process: ours (torch-native) vs onnxruntime and OpenVINO.

    PYTHONPATH=src python benchmarks/deploy_vs_runtimes.py                          # the 4 named models, batch 1 and 32
    PYTHONPATH=src python benchmarks/deploy_vs_runtimes.py convnext_tiny -b 8 --threads 1 --no-inductor

For each model and batch size, ``visionzoo.deploy(backend="auto", cache=False)`` builds every backend (eager,
eager_tuned, inductor, torchscript, onnxruntime, openvino), checks each against eager fp32 (1e-4 relative) and times
them interleaved (A A, B B, ..., A A, ...; medians) for ``--budget`` seconds. From those medians it prints:

- torch-native / onnxruntime: the best of eager, eager_tuned, inductor and torchscript over onnxruntime (target >= 1.0);
- auto / max(onnxruntime, openvino): deploy's choice over the faster exported runtime (target >= 1.0);
- eager_tuned / eager: what the per-CPU Linear kernel and fuse() give over the model as given (>= 1.0).

Every line names the CPU, threads, the OpenMP wait policy and versions. On a shared machine the ratios are the
numbers to read (each pair was measured interleaved); absolute img/s are not.

Each candidate is timed in blocks (``deploy.time_interleaved``): a runtime's threads spin for a while after its
call, so the call after a switch is not counted. ``--omp-wait-policy`` sets how torch's idle OpenMP threads wait
(``benchmarks/_process.py``). On an AMD EPYC, 2 threads, quiet machine, ``passive`` cost torch 20-40% at batch 1
(eager_tuned: DeiT-S 18.3 -> 14.7 img/s, ResNet-50 22.7 -> 13.6).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from _process import POLICIES, policy_label, restart_with_settings

restart_with_settings()  # malloc keeps freed memory; OpenMP waits as --omp-wait-policy says (see _process.py)

import torch  # noqa: E402

import visionzoo  # noqa: E402
from visionzoo.deploy import deploy  # noqa: E402
from visionzoo.runtime.backends import BACKENDS, unavailable, versions  # noqa: E402
from visionzoo.runtime.cpu import cpu_info  # noqa: E402

MODELS = ["convnext_tiny", "swin_tiny_patch4_window7_224", "deit_small_patch16_224", "resnet50"]
TORCH_NATIVE = ("eager", "eager_tuned", "inductor", "torchscript")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:5.2f}" if a and b else "    -"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=MODELS)
    p.add_argument("--batch-size", "-b", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=10.0, help="seconds of interleaved timing per model and batch")
    p.add_argument("--no-inductor", action="store_true", help="skip torch.compile (minutes per model)")
    p.add_argument("--omp-wait-policy", choices=POLICIES, default="default",
                   help="how torch's idle OpenMP threads wait (see benchmarks/_process.py)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cands = tuple(b for b in BACKENDS if not (args.no_inductor and b == "inductor"))
    name, flags = cpu_info()
    print(f"CPU: {name} ({' '.join(flags)}); {args.threads} thread(s); {policy_label()}; "
          + ", ".join(f"{k} {v.split('-')[0]}" for k, v in versions().items()))
    missing = {b: why for b in cands if (why := unavailable(b, "fp32"))}
    for b, why in missing.items():
        print(f"  {b}: not measured: {why}")
    head = (f"{'model':30s} {'batch':>5s} " + " ".join(f"{b:>11s}" for b in cands)
            + "   native/ort  auto/max(ort,ov)  tuned/eager  auto")
    print("img/s (interleaved medians):\n" + head)
    rows = []
    for model_name in args.models:
        torch.manual_seed(0)
        model = visionzoo.create_model(model_name).eval()
        size = model.data_config["input_size"][-1]
        for bs in args.batch_size:
            x = torch.randn(bs, 3, size, size)
            t0 = time.perf_counter()
            try:
                rec = deploy(model, x, candidates=cands, budget=args.budget, cache=False).record
            except Exception as e:  # noqa: BLE001
                print(f"{model_name:30s} {bs:5d} error: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                continue
            ips = {c.backend: c.img_s for c in rec.candidates if c.dtype == "fp32" and c.img_s}
            native = max((ips[b] for b in TORCH_NATIVE if b in ips), default=None)
            exported = max((ips[b] for b in ("onnxruntime", "openvino") if b in ips), default=None)
            cells = " ".join(f"{ips[b]:11.2f}" if b in ips else f"{'-':>11s}" for b in cands)
            tuned = _ratio(ips.get("eager_tuned"), ips.get("eager"))
            print(f"{model_name:30s} {bs:5d} {cells}   {_ratio(native, ips.get('onnxruntime')):>10s}  "
                  f"{_ratio(ips.get(rec.backend), exported):>16s}  {tuned:>11s}"
                  f"  {rec.backend} ({time.perf_counter() - t0:.0f} s)", flush=True)
            for c in rec.candidates:
                if c.status in ("failed", "rejected", "unavailable"):
                    print(f"    {c.backend}: {c.status}: {c.reason[:200]}")
            rows.append(rec)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average at the end: {load}; ratios > 1 mean the first is faster. Targets (issue 11): native/ort "
          f">= 1.0 and auto/max(ort,ov) >= 1.0 at batch 1 and 32 for every model; tuned/eager >= 1.0.")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
