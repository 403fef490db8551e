"""What each oneDNN Graph rewrite of the ``torchscript`` deploy backend is worth: the plan with every rewrite, and
with one left out, timed interleaved in one process (``visionzoo.runtime.llga``).

A plan that a left-out rewrite breaks (it fails to compile, or differs from eager by more than 1e-4) is shown as
failed or with its difference: that is what the rewrite is for. The GELU rewrite left out means oneDNN's own
tanh-GELU, whose speed is shown next to its 1-2e-4 error.

    python benchmarks/llga_rewrites.py rmt_small t2t_vit_14 maxvit_tiny_tf_224 -b 1 32
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _process import policy_label, restart_with_settings  # noqa: E402

restart_with_settings()

import torch  # noqa: E402

import visionzoo  # noqa: E402
from visionzoo.runtime import llga  # noqa: E402
from visionzoo.runtime.backends import agreement  # noqa: E402
from visionzoo.runtime.cpu import cpu_info  # noqa: E402
from visionzoo.runtime.kernels import best_seconds  # noqa: E402

VARIANTS = ("all", "no dense_inputs", *(f"no {name}" for name, _ in llga.REWRITES if name != "constant_operands"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--batch-size", "-b", type=int, nargs="+", default=[1])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--omp-wait-policy", choices=("default", "passive"), default="default")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu, flags = cpu_info()
    print(f"CPU: {cpu} ({' '.join(flags)}); {args.threads} thread(s); {policy_label()}; "
          f"torch {torch.__version__}")
    print("img/s, interleaved best of rounds; in brackets the ratio to 'all' (> 1: the rewrite helps); "
          "a relative difference from eager over 1e-4 is shown")
    print(f"{'model':28s} {'batch':>5s} " + " ".join(f"{v:>24s}" for v in ("eager", *VARIANTS)))
    for name in args.models:
        model = visionzoo.create_model(name).eval()
        model = model.fuse() or model if callable(getattr(model, "fuse", None)) else model
        size = visionzoo.get_variant(name).input_size
        for b in args.batch_size:
            x = torch.randn(b, 3, size, size)
            if getattr(model, "cpu_channels_last", False):
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                ref = model(x)
            fns, notes = {"eager": lambda model=model, x=x: model(x)}, {}
            for v in VARIANTS:
                try:
                    m, _ = llga.plan(model, x, dense=v != "no dense_inputs",
                                     skip=(v[3:],) if v.startswith("no ") and v != "no dense_inputs" else ())
                except Exception as e:  # noqa: BLE001  (a rewrite left out may make the plan fail: that is the point)
                    notes[v] = f"failed ({type(e).__name__})"
                    continue
                with torch.no_grad():
                    rel, _ = agreement(m(x), ref)
                notes[v] = f"{rel:.0e} off" if rel > 1e-4 else ""
                fns[v] = lambda m=m, x=x: m(x)
            with torch.no_grad():
                t = best_seconds(fns, rounds=args.rounds, sample_s=0.5)
            cells = []
            for v in ("eager", *VARIANTS):
                if v not in t:
                    cells.append(f"{notes[v]:>24s}")
                    continue
                ratio = f" ({t[v] / t['all']:.2f})" if v.startswith("no ") else ""
                cells.append(f"{(b / t[v]):>8.2f}{ratio} {notes.get(v, '')}".rjust(24))
            print(f"{name:28s} {b:>5d} " + " ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
