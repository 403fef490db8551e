"""``visionzoo bench | list | info | convert``: parse the arguments, then call the package."""
from __future__ import annotations

import argparse
import sys

import torch


def _console():
    """A rich console; when the output is a pipe or a file, wide lines rather than folded cells."""
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=max(con.width, 200))


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from visionzoo.bench.measure import BenchConfig, resolve_models, run
    from visionzoo.bench.report import summary_lines, table, write_all

    cfg = BenchConfig(batch_sizes=tuple(args.batch_size), img_size=args.img_size, dtype=args.dtype,
                      channels_last=args.channels_last, compile=args.compile, fuse=args.fuse, threads=args.threads,
                      device=args.device, mode=args.mode, repeats=args.repeats, budget=args.budget,
                      subprocess=not args.in_process, omp_wait_policy=args.omp_wait_policy,
                      compare_timm=args.compare_timm, roofline=args.roofline, timeout=args.timeout).validate()
    names, _ = resolve_models(args.pattern)
    con = _console()
    if not args.pattern:
        con.print(f"default line-up ({len(names)} models of about 4-5 GMACs): {', '.join(names)}")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=con, transient=True) as bar:
        task = bar.add_task(f"measuring {names[0] if names else ''}", total=len(names))

        def progress(name: str, i: int, n: int, rows: list) -> None:
            nxt = f"measuring {names[i + 1]}" if i + 1 < n else "done"
            bar.update(task, completed=i + 1, description=nxt)

        results = run(args.pattern, cfg, progress=progress)
    con.print(table(results))
    for line in summary_lines(results):
        con.print(line)
    if args.compare_timm:
        for note in sorted({r.timm_note for r in results if r.timm_note}):
            con.print(f"compare-timm: {note}")
    try:
        paths = write_all(results, args.out, plots=not args.no_plots)
    except ImportError as e:
        paths = write_all(results, args.out, plots=False)
        con.print(f"plots skipped: {e} (pip install matplotlib)")
    con.print("wrote " + ", ".join(paths.values()))
    if results.interrupted:
        return 130
    return 1 if results and all(r.status == "error" for r in results) else 0


def cmd_list(args: argparse.Namespace) -> int:
    from visionzoo.docs import COLUMNS, model_rows, models_markdown

    if args.markdown:
        print(models_markdown())
        return 0
    rows = model_rows(args.pattern or "*", include_test=args.test)
    if not rows:
        print(f"no model matches {args.pattern}; try `visionzoo list` for all", file=sys.stderr)
        return 1
    from rich.table import Table

    table = Table(title=f"{len(rows)} models (sources: `visionzoo info NAME` or docs/models.md)")
    for c in COLUMNS[:-1]:
        table.add_column(c, no_wrap=c == "model")
    for r in rows:
        table.add_row(*r[:-1])
    _console().print(table)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from rich.table import Table

    import visionzoo

    info = visionzoo.model_info(args.model)
    size = args.img_size or info["input_size"][-1]
    prof = visionzoo.profile(args.model, input_size=size, img_size=args.img_size)
    with torch.device("meta"):
        model = visionzoo.create_model(args.model, img_size=args.img_size)
    con = _console()
    con.print(f"[bold]{info['name']}[/bold]  family {info['family']} ({info['cls']}, {info['paper_ref']}), "
              f"kind {info['kind']}")
    con.print(f"structure: {info['args']}")
    con.print(f"input {size}x{size}, mean {info['mean']}, std {info['std']}, crop_pct {info['crop_pct']}, "
              f"{info['interpolation']}; any side >= {model.min_input_size} that is a multiple of "
              f"{model.input_multiple}")
    paper = info["paper"]
    t = Table(title="ours vs official vs paper")
    for c in ("", "ours", "official code", "paper"):
        t.add_column(c)
    t.add_row("params (M)", f"{prof.params_m:.3f}", _num(info["params_m"], 3), _num(paper["params_m"], 1))
    t.add_row(f"GMACs @{size}", f"{prof.gmacs:.3f}", _num(info["gmacs"], 3) if size == info["input_size"][-1]
              else "-", _num(paper["gmacs"], 2))
    t.add_row("GFLOPs", f"{prof.gflops:.3f}", "-", "-")
    t.add_row("activations (M)", f"{prof.mactivations:.2f}", "-", "-")
    t.add_row("top-1 (%)", "-", "-", _num(paper["top1"], 2))
    con.print(t)
    con.print(f"source: {paper['source'] or '-'}" + (f"\nnotes: {info['notes']}" if info["notes"] else ""))
    f = Table(title="features_only outputs")
    for c in ("index", "module", "channels", "stride", f"map @{size}"):
        f.add_column(c)
    for i, fi in enumerate(model.stage_info):
        f.add_row(str(i), fi.module, str(fi.channels), str(fi.reduction), f"{-(-size // fi.reduction)}")
    con.print(f)
    return 0


def _num(v: float | None, nd: int) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def cmd_convert(args: argparse.Namespace) -> int:
    from visionzoo.weights import convert

    out = convert(args.src, args.dst, args.model)
    print(f"wrote {out} ({args.model}, visionzoo format)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visionzoo", description="Vision backbones under one API, measured fairly.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("bench", help="params, MACs, throughput, latency and memory of models, side by side")
    s.add_argument("pattern", nargs="*", help="model names or fnmatch patterns; none = the default line-up")
    s.add_argument("--batch-size", "-b", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    s.add_argument("--img-size", type=int, default=None, help="input side (default: each model's own)")
    s.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    s.add_argument("--channels-last", action="store_true", help="NHWC weights and input")
    s.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile (optionally a mode, e.g. max-autotune); compile time reported apart")
    s.add_argument("--fuse", action="store_true", help="model.fuse(): deploy re-parameterisation")
    s.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    s.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    s.add_argument("--mode", choices=("infer", "train", "both"), default="infer",
                   help="inference, a training step (forward + backward + SGD step), or both")
    s.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    s.add_argument("--budget", type=float, default=3.0,
                   help="timed seconds per model, batch size and mode; sets the step count (default 3)")
    s.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"), default="passive",
                   help="OMP_WAIT_POLICY of the measuring process (passive: threads sleep instead of spinning; "
                        "far faster on a shared machine)")
    s.add_argument("--in-process", action="store_true",
                   help="measure in this process: faster start, but no CPU peak memory or crash isolation")
    s.add_argument("--timeout", type=float, default=None, help="seconds per model before it is given up")
    s.add_argument("--roofline", action="store_true",
                   help="measure the matmul peak and memory bandwidth; report model FLOP utilisation")
    s.add_argument("--compare-timm", action="store_true",
                   help="also time timm's model of the same name, interleaved, and print ours/timm")
    s.add_argument("--out", default="bench-results", help="folder for CSV, JSON and plots")
    s.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    s.set_defaults(func=cmd_bench)
    s = sub.add_parser("list", help="list registered models with their official and reported numbers")
    s.add_argument("pattern", nargs="*", help="fnmatch patterns, e.g. 'convnext_*'")
    s.add_argument("--test", action="store_true", help="include the tiny *_test variants")
    s.add_argument("--markdown", action="store_true", help="print docs/models.md")
    s.set_defaults(func=cmd_list)
    s = sub.add_parser("info", help="structure, params/MACs (ours, official, paper), feature strides")
    s.add_argument("model")
    s.add_argument("--img-size", type=int, default=None)
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("convert", help="convert a timm/official checkpoint to visionzoo format")
    s.add_argument("src")
    s.add_argument("dst", help="output path, .safetensors (or .pt)")
    s.add_argument("--model", required=True, help="registered model name")
    s.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"visionzoo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
