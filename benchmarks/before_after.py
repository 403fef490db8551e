"""Eager img/s of the default line-up under two checkouts of visionzoo, interleaved: A, B, A, B, ...

    python benchmarks/before_after.py --before /path/to/old/src [--after src] [-b 8] [--rounds 2]

Each measurement runs in a fresh process (one thread by default, so that a loaded machine distorts the two sides
alike) with the same model, seed and input; the rounds alternate the two checkouts, and the medians are
compared. Prints after/before per model and the CPU model. Used for the seams issue (10): no family slower.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
import visionzoo
torch.manual_seed(0)
m = visionzoo.create_model(sys.argv[1]).eval()
x = torch.randn(int(sys.argv[2]), 3, *m.data_config["input_size"][1:])
budget = float(sys.argv[4])
with torch.inference_mode():
    m(x); m(x)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < budget:
        m(x); n += 1
print(json.dumps({"img_s": n * x.shape[0] / (time.perf_counter() - t0)}))
"""


def measure(src: str, name: str, batch: int, threads: int, budget: float) -> float:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src), "OMP_WAIT_POLICY": "PASSIVE",
           "MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}
    out = subprocess.run([sys.executable, "-c", CHILD, name, str(batch), str(threads), str(budget)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["img_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="default: the bench line-up")
    p.add_argument("--before", required=True, help="src folder of the earlier checkout")
    p.add_argument("--after", default="src")
    p.add_argument("-b", "--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=float, default=1.5)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    sys.path.insert(0, os.path.abspath(args.after))
    from visionzoo.bench.runner import default_lineup
    from visionzoo.bench.system import cpu_info

    names = args.models or default_lineup()
    print(f"CPU: {cpu_info()[0]}; batch {args.batch}, {args.threads} thread(s), {args.rounds} rounds, eager fp32")
    print(f"{'model':32s} {'before':>8s} {'after':>8s} {'after/before':>12s}")
    worst = []
    for name in names:
        a, b = [], []
        for _ in range(args.rounds):
            a.append(measure(args.before, name, args.batch, args.threads, args.budget))
            b.append(measure(args.after, name, args.batch, args.threads, args.budget))
        ra, rb = statistics.median(a), statistics.median(b)
        worst.append(rb / ra)
        print(f"{name:32s} {ra:8.2f} {rb:8.2f} {rb / ra:12.2f}", flush=True)
    print(f"geometric mean after/before: {statistics.geometric_mean(worst):.3f}; lowest {min(worst):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
