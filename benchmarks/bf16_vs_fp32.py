"""Issue 11's bf16 targets, measured in one process: speed against eager fp32, and top-1 agreement with fp32 on
a model trained here.

    PYTHONPATH=src python benchmarks/bf16_vs_fp32.py                       # train on digits, then both parts
    PYTHONPATH=src python benchmarks/bf16_vs_fp32.py --checkpoint runs/digits/model.safetensors --threads 1

1. Agreement: a ``--train-model`` trained on scikit-learn's digits (``visionzoo train``, 32 px; or a
   ``--checkpoint`` of an earlier run) is deployed in bf16 on every backend that runs bf16 here; each one's
   top-1 on the whole validation split is compared with eager fp32's, image by image (target >= 99% agreement).
2. Speed: each ``--models`` entry (random weights: speed does not depend on them) at ``--batch-size``:
   ``visionzoo.deploy(dtype="bf16", backend="auto", allow_slower=True)`` times every bf16 backend interleaved with
   eager fp32 and eager_tuned fp32. Printed: best bf16 / eager fp32 (target >= 2x on bf16 hardware) and best
   bf16 / best torch fp32 (what bf16 adds over the tuned fp32 path).

Where the CPU has no bf16 hardware (no avx512_bf16/AMX/Arm BF16 flag) the script says so and stops: deploy refuses
bf16 there.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _process import POLICIES, policy_label, restart_with_settings

restart_with_settings()  # malloc keeps freed memory; OpenMP waits as --omp-wait-policy says (see _process.py)

import torch  # noqa: E402

import visionzoo  # noqa: E402
from visionzoo.deploy import deploy  # noqa: E402
from visionzoo.runtime.backends import BACKENDS, unavailable, versions  # noqa: E402
from visionzoo.runtime.cpu import cpu_info, has_bf16  # noqa: E402

MODELS = ["convnext_tiny", "swin_tiny_patch4_window7_224", "deit_small_patch16_224", "resnet50"]


def _bf16_backends(no_inductor: bool) -> tuple[str, ...]:
    return tuple(b for b in BACKENDS if not unavailable(b, "bf16") and not (no_inductor and b == "inductor"))


def agreement(args: argparse.Namespace) -> None:
    from visionzoo.cli import main as cli
    from visionzoo.train.augment import Normalize, channel_stats
    from visionzoo.train.data import load_data, make_loaders
    from visionzoo.train.evaluate import load_trained

    ckpt = args.checkpoint
    if ckpt is None:
        out = Path(args.out or tempfile.mkdtemp(prefix="visionzoo-bf16-"))
        print(f"training {args.train_model} on digits ({args.epochs} epochs, 32 px) into {out} ...", flush=True)
        rc = cli(["train", "--model", args.train_model, "--data", "digits", "--img-size", "32", "--epochs",
                  str(args.epochs), "--hflip", "0", "--no-progress", "--out", str(out)])
        if rc:
            raise SystemExit(f"training failed (exit code {rc})")
        ckpt = out / "model.safetensors"
    model, meta = load_trained(ckpt)
    splits = load_data("digits", in_chans=model.in_chans)
    dc = model.data_config
    _, val = make_loaders(splits, dc["input_size"][-1], 256, crop_pct=dc["crop_pct"], interpolation=dc["interpolation"])
    norm = Normalize(*channel_stats(dc["mean"], dc["std"], model.in_chans))
    xs, ys = zip(*[(norm(x), y) for x, y in val])
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.inference_mode():
        ref = model(x).argmax(-1)
    print(f"{model.name} from {ckpt}: eager fp32 top-1 {100 * (ref == y).float().mean():.2f}% on {len(y)} "
          f"validation images")
    for b in _bf16_backends(args.no_inductor):
        try:
            fast = deploy(model, x[:32], backend=b, dtype="bf16", budget=0, allow_slower=True, cache=False)
            got = torch.cat([fast(x[i:i + 32]) for i in range(0, len(x), 32)]).argmax(-1)
        except Exception as e:  # noqa: BLE001
            print(f"  {b:12s} bf16: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        agree = (got == ref).float().mean().item()
        print(f"  {b:12s} bf16: top-1 agreement with fp32 {100 * agree:.2f}% ({int((got != ref).sum())} of {len(y)} "
              f"differ), top-1 {100 * (got == y).float().mean():.2f}%  [{'ok' if agree >= 0.99 else 'BELOW 99%'}]")


def speed(args: argparse.Namespace) -> None:
    cands = _bf16_backends(args.no_inductor)
    print(f"speed at batch {args.batch_size}, img/s (interleaved medians); bf16 candidates {', '.join(cands)}")
    print(f"{'model':30s} {'eager fp32':>10s} {'tuned fp32':>10s} {'best bf16':>10s}  {'bf16/eager':>10s} "
          f"{'bf16/tuned':>10s}  bf16 backend")
    for name in args.models:
        torch.manual_seed(0)
        model = visionzoo.create_model(name).eval()
        s = model.data_config["input_size"][-1]
        x = torch.randn(args.batch_size, 3, s, s)
        try:
            rec = deploy(model, x, dtype="bf16", candidates=cands, budget=args.budget, allow_slower=True,
                         cache=False).record
        except Exception as e:  # noqa: BLE001
            print(f"{name:30s} error: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        ips = {(c.backend, c.dtype): c.img_s for c in rec.candidates if c.img_s}
        eager, tuned = ips.get(("eager", "fp32")), ips.get(("eager_tuned", "fp32"))
        best = ips.get((rec.backend, "bf16"))
        mark = "" if best and eager and best / eager >= 2 else "  (below the 2x target)"
        print(f"{name:30s} {eager or 0:10.2f} {tuned or 0:10.2f} {best or 0:10.2f}  {best / eager:10.2f} "
              f"{best / tuned if tuned else float('nan'):10.2f}  {rec.backend}, rel diff {rec.rel_diff:.1e}{mark}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--batch-size", "-b", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=10.0, help="seconds of interleaved timing per model")
    p.add_argument("--no-inductor", action="store_true", help="skip torch.compile (minutes per model)")
    p.add_argument("--train-model", default="convnext_atto", help="the model trained on digits for agreement")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint instead of training one")
    p.add_argument("--out", default=None, help="where training writes (default: a temporary folder)")
    p.add_argument("--skip", choices=("agreement", "speed"), default=None)
    p.add_argument("--omp-wait-policy", choices=POLICIES, default="default",
                   help="how torch's idle OpenMP threads wait (see benchmarks/_process.py)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    name, flags = cpu_info()
    print(f"CPU: {name} ({' '.join(flags)}); {args.threads} thread(s); {policy_label()}; "
          + ", ".join(f"{k} {v.split('-')[0]}" for k, v in versions().items()))
    if not has_bf16():
        print("this CPU has no bf16 hardware: visionzoo.deploy refuses dtype='bf16' here (bf16 would be emulated)")
        return 0
    if args.skip != "agreement":
        agreement(args)
    if args.skip != "speed":
        speed(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
