"""``visionzoo list | info | convert``: parse the arguments, then call the package."""
from __future__ import annotations

import argparse
import sys

import torch


def _console():
    from rich.console import Console

    return Console()


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

    table = Table(title=f"{len(rows)} models")
    for c in COLUMNS:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*r)
    _console().print(table)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import visionzoo
    from rich.table import Table

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
