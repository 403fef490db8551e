"""Ours vs timm, same architecture, same process, interleaved run by run: the numbers behind the README.

Run it with a Python that has timm (the measuring child uses this interpreter):

    PYTHONPATH=src /path/to/python-with-timm benchmarks/bench_vs_timm.py            # eager fp32
    PYTHONPATH=src /path/to/python-with-timm benchmarks/bench_vs_timm.py --deploy   # fuse + channels-last + compile

Each model is measured in a fresh child process with OMP_WAIT_POLICY=PASSIVE and 2 threads; ``ours/timm`` > 1
means ours is faster. Results also go to bench-results/vs_timm[_deploy].{csv,json}.
"""
from __future__ import annotations

import argparse
import sys

from visionzoo.bench import BenchConfig, run
from visionzoo.bench.report import summary_lines, write_all

MODELS = ["convnext_tiny", "swin_tiny_patch4_window7_224", "deit_small_patch16_224", "resnet50"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=MODELS)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=5.0)
    p.add_argument("--deploy", action="store_true", help="ours: fuse + channels-last + compile; timm: the same "
                   "minus fuse (timm has no common fuse)")
    p.add_argument("--backend", default="eager", choices=("eager", "eager_tuned"),
                   help="eager: both models as given (default); eager_tuned: both after fuse() with each Linear and "
                        "Conv2d on the kernel measured fastest here (timm's model gets the same generic swap)")
    p.add_argument("--out", default="bench-results")
    args = p.parse_args()
    try:
        import timm
    except ImportError as e:
        print(f"bench_vs_timm: timm cannot be imported in {sys.executable} ({e}); run it with a Python that has timm")
        return 2
    cfg = BenchConfig(batch_sizes=tuple(args.batch_size), threads=args.threads, repeats=args.repeats,
                      budget=args.budget, omp_wait_policy="passive", compare_timm=True, roofline=True,
                      fuse=args.deploy, channels_last=args.deploy, compile="default" if args.deploy else None,
                      backend="eager" if args.deploy else args.backend)
    res = run(args.models, cfg, progress=lambda name, i, n, rows: print(f"[{i + 1}/{n}] {name} done", flush=True))
    what = "deploy (fuse, channels-last, compile)" if args.deploy else f"{args.backend} fp32"
    print(f"\ntimm {timm.__version__}; {what}")
    print(f"{'model':32s} {'batch':>5s} {'ours img/s':>11s} {'timm img/s':>11s} {'ours/timm':>9s} {'MFU':>6s}  note")
    for r in res:
        if r.status == "error":
            print(f"{r.model:32s} error: {r.error}")
            continue
        mfu = "-" if r.infer_mfu is None else f"{r.infer_mfu:.2f}"
        note = "CONTENDED" if r.status == "contended" else (r.timm_note if r.ratio_vs_timm is None else "")
        timm_ips = r.timm_infer_samples_per_sec or float("nan")
        ratio = r.ratio_vs_timm or float("nan")
        print(f"{r.model:32s} {r.infer_batch_size:5d} {r.infer_samples_per_sec:11.2f} {timm_ips:11.2f} "
              f"{ratio:9.2f} {mfu:>6s}  {note}")
    for line in summary_lines(res):
        print(line)
    name = "vs_timm_deploy" if args.deploy else "vs_timm"
    try:
        paths = write_all(res, args.out, name=name)
    except ImportError:
        paths = write_all(res, args.out, name=name, plots=False)
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
