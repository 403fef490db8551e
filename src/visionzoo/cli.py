"""``visionzoo bench | list | info | convert | export | compress | train | eval | compare | explain | robust``:
parse arguments, call the package."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from visionzoo.backbone import require_logits
from visionzoo.errors import ArgumentError, NotFoundError, VisionZooError

if TYPE_CHECKING:
    from visionzoo.train.data import DataSplits


def _console():
    """A rich console; when the output is a pipe or a file, wide lines rather than folded cells."""
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=max(con.width, 200))


def _bench_dense(args: argparse.Namespace) -> int:
    """``bench --task seg|det|sr --head H PATTERN...``: backbone + head at the task's usual input, interleaved."""
    from rich.table import Table

    import visionzoo
    from visionzoo.bench.system import cpu_info
    from visionzoo.heads import HEADS
    from visionzoo.train.dense_compare import bench_dense
    from visionzoo.train.metrics import write_csv

    heads = sorted(h for h, (t, _, _) in HEADS.items() if t == args.task)
    head = args.head or heads[-1 if args.task == "seg" else 0]
    if head not in heads:
        raise ArgumentError(f"--head {head} is not a {args.task} head; choose one of {heads}")
    if not args.pattern:
        raise ArgumentError(f"bench --task {args.task} needs model names or patterns")
    names = visionzoo.list_models(args.pattern)
    if not names:
        raise ArgumentError(f"no model matches {' '.join(args.pattern)}; see `visionzoo list`")
    if args.threads:
        torch.set_num_threads(args.threads)
    bs = (args.batch_size or [1])[0]
    rows = bench_dense(names, args.task, head, args.img_size, bs, dim=args.head_dim, budget=args.budget or 2.0)
    size = args.img_size or {"seg": 512, "det": 640, "sr": 256}[args.task]
    t = Table(title=f"{args.task} + {head} at {size}x{size}, batch {bs}, fp32 eager, {torch.get_num_threads()} "
                    f"thread(s) on {cpu_info()[0]} (interleaved in one process)")
    for c in ("model", "kind", "params (M)", "GMACs", "img/s", "ms/batch"):
        t.add_column(c)
    for r in rows:
        t.add_row(r.model, r.kind, f"{r.params_m:.2f}", f"{r.gmacs:.2f}",
                  f"{r.img_per_s:.2f}" + (" (contended)" if r.contended else ""), f"{r.metrics['ms_per_batch']:.1f}")
    _console().print(t)
    if args.out:
        path = write_csv([r.table_row() for r in rows], Path(args.out) / f"bench_{args.task}.csv")
        print(f"wrote {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.task is not None:
        return _bench_dense(args)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from visionzoo.bench.report import BACKEND_NOTES, output_folder, summary_lines, table, update_latest, write_all
    from visionzoo.bench.runner import resolve_models, run
    from visionzoo.bench.schema import BenchConfig

    cfg = BenchConfig(batch_sizes=args.batch_size and tuple(args.batch_size), img_size=args.img_size,
                      dtype=args.dtype, backend=args.backend, channels_last=args.channels_last, compile=args.compile,
                      fuse=args.fuse, deploy=args.deploy, freeze=not args.no_freeze, threads=args.threads,
                      device=args.device, mode=args.mode, repeats=args.repeats, budget=args.budget,
                      subprocess=not args.in_process, omp_wait_policy=args.omp_wait_policy, malloc_policy=args.malloc,
                      compare_timm=args.compare_timm, roofline=args.roofline, timeout=args.timeout,
                      candidates=args.candidates and tuple(args.candidates), tokens=args.tokens, quant=args.quant)
    names, _ = resolve_models(args.pattern)
    con = _console()
    backend = copy.deepcopy(cfg).resolved().backend
    on = (f"on backend {backend}: {BACKEND_NOTES[backend]}" if backend in BACKEND_NOTES else
          "on backend auto: visionzoo.deploy's fastest per model (rows then compare deployments, not architectures)")
    if not args.pattern:
        con.print(f"default line-up ({len(names)} models of about 4-5 GMACs) {on}: {', '.join(names)}")
    else:
        con.print(f"{len(names)} model(s) {on}")
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
    out = output_folder(args.out)
    try:
        paths = write_all(results, out, plots=not args.no_plots)
    except ImportError as e:
        paths = write_all(results, out, plots=False)
        con.print(f"plots skipped: {e} (pip install matplotlib)")
    if args.out is None and update_latest(out, results):
        con.print(f"wrote {', '.join(paths.values())} (also {os.path.join(os.path.dirname(out), 'latest')})")
    else:
        con.print("wrote " + ", ".join(paths.values()))
    if results.interrupted:
        return 130
    return 1 if results and all(r.status == "error" for r in results) else 0


def _model_or_checkpoint(spec: str, img_size: int | None = None):  # noqa: ANN202
    """A registered name (random weights) or a checkpoint of ours (``.safetensors``); says which it built."""
    import visionzoo

    if os.path.exists(spec):
        return visionzoo.load_model(spec), f"weights from {spec}"
    if spec.endswith((".safetensors", ".pt", ".pth", ".bin")):
        raise NotFoundError(f"checkpoint {spec!r} does not exist; give a checkpoint path or a model name "
                                f"(`visionzoo list`)")
    kwargs = {} if img_size is None else {"img_size": img_size}
    return visionzoo.create_model(spec, **kwargs), "random weights (give a checkpoint to export trained ones)"


def cmd_export(args: argparse.Namespace) -> int:
    import visionzoo.export as export

    model, what = _model_or_checkpoint(args.model, args.img_size)
    if args.fuse:
        model.eval().fuse()
    batch = args.batch if args.batch == "dynamic" else int(args.batch)
    print(f"exporting {model.name} ({what}) to {args.format}...", flush=True)
    if args.format == "onnx":
        report = export.onnx(model, args.out, img_size=args.img_size, batch=batch, opset=args.opset,
                             time_budget=args.time)
    else:
        report = export.pt2(model, args.out, img_size=args.img_size, batch=batch, time_budget=args.time)
    print(report.summary())
    return 0


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

    table = Table(title=f"{len(rows)} model{'s' * (len(rows) != 1)} (sources: `visionzoo info NAME` or docs/models.md)")
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
    from visionzoo.pretrained import no_weights_reason, weight_specs

    specs = weight_specs(args.model)
    if specs:
        w = specs[0]
        con.print(f"pretrained=True: {w.name} ({_source(w)}, {w.license}, top-1 {w.top1:.2f} at {w.top1_img_size} px); "
                  f"{len(specs)} weights file(s): `visionzoo weights {args.model}`")
    else:
        con.print(f"pretrained weights: none ({no_weights_reason(args.model)})")
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


def _friendly_import(fn):  # noqa: ANN001, ANN202
    """A missing optional package ends with one line (as the train commands do)."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ImportError as e:
            print(f"visionzoo {args.command}: error: {e}", file=sys.stderr)
            return 2
    return run


@_friendly_import
def cmd_compress(args: argparse.Namespace) -> int:
    from visionzoo.compress.pipeline import compress

    if args.threads:
        torch.set_num_threads(args.threads)
    quant = [q for item in args.quant for q in item.split(",") if q]
    report = compress(args.model, out_dir=args.out, prune=args.prune, prune_importance=args.importance,
                      prune_engine=args.engine, sparse_2_4=args.sparse_2_4, fuse=args.fuse, quant=quant,
                      calib=args.calib, calib_n=args.calib_n, eval_n=args.eval_n, data_dir=args.data_dir,
                      img_size=args.img_size, batch_size=args.batch_size, budget=args.budget,
                      progress=lambda s: print(s, flush=True))
    print(report.markdown())
    print("wrote " + ", ".join(report.files.values()))
    return 0


# --- train | eval | compare ---------------------------------------------------------------------------------
def _img_size(value: str) -> int | str:
    if value == "native":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--img-size takes an integer or 'native', got {value!r}") from None


def _model_args(items: list[str]) -> dict:
    import ast

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ArgumentError(f"--model-arg takes KEY=VALUE (e.g. depth=6), got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _load_splits(args: argparse.Namespace, in_chans: int | None = None):  # noqa: ANN202
    from visionzoo.train.data import load_data

    return load_data(args.data, data_dir=args.data_dir, in_chans=in_chans or args.in_chans, val_split=args.val_split,
                     seed=args.seed, limit_train=args.limit_train, limit_val=args.limit_val)


def _resolve_img_size(args: argparse.Namespace, splits) -> int | None:  # noqa: ANN001
    if args.img_size != "native":
        return args.img_size
    h_w = splits.image_size
    if h_w is None or h_w[0] != h_w[1]:
        raise ArgumentError(f"--img-size native needs square images of one size; {splits.name} has "
                            f"{h_w or 'several sizes'}; pass --img-size N to resize them")
    return h_w[0]


def _train_config(args: argparse.Namespace):  # noqa: ANN202
    from visionzoo.train.augment import AugConfig
    from visionzoo.train.loop import TrainConfig

    aug = AugConfig(scale=(args.scale, 1.0), hflip=args.hflip, color_jitter=args.color_jitter,
                    auto_augment=args.auto_augment, mixup=args.mixup, cutmix=args.cutmix, smoothing=args.smoothing)
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, opt=args.opt, lr=args.lr,
                       weight_decay=args.weight_decay, momentum=args.momentum, layer_decay=args.layer_decay,
                       sam=args.sam, sam_rho=args.sam_rho, warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
                       ema=args.ema, ema_decay=args.ema_decay, clip_grad=args.clip_grad, accum_steps=args.accum_steps,
                       tract=getattr(args, "tract", None),
                       amp=args.amp, grad_checkpointing=args.grad_checkpointing, seed=args.seed,
                       deterministic=not args.nondeterministic, crop_pct=args.crop_pct, workers=args.workers,
                       stop_after=args.stop_after, progress=not args.no_progress, aug=aug).validate()


def cmd_train(args: argparse.Namespace) -> int:
    from visionzoo.train import dist
    from visionzoo.train.loop import fit

    if args.task != "cls":
        return _train_dense(args)
    if args.head is not None:
        raise ArgumentError(f"--head {args.head} is for dense tasks; add --task seg, det or sr")
    if args.peft_positions and not args.peft:
        raise ArgumentError("--peft-positions adds the position tables to a PEFT method's trainable parameters; add "
                            "--peft lora (or another method), or drop --peft-positions to fine-tune everything")
    cfg = _train_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = dist.setup(args.device)
    try:
        splits, model = _data_and_model(args)
        if args.init:
            from visionzoo.weights import load_checkpoint

            load_checkpoint(model, args.init, strict=False)
        if args.spt or args.lsa or args.dhvt:
            from visionzoo.train.small_data import apply_small_data

            apply_small_data(model, {"spt": args.spt, "lsa": args.lsa, "dhvt": args.dhvt})
        peft = None
        if args.peft:
            from visionzoo.train.peft import apply_peft

            peft = apply_peft(model, args.peft, rank=args.rank, alpha=args.lora_alpha, prompts=args.prompts,
                              deep=args.deep_prompts, positions=args.peft_positions)
            if info.is_main:
                print(peft.summary())
        hooks = {}
        if args.tokens:
            from visionzoo.tokens import apply_spec

            if args.grad_checkpointing:
                raise ValueError("--tokens cannot be combined with --grad-checkpointing (recomputed blocks would "
                                 "see a later block's token state); drop one of them")
            handle = apply_spec(model, args.tokens)
            hooks = dict(loss_fn=handle.training_loss, on_step=handle.on_train_step)
            if info.is_main:
                print(f"token reduction: {handle.spec}")
        res = fit(model, splits, cfg, args.out, resume=args.resume, dist_info=info, **hooks)
        if peft is not None and peft.method == "lora" and info.is_main and "model" in res.files:
            from visionzoo.weights import read, save  # the merged model: a plain checkpoint of the architecture

            _, meta = read(res.files["model"])
            merged = peft.merge()
            extra = {k: str(v) for k, v in meta.items() if k not in ("format", "variant", "args", "adapters")}
            from visionzoo.train.peft import adapter_spec

            if adapter_spec(merged):  # SPT/LSA stay recorded; LoRA is gone
                extra["adapters"] = json.dumps(adapter_spec(merged))
            save(merged, res.files["model"], extra=extra)
            print(f"LoRA merged into the weights of {res.files['model']}")
        if info.is_main and res.metrics is not None:
            ema = f", EMA {res.ema_metrics.top1:.2f}%" if res.ema_metrics else ""
            tok = f" + {args.tokens}" if args.tokens else ""
            print(f"{args.model}{tok}: val top-1 {res.metrics.top1:.2f}%, top-5 {res.metrics.top5:.2f}%{ema} "
                  f"({res.train_time_s:.0f} s); files in {args.out}: "
                  + ", ".join(Path(f).name for f in res.files.values()))
    finally:
        dist.cleanup()
    return 0


def _data_and_model(args: argparse.Namespace) -> tuple[DataSplits, torch.nn.Module]:
    """The data splits and the seeded, freshly built model of a ``train`` or ``pretrain`` run."""
    from visionzoo.train.loop import build_model, seed_everything

    splits = _load_splits(args)
    seed_everything(args.seed)
    model = build_model(args.model, splits.num_classes, splits.in_chans, _resolve_img_size(args, splits),
                        args.patch_size, drop_path_rate=args.drop_path, **_model_args(args.model_arg))
    return splits, model


def cmd_pretrain(args: argparse.Namespace) -> int:
    from visionzoo.train import dist
    from visionzoo.train.pretrain import pretrain

    cfg = _train_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = dist.setup(args.device)
    try:
        splits, model = _data_and_model(args)
        res = pretrain(model, splits, args.method, cfg, args.out, resume=args.resume, dist_info=info,
                       mask_ratio=args.mask_ratio, mask_stride=args.mask_stride)
        if info.is_main and res.metrics is not None:
            acc = "" if res.metrics.top1 != res.metrics.top1 else f", rotation accuracy {res.metrics.top1:.2f}%"
            print(f"{args.model} + {args.method}: val pretext loss {res.metrics.loss:.4f}{acc} "
                  f"({res.train_time_s:.0f} s); files in {args.out}: "
                  + ", ".join(Path(f).name for f in res.files.values())
                  + (f"; fine-tune with: visionzoo train --model {args.model} --init {args.out}/backbone.safetensors"
                     if "backbone" in res.files else ""))
    finally:
        dist.cleanup()
    return 0


def _train_dense(args: argparse.Namespace) -> int:
    """``train --task seg|det|sr --head H``: a ``heads.DenseModel`` on shape scenes or a folder, ``fit_dense``."""
    from visionzoo.heads import HEADS, DenseModel
    from visionzoo.train import dist
    from visionzoo.train.dense import MAIN_METRIC, fit_dense
    from visionzoo.train.dense_data import load_dense_data
    from visionzoo.train.loop import seed_everything

    heads = sorted(h for h, (t, _, _) in HEADS.items() if t == args.task)
    if args.head is None:
        raise ArgumentError(f"--task {args.task} needs --head, one of {heads}")
    if args.head not in heads:
        raise ArgumentError(f"--head {args.head} is not a {args.task} head; choose one of {heads}")
    if args.tokens:
        raise ArgumentError("--tokens is for classification training; drop it with --task")
    if args.img_size == "native":
        raise ArgumentError("--img-size native is for classification; give --img-size N with --task")
    cfg = _train_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = dist.setup(args.device)
    try:
        spec = "shapes" if args.data == "digits" else args.data  # the classification default means "not given"
        train, val = load_dense_data(spec, args.task, args.img_size, args.seed, args.limit_train, args.limit_val,
                                     args.val_split, args.sr_scale)
        seed_everything(args.seed)
        num_classes = {"seg": len(train.classes) + 1, "det": len(train.classes), "sr": 3}[args.task]
        kwargs = {"drop_path_rate": args.drop_path, **_model_args(args.model_arg)}
        model = DenseModel(args.model, args.head, num_classes=num_classes, dim=args.head_dim,
                           head_kwargs={"scale": args.sr_scale} if args.task == "sr" else None, **kwargs)
        if args.init:
            from visionzoo.weights import load_checkpoint

            load_checkpoint(model.backbone, args.init, strict=False)
        res = fit_dense(model, train, val, args.task, cfg, args.out, resume=args.resume, dist_info=info)
        if info.is_main:
            key = MAIN_METRIC[args.task]
            shown = ", ".join(f"{k} {v:.4f}" for k, v in res.metrics.items())
            print(f"{args.model} + {args.head} ({args.task}): {shown} ({res.train_time_s:.0f} s); {key} is the main "
                  f"metric; files in {args.out}: " + ", ".join(Path(f).name for f in res.files.values()))
    finally:
        dist.cleanup()
    return 0


def default_eval_dir(checkpoint: str | Path) -> Path:
    """Where ``visionzoo eval`` writes when ``--out`` is not given: ``<checkpoint folder>/<checkpoint stem>_eval``."""
    p = Path(checkpoint)
    return p.parent / f"{p.stem}_eval"


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.table import Table

    from visionzoo.train.evaluate import eval_checkpoint, load_trained, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pretrained:
        return _eval_pretrained(args)
    if not args.checkpoint:
        raise ArgumentError("give --checkpoint PATH (a file from train, or any checkpoint) or --pretrained NAME")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = args.img_size if args.img_size != "native" else None
    model, meta = load_trained(args.checkpoint, args.model, img_size=size, ema=args.ema,
                               num_classes=args.num_classes, in_chans=args.in_chans, tokens=args.tokens)
    splits = _load_splits(args, in_chans=model.in_chans)
    if model.num_classes == 1000 and splits.num_classes != 1000 and "classes" not in meta and args.num_classes is None:
        raise ArgumentError(f"{args.checkpoint} does not record its classes; pass --num-classes")
    m = eval_checkpoint(model, splits, meta, batch_size=args.batch_size, crop_pct=args.crop_pct, device=device)
    out = args.out or default_eval_dir(args.checkpoint)
    files = write_report(m, out, title=f"{model.name} on {splits.name}: top-1 {m.top1:.2f}%")
    handle = getattr(model, "token_reduction", None)
    tok = f" with {handle.spec}" if handle is not None else ""
    con = _console()
    if len(m.classes) <= 20:
        t = Table(title=f"{model.name}{tok} on {splits.name} ({m.count} validation images)")
        for c in ("class", "images", "top-1 %"):
            t.add_column(c)
        for c, n, a in zip(m.classes, m.confusion.sum(1).tolist(), m.per_class):
            t.add_row(c, str(n), f"{a:.2f}")
        con.print(t)
    con.print(f"top-1 {m.top1:.2f}%  top-5 {m.top5:.2f}%  loss {m.loss:.4f}")
    con.print("wrote " + ", ".join(files.values()))
    return 0


def _eval_pretrained(args: argparse.Namespace) -> int:
    """``eval --pretrained NAME[.TAG] --data folder:PATH/val``: ImageNet top-1/top-5 next to the reported ones."""
    import visionzoo
    from visionzoo.pretrained import get_weights
    from visionzoo.train.evaluate import write_report
    from visionzoo.train.imagenet import evaluate_imagenet, load_imagenet_folder

    if args.checkpoint:
        raise ArgumentError("give --pretrained NAME or --checkpoint PATH, not both")
    if not args.data.startswith("folder:") or len(args.data) <= 7:
        raise ArgumentError(f"--pretrained evaluates on ImageNet-1k: pass --data folder:PATH/val (one sub-folder "
                            f"per class, named by synset id like n01440764), got --data {args.data}")
    spec = get_weights(args.pretrained)
    size = args.img_size if isinstance(args.img_size, int) else (spec.top1_img_size or spec.input_size)
    crop = args.crop_pct or (spec.top1_crop_pct if size == spec.top1_img_size and spec.top1_crop_pct else
                             spec.crop_pct)
    ds = load_imagenet_folder(args.data[7:], limit=args.limit_val, seed=args.seed)
    takes_size = getattr(visionzoo.get_variant(spec.variant).cls, "takes_img_size", False)
    model = visionzoo.create_model(spec.variant, pretrained=spec.tag, img_size=size if takes_size else None).eval()
    dc = model.data_config
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    m = evaluate_imagenet(model, ds, img_size=size, crop_pct=crop, interpolation=dc["interpolation"], mean=dc["mean"],
                          std=dc["std"], batch_size=args.batch_size, device=device, workers=args.workers)
    out = Path(args.out or Path("runs") / "eval" / spec.name)
    files = write_report(m, out, title=f"{spec.name} on ImageNet-1k val: top-1 {m.top1:.2f}%")
    paper = visionzoo.get_variant(spec.variant).paper
    con = _console()
    con.print(f"{spec.name} at {size} px, crop {crop}, {dc['interpolation']}: {m.count} images"
              + ("" if m.count >= 50000 else " (a subset; the reported numbers use all 50,000)"))
    con.print(f"  measured here: top-1 {m.top1:.2f}%  top-5 {m.top5:.2f}%  loss {m.loss:.4f}")
    if spec.top1 is not None:
        at = f" at {spec.top1_img_size} px" if spec.top1_img_size else ""
        top5 = f"  top-5 {spec.top5:.2f}%" if spec.top5 is not None else ""
        con.print(f"  reported for these weights: top-1 {spec.top1:.2f}%{top5}{at} ({spec.top1_source})")
    if paper.top1 is not None:
        at = f" at {paper.img_size} px" if paper.img_size else ""
        con.print(f"  paper: top-1 {paper.top1:.2f}%{at} ({paper.source or 'registry'})")
    con.print("wrote " + ", ".join(files.values()))
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """``visionzoo weights [PATTERN ...]``: where the pretrained weights of each variant live."""
    from rich import box
    from rich.table import Table

    import visionzoo
    from visionzoo.pretrained import cache_dir, cache_path, find_cached, list_pretrained, no_weights_reason

    patterns = args.pattern or ["*"]
    names = visionzoo.list_models(patterns)
    if not names:
        raise ArgumentError(f"no model matches {' '.join(patterns)}; try `visionzoo weights` for all")
    if args.none:
        t = Table(title="variants without downloadable weights")
        t.add_column("model", no_wrap=True)
        t.add_column("why")
        for n in names:
            why = no_weights_reason(n)
            if why:
                t.add_row(n, why)
        _console().print(t)
        return 0
    detail = len(names) == 1 and not any(c in patterns[0] for c in "*?[")
    specs = list_pretrained(names, all_tags=args.tags or detail)
    con = _console()
    if detail and not specs:
        con.print(f"{names[0]}: no downloadable weights; {no_weights_reason(names[0])}")
        return 0
    files = f"{len(specs)} file{'s' * (len(specs) != 1)}"
    t = Table(box=box.SIMPLE_HEAD, title=f"pretrained weights ({files}; pretrained=True loads each model's first)")
    for c in ("model", "tag", "source", "MB", "licence", "top-1 @px", "pre-train", "cached"):
        t.add_column(c, no_wrap=c in ("model", "tag"), justify="right" if c in ("MB", "top-1 @px") else "left")
    for s in specs:
        t.add_row(s.variant, s.tag, _source(s), _size(s), s.license or "-",
                  f"{s.top1:.2f} @{s.top1_img_size}" if s.top1 is not None else "-", s.pretrain,
                  "yes" if find_cached(s) else "")
    con.print(t)
    if detail:
        for s in specs:
            con.print(f"{s.name}: {s.download_url}\n  cache: {cache_path(s)}"
                      + (f"\n  sha256: {s.sha256}" if s.sha256 else "") + (f"\n  {s.notes}" if s.notes else ""))
    missing = [n for n in names if no_weights_reason(n)]
    if missing and not detail:
        con.print(f"{len(missing)} of {len(names)} variants have no direct download ({', '.join(missing[:4])}"
                  f"{', ...' if len(missing) > 4 else ''}): `visionzoo weights --none` says why")
    con.print(f"MB with ~ is estimated from the parameter count (fp32). Cache: {cache_dir()} ($VISIONZOO_CACHE); "
              f"downloads happen only on pretrained=True or `visionzoo eval --pretrained`")
    return 0


def _source(s) -> str:  # noqa: ANN001
    from urllib.parse import urlparse

    if s.hf_hub:
        return f"hf:{s.hf_hub.split('/')[0]}"
    host = urlparse(s.url).hostname or "-"
    return host if len(host) <= 24 else "..." + host[-21:]


def _size(s) -> str:  # noqa: ANN001
    if s.size_mb:
        return f"{s.size_mb:g}"
    import visionzoo

    p = visionzoo.get_variant(s.variant).params_m
    return f"~{p * 4:.0f}" if p else "-"


def cmd_compare(args: argparse.Namespace) -> int:
    from visionzoo.train.compare import compare

    if args.task != "cls":
        return _compare_dense(args)
    cfg = _train_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    probes = _probes(args.probes) if args.robust else None
    splits = _load_splits(args)
    rows = compare(args.models, splits, cfg, args.out, img_size=_resolve_img_size(args, splits),
                   patch_size=args.patch_size, device=args.device or "cpu", budget=args.budget, robust=args.robust,
                   robust_images=args.robust_images, robust_probes=probes)
    print((Path(args.out) / "compare.md").read_text())
    extra = ", robust.md, robust.csv, robust.png" if args.robust else ""
    print(f"wrote {args.out}/compare.csv, compare.md, compare.png{extra} ({len(rows)} model{'s' * (len(rows) != 1)})")
    return 0


def _compare_dense(args: argparse.Namespace) -> int:
    from visionzoo.heads import HEADS
    from visionzoo.train.dense_compare import compare_dense
    from visionzoo.train.dense_data import load_dense_data

    heads = sorted(h for h, (t, _, _) in HEADS.items() if t == args.task)
    head = args.head or heads[-1 if args.task == "seg" else 0]
    if head not in heads:
        raise ArgumentError(f"--head {head} is not a {args.task} head; choose one of {heads}")
    if args.robust:
        raise ArgumentError("--robust probes classifiers; drop it with --task")
    if args.img_size == "native":
        raise ArgumentError("--img-size native is for classification; give --img-size N with --task")
    cfg = _train_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = "shapes" if args.data == "digits" else args.data
    train, val = load_dense_data(spec, args.task, args.img_size, args.seed, args.limit_train, args.limit_val,
                                 args.val_split, args.sr_scale)
    rows = compare_dense(args.models, args.task, head, train, val, cfg, args.out, dim=args.head_dim,
                         budget=args.budget, sr_scale=args.sr_scale)
    print((Path(args.out) / "compare.md").read_text())
    print(f"wrote {args.out}/compare.csv, compare.md, compare.png ({len(rows)} model{'s' * (len(rows) != 1)})")
    return 0


# --- explain | robust ----------------------------------------------------------------------------------------
def _probes(value: str) -> tuple[str, ...]:
    from visionzoo.explain.robust import PROBES

    probes = tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in probes if p not in PROBES]
    if bad or not probes:
        raise ArgumentError(f"--probes takes a comma-separated subset of {','.join(PROBES)}, got {value!r}")
    return probes


def _trained_or_named(spec: str):  # noqa: ANN202
    """A checkpoint (what ``visionzoo train`` writes, or any of ours) or a registered name (random weights)."""
    import visionzoo
    from visionzoo.train.evaluate import load_trained

    if os.path.exists(spec):
        model, meta = load_trained(spec)
        return model, meta, f"weights from {spec}"
    if spec.endswith((".safetensors", ".pt", ".pth", ".bin")):
        raise NotFoundError(f"checkpoint {spec!r} does not exist; give a checkpoint path or a model name "
                            f"(`visionzoo list`)")
    return visionzoo.create_model(spec).eval(), {}, "random weights (give a checkpoint to explain a trained model)"


def _load_image(path: str, model, crop_pct: float | None):  # noqa: ANN001, ANN202
    """The image at ``path`` as the model's evaluation input: ``(1, C, S, S)`` in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    from visionzoo.train.data import EvalResize

    if not os.path.isfile(path):
        raise NotFoundError(f"--image {path!r} does not exist; give the path of an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if model.in_chans == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ArgumentError(f"--image {path!r} is not an image Pillow can read ({e})") from None
    dc = model.data_config
    size = dc["input_size"][-1]
    x = EvalResize(size, crop_pct or dc.get("crop_pct", 0.875), dc.get("interpolation", "bicubic"))(img)
    return x.float().div(255)[None]


def cmd_explain(args: argparse.Namespace) -> int:
    import json

    from visionzoo.explain import applicable_methods, deletion_insertion, explain, head_importance, tokencut
    from visionzoo.explain.attention import attention_maps
    from visionzoo.explain.plots import plot_explanation, plot_grid
    from visionzoo.explain.robust import Normalized

    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta, what = _trained_or_named(args.model)
    require_logits(model, "visionzoo explain")
    classes = meta.get("classes")
    x01 = _load_image(args.image, model, args.crop_pct)
    norm = Normalized(model, model.data_config["mean"], model.data_config["std"])
    x = (x01 - norm.mean) / norm.std
    methods = list(applicable_methods(model)) if args.method == ["all"] else args.method
    for m in methods:
        if m not in applicable_methods(model) and m != "tokencut":
            raise ArgumentError(f"--method {m!r} does not apply to {model.name}; choose from "
                             f"{', '.join(applicable_methods(model))}, tokencut or all")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    name_of = (lambda c: f"{c} ({classes[c]})") if classes else str
    pred = int(probs.argmax())
    print(f"{model.name} ({what}): predicted class {name_of(pred)}, p={probs[pred]:.3f}")
    record = {"model": model.name, "weights": what, "image": args.image, "predicted": pred,
              "probability": float(probs[pred]), "methods": {}}
    maps = {}
    for m in methods:
        if m == "tokencut":
            r = tokencut(model, x, stage=-1 if args.stage is None else args.stage)
            box = r.boxes[0].tolist()
            plot_explanation(x01[0], r.eigvecs[0].clamp_min(0), out / "tokencut.png",
                             f"{model.name}: TokenCut, stage {r.stage}, box {box}", box=box)
            record["methods"]["tokencut"] = {"box": box, "stage": r.stage}
            print(f"  tokencut: box {box} (stage {r.stage}) -> {out / 'tokencut.png'}")
            continue
        e = explain(model, x, m, target=args.target, stage=args.stage, head_fusion=args.head_fusion,
                    discard_ratio=args.discard_ratio)
        maps[m] = e.maps[0]
        tgt = int(e.targets[0])
        path = plot_explanation(x01[0], e.maps[0], out / f"{m.replace('+', 'pp')}.png",
                                f"{model.name}: {m}, class {name_of(tgt)}, {e.detail}")
        entry = {"target": tgt, "grid": list(e.grid), "detail": e.detail, "png": str(path)}
        if args.faithfulness:
            auc = deletion_insertion(norm.model, x, e.maps, e.targets, steps=args.steps)
            entry.update(deletion_auc=float(auc.deletion[0]), insertion_auc=float(auc.insertion[0]))
        record["methods"][m] = entry
        faith = (f", deletion AUC {entry['deletion_auc']:.3f}, insertion AUC {entry['insertion_auc']:.3f}"
                 if args.faithfulness else "")
        print(f"  {m}: {e.detail}{faith} -> {path}")
    if args.faithfulness and maps:
        from visionzoo.explain.faithfulness import random_maps

        auc = deletion_insertion(norm.model, x, random_maps(tuple(x.shape[:1] + x.shape[2:]), seed=0),
                                 torch.tensor([pred]), steps=args.steps)
        record["random_baseline"] = {"deletion_auc": float(auc.deletion[0]), "insertion_auc": float(auc.insertion[0])}
        print(f"  random ranking: deletion AUC {auc.deletion[0]:.3f}, insertion AUC {auc.insertion[0]:.3f}")
    if len(maps) > 1:
        plot_grid(x01[0], maps, out / "methods.png", f"{model.name}: class {name_of(pred)}")
    if getattr(model, "has_attention", False) and args.heads:
        last = attention_maps(model, x)[-1]
        heads = {f"head {h}": last.maps[0, h] for h in range(last.maps.shape[1])}
        plot_grid(x01[0], heads, out / "heads.png", f"{model.name}: {last.name} ({last.kind}) per head")
        imp = head_importance(model, x)
        record["head_importance"] = imp.rows
        top = sorted(imp.rows, key=lambda r: -r["logit_drop"])[:3]
        print("  most important heads (target logit drop when masked): "
              + ", ".join(f"{r['core']}#{r['head']} {r['logit_drop']:.3f}" for r in top))
    (out / "explain.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out}/ (" + ", ".join(sorted(p.name for p in out.iterdir())) + ")")
    return 0


def cmd_robust(args: argparse.Namespace) -> int:
    from visionzoo.explain.robust import markdown, robustness, split_images, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    probes = _probes(args.probes)
    model, meta, what = _trained_or_named(args.checkpoint)
    require_logits(model, "visionzoo robust")
    splits = _load_splits(args, in_chans=model.in_chans)
    classes = meta.get("classes")
    if classes is not None and list(classes) != list(splits.classes):
        raise ArgumentError(f"the checkpoint was trained on classes {list(classes)[:10]}, --data {args.data} has "
                         f"{splits.classes[:10]}; probe it on the data it was trained on")
    if model.num_classes != splits.num_classes:
        raise ArgumentError(f"{model.name} has {model.num_classes} classes, --data {args.data} has "
                         f"{splits.num_classes}; give the checkpoint trained on it")
    dc = model.data_config
    x, y = split_images(splits.val, dc["input_size"][-1], args.crop_pct or dc.get("crop_pct", 0.875),
                        dc.get("interpolation", "bicubic"), args.limit, args.seed)
    print(f"{model.name} ({what}): {len(x)} validation images of {splits.name}, probes {','.join(probes)}",
          flush=True)
    eps = tuple(e / 255 for e in args.eps)
    report = robustness(model, x, y, probes, seed=args.seed, batch_size=args.batch_size, eps=eps,
                        pgd_steps=args.pgd_steps, patch=args.patch, patch_steps=args.patch_steps)
    files = write_report(report, args.out)
    print(markdown([report]))
    print("wrote " + ", ".join(files.values()))
    return 0


def add_explain_commands(sub) -> None:  # noqa: ANN001
    from visionzoo.explain import METHODS

    s = sub.add_parser("explain", help="saliency maps (CAMs, attention, rollout, TokenCut) of one image, as PNGs")
    s.add_argument("model", help="a checkpoint (from visionzoo train, or any of ours) or a model name (random weights)")
    s.add_argument("--image", required=True, help="image file to explain")
    s.add_argument("--method", nargs="+", default=["gradcam"], choices=(*METHODS, "tokencut", "all"),
                   help="one or more methods, or all that apply (default gradcam)")
    s.add_argument("--target", type=int, default=None, help="class index to explain (default: the prediction)")
    s.add_argument("--stage", type=int, default=None, help="stage index of the CAM (default: the last one a "
                   "gradient reaches; negative counts from the end)")
    s.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean", help="rollout's head fusion")
    s.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: drop this share of weakest attention")
    s.add_argument("--faithfulness", action="store_true", help="deletion/insertion AUC per method and for a "
                   "random ranking")
    s.add_argument("--steps", type=int, default=32, help="deletion/insertion steps")
    s.add_argument("--heads", action="store_true", help="per-head maps of the last attention and head importance")
    s.add_argument("--crop-pct", type=float, default=None, help="evaluation centre crop (the variant's default)")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--out", default="runs/explain", help="folder for the PNGs and explain.json")
    s.set_defaults(func=cmd_explain)
    s = sub.add_parser("robust", help="robustness probes of a checkpoint: shift, patch, corruptions, FGSM/PGD")
    s.add_argument("checkpoint", help="a checkpoint from visionzoo train (or any of ours), or a model name")
    s.add_argument("--probes", default="shift,patch,corrupt,pgd", help="comma-separated subset of "
                   "shift,patch,corrupt,pgd")
    s.add_argument("--limit", type=int, default=256, help="validation images to probe (a seeded subset)")
    s.add_argument("--eps", type=float, nargs="+", default=[1, 2, 4, 8], help="L-inf radii, in 1/255 units")
    s.add_argument("--pgd-steps", type=int, default=10)
    s.add_argument("--patch", type=int, default=16, help="side of the perturbed patch in pixels")
    s.add_argument("--patch-steps", type=int, default=20, help="PGD steps of the adversarial patch")
    s.add_argument("--batch-size", "-b", type=int, default=64)
    s.add_argument("--out", default="runs/robust", help="folder for robust.md/.csv/.png")
    _add_data_args(s)
    s.set_defaults(func=cmd_robust)


def _add_data_args(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("data")
    g.add_argument("--data", default="digits",
                   help="digits (default, bundled with scikit-learn), fashion-mnist, shapes (synthetic, 64 px RGB, "
                        "with boxes), folder:PATH or hf:NAME")
    g.add_argument("--data-dir", default=None, help="fashion-mnist IDX files; data_dir for hf:NAME (e.g. imagefolder)")
    g.add_argument("--in-chans", type=int, choices=(1, 3), default=None,
                   help="decode as grey (1) or RGB (3); default 1 for digits/fashion-mnist, 3 otherwise")
    g.add_argument("--val-split", type=float, default=0.2, help="held-out fraction when there is no val set")
    g.add_argument("--limit-train", type=int, default=None, help="keep a seeded random subset of N images")
    g.add_argument("--limit-val", type=int, default=None)
    g.add_argument("--img-size", type=_img_size, default=None,
                   help="resize images to N and build the model at N; 'native' builds it at the images' own size; "
                        "default: the variant's input size")
    g.add_argument("--crop-pct", type=float, default=None, help="evaluation centre-crop fraction (variant's default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda:LOCAL_RANK when available)")
    g.add_argument("--threads", type=int, default=None, help="intra-op threads per process")


def _add_recipe_args(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("model")
    g.add_argument("--patch-size", type=int, default=None, help="patch size for the models that have one (ViTs)")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    g = s.add_argument_group("recipe")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", "-b", type=int, default=64, help="per process")
    g.add_argument("--opt", choices=("adamw", "sgd"), default="adamw")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Nesterov)")
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay for fine-tuning, e.g. 0.75")
    g.add_argument("--sam", action="store_true", help="sharpness-aware minimisation (two passes per step)")
    g.add_argument("--sam-rho", type=float, default=0.05)
    g.add_argument("--warmup-epochs", type=float, default=1.0)
    g.add_argument("--min-lr", type=float, default=1e-6)
    g.add_argument("--ema", action="store_true", help="keep and evaluate an EMA of the weights")
    g.add_argument("--ema-decay", type=float, default=0.998)
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")
    g.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype")
    g.add_argument("--grad-checkpointing", action="store_true")
    g.add_argument("--nondeterministic", action="store_true", help="allow non-deterministic kernels")
    g.add_argument("--workers", type=int, default=0, help="data-loading processes")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after N epochs of this call (the schedule keeps --epochs); continue with --resume")
    g = s.add_argument_group("augmentation (kornia)")
    g.add_argument("--scale", type=float, default=0.35, help="smallest random-resized-crop area fraction")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (0 for digits/text)")
    g.add_argument("--color-jitter", type=float, default=0.0)
    g.add_argument("--auto-augment", choices=("none", "rand", "trivial"), default="none")
    g.add_argument("--mixup", type=float, default=0.0, help="probability that a batch is mixed up")
    g.add_argument("--cutmix", type=float, default=0.0, help="probability that a batch gets cutmix")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows every option's default, also for options without a help text (flags that default off excepted)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS, []) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.default not in (None, False, [],
                                                                                     argparse.SUPPRESS):
            action.help = "(default: %(default)s)"
            try:
                return super()._format_action(action)
            finally:
                action.help = None
        return super()._format_action(action)


def add_train_commands(sub) -> None:  # noqa: ANN001
    s = sub.add_parser("train", help="train a model on digits, fashion-mnist, an image folder or a HF dataset",
                       formatter_class=_DefaultsFormatter)
    s.add_argument("--model", required=True, help="registered model name")
    s.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor override, repeatable (e.g. depth=6)")
    s.add_argument("--init", default=None, help="start from these weights (fine-tuning; a new head is fine)")
    s.add_argument("--resume", default=None, help="a latest.pt to continue exactly, or 'auto' for OUT/latest.pt")
    s.add_argument("--out", default="runs/train", help="folder for metrics.csv, latest.pt, curves.png, weights")
    s.add_argument("--task", choices=("cls", "seg", "det", "sr"), default="cls",
                   help="cls: image classification; seg, det, sr: a dense head on the backbone (--head), on --data "
                        "shapes (procedural scenes with masks and boxes; the default with --task) or folder:PATH "
                        "(images/ + masks/ PNGs, images/ + COCO annotations.json, or any image folder for sr)")
    s.add_argument("--head", default=None, choices=("fpn", "upernet", "segformer", "fcos", "espcn"),
                   help="dense head: fpn, upernet, segformer (seg); fcos (det); espcn (sr)")
    s.add_argument("--head-dim", type=int, default=128, help="the dense head's width")
    s.add_argument("--sr-scale", type=int, default=2, help="super-resolution factor (--task sr)")
    s.add_argument("--tokens", default=None, metavar="METHOD:K=V,...",
                   help="train with token reduction active, e.g. tome:r=8, evit:keep=0.7, mctf:r=16,consistency=True, "
                        "slim:keep=0.5 (visionzoo.tokens; recorded in the checkpoint)")
    g = s.add_argument_group("parameter-efficient fine-tuning and small-data recipes")
    g.add_argument("--peft", choices=("lora", "vqt", "prompt", "bitfit", "linear"), default=None,
                   help="freeze the backbone and train only the method's parameters and the classifier")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: the rank)")
    g.add_argument("--prompts", type=int, default=10, help="prompt tokens (prompt) or query tokens per block (vqt)")
    g.add_argument("--deep-prompts", action="store_true", help="prompt: new prompts before every block (deep VPT)")
    g.add_argument("--peft-positions", action="store_true",
                   help="also train the absolute position tables (LoRAT's pos_embed_trainable)")
    g.add_argument("--tract", type=float, default=None, metavar="LAMBDA",
                   help="TrAct: precondition the first layer's update (lambda, the paper's default 0.1)")
    g.add_argument("--spt", action="store_true", help="Shifted Patch Tokenization (plain ViTs)")
    g.add_argument("--lsa", action="store_true", help="Locality Self-Attention (plain ViTs)")
    g.add_argument("--dhvt", action="store_true",
                   help="DHVT's SOPE patch embedding, DAFF feed-forward and head-token attention (plain ViTs)")
    _add_data_args(s)
    _add_recipe_args(s)
    s.set_defaults(func=cmd_train)
    s = sub.add_parser("pretrain", help="self-supervised pretraining on the training images (mae, spark, rotnet, sit) "
                       "-> OUT/backbone.safetensors for train --init", formatter_class=_DefaultsFormatter)
    s.add_argument("--model", required=True, help="registered model name")
    s.add_argument("--method", required=True, choices=("mae", "spark", "rotnet", "sit"),
                   help="mae, sit: plain ViTs; spark: ConvNets and hierarchical models; rotnet: every family")
    s.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor override, repeatable (e.g. depth=6)")
    s.add_argument("--mask-ratio", type=float, default=None, help="masked fraction (mae 0.75, spark 0.6)")
    s.add_argument("--mask-stride", type=int, default=None,
                   help="spark: the mask cell in pixels (default: the coarsest feature stride, as SparK)")
    s.add_argument("--resume", default=None, help="a latest.pt to continue exactly, or 'auto' for OUT/latest.pt")
    s.add_argument("--out", default="runs/pretrain", help="folder for metrics.csv, latest.pt, backbone.safetensors")
    _add_data_args(s)
    _add_recipe_args(s)
    s.set_defaults(func=cmd_pretrain)
    s = sub.add_parser("eval", help="top-1/top-5/loss, per-class accuracy and a confusion matrix of a checkpoint",
                       formatter_class=_DefaultsFormatter)
    s.add_argument("--model", default=None, help="registered name (needed when the checkpoint does not record it)")
    s.add_argument("--checkpoint", default=None, help="latest.pt or model.safetensors from train, or any checkpoint")
    s.add_argument("--pretrained", default=None, metavar="NAME[.TAG]",
                   help="evaluate published ImageNet weights (downloaded once) on --data folder:PATH/val, whose "
                        "class folders are synset ids; reports top-1/top-5 next to the reported and paper numbers")
    s.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a latest.pt")
    s.add_argument("--num-classes", type=int, default=None, help="for a checkpoint that does not record its classes")
    s.add_argument("--batch-size", "-b", type=int, default=128)
    s.add_argument("--out", default=None, help="folder for metrics.json, per_class.csv, confusion.png (default: "
                   "CHECKPOINT_FOLDER/STEM_eval next to the checkpoint; runs/eval/NAME.TAG for --pretrained)")
    s.add_argument("--workers", type=int, default=0, help="data-loading processes")
    s.add_argument("--tokens", default=None, metavar="METHOD:K=V,...|none",
                   help="evaluate with this token reduction (e.g. tome:r=13), or 'none'; default: the one the "
                        "checkpoint was trained with, if any")
    _add_data_args(s)
    s.set_defaults(func=cmd_eval)
    s = sub.add_parser("compare", help="train several models under one recipe, budget and seed; one table, one plot",
                       formatter_class=_DefaultsFormatter)
    s.add_argument("--models", nargs="+", required=True)
    s.add_argument("--budget", type=float, default=2.0, help="timed seconds for each throughput measurement")
    s.add_argument("--robust", action="store_true", help="also run the robustness probes on each trained model")
    s.add_argument("--probes", default="shift,patch,corrupt,pgd", help="with --robust: which probes")
    s.add_argument("--robust-images", type=int, default=256, help="with --robust: validation images probed")
    s.add_argument("--out", default="runs/compare", help="folder for compare.csv/.md/.png and each model's run")
    s.add_argument("--task", choices=("cls", "seg", "det", "sr"), default="cls",
                   help="seg, det, sr: every backbone with one dense head (--head) on --data shapes or folder:PATH")
    s.add_argument("--head", default=None, choices=("fpn", "upernet", "segformer", "fcos", "espcn"),
                   help="with --task: the head (default upernet for seg, fcos for det, espcn for sr)")
    s.add_argument("--head-dim", type=int, default=128, help="with --task: the head's width")
    s.add_argument("--sr-scale", type=int, default=2, help="with --task sr: the upscaling factor")
    _add_data_args(s)
    _add_recipe_args(s)
    s.set_defaults(func=cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    from visionzoo import __version__
    from visionzoo.bench.schema import BACKENDS as BENCH_BACKENDS

    p = argparse.ArgumentParser(prog="visionzoo", description="Vision backbones under one API, measured fairly.")
    p.add_argument("--version", action="version", version=f"visionzoo {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("bench", help="params, MACs, throughput, latency and memory of models, side by side")
    s.add_argument("pattern", nargs="*", help="model names or fnmatch patterns; none = the default line-up")
    s.add_argument("--batch-size", "-b", type=int, nargs="+", default=None,
                   help="batch sizes (default 1 32; 1 16 for the default line-up)")
    s.add_argument("--img-size", type=int, default=None, help="input side (default: each model's own)")
    s.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "int8"), default="fp32",
                   help="fp32; bf16 (refused where it measures slower than fp32, except on --backend eager, which "
                        "autocasts); fp16 (--backend eager); int8 (dynamic quantization: eager or onnxruntime)")
    s.add_argument("--backend", choices=BENCH_BACKENDS,
                   default="eager_tuned",
                   help="what runs inference (default eager_tuned: torch eager after fuse(), each Linear on the "
                        "kernel measured fastest on this CPU, the same for every architecture; eager: the model as "
                        "given; auto: visionzoo.deploy's fastest backend per model)")
    s.add_argument("--channels-last", action="store_true", help="NHWC weights and input")
    s.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile (optionally a mode, e.g. max-autotune); compile time reported apart")
    s.add_argument("--fuse", action="store_true", help="model.fuse(): deploy re-parameterisation")
    s.add_argument("--candidates", nargs="+", default=None, metavar="BACKEND",
                   choices=BENCH_BACKENDS[:-1],
                   help="the backends --backend auto tries (default: all; inductor compiles for minutes per model)")
    s.add_argument("--deploy", action="store_true",
                   help="--backend auto: each model on visionzoo.deploy's fastest backend for this CPU (cached)")
    s.add_argument("--quant", choices=("int8-static", "int8-dynamic"), default=None,
                   help="real int8 (torchao, compiled): PT2E static convs+linears, or dynamic int8 linears; "
                        "pip install torchao")
    s.add_argument("--no-freeze", action="store_true",
                   help="compiled inference without inductor freezing (default: frozen weights, prepacked)")
    s.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    s.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    s.add_argument("--mode", choices=("infer", "train", "both"), default="infer",
                   help="inference, a training step (forward + backward + SGD step), or both")
    s.add_argument("--repeats", type=int, default=None,
                   help="timed runs; the median is reported (default 3; 2 for the default line-up)")
    s.add_argument("--budget", type=float, default=None,
                   help="timed seconds per model, batch size and mode; sets the step count "
                        "(default 3; 1 for the default line-up)")
    s.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"), default="passive",
                   help="OMP_WAIT_POLICY of the measuring process (passive: threads sleep instead of spinning; "
                        "far faster on a shared machine; on a quiet one, inherit (spin, then sleep) was 20-40%% "
                        "faster at batch 1 on an AMD EPYC)")
    s.add_argument("--malloc", choices=("keep", "inherit"), default="keep",
                   help="keep: the measuring process reuses freed memory (glibc MALLOC_MMAP/TRIM_THRESHOLD_), "
                        "as jemalloc/tcmalloc deployments do, instead of page-faulting every large activation "
                        "in anew; inherit: this environment's settings")
    s.add_argument("--in-process", action="store_true",
                   help="measure in this process: faster start, but no CPU peak memory or crash isolation")
    s.add_argument("--timeout", type=float, default=None, help="seconds per model before it is given up")
    s.add_argument("--roofline", action="store_true",
                   help="measure the matmul peak and memory bandwidth; report model FLOP utilisation")
    s.add_argument("--tokens", default=None, metavar="METHOD:K=V,...",
                   help="measure with token reduction applied, e.g. evit:keep=0.7 or tome:r=13 (visionzoo.tokens; "
                        "plain-token models only, others get an error row)")
    s.add_argument("--compare-timm", action="store_true",
                   help="also time timm's model of the same name, interleaved, and print ours/timm")
    s.add_argument("--out", default=None,
                   help="folder for CSV, JSON and plots (default: a new bench-results/<date-time>/ per run, with "
                        "bench-results/latest pointing to the newest run that measured something)")
    s.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    s.add_argument("--task", choices=("seg", "det", "sr"), default=None,
                   help="time backbone + a dense head (--head) at the task's usual input (seg 512, det 640, sr 256 "
                        "px; --img-size overrides), all models interleaved in this process, fp32 eager")
    s.add_argument("--head", default=None, choices=("fpn", "upernet", "segformer", "fcos", "espcn"),
                   help="with --task: the head (default upernet for seg, fcos for det, espcn for sr)")
    s.add_argument("--head-dim", type=int, default=128, help="with --task: the head's width")
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
    s = sub.add_parser("weights", help="where each variant's pretrained weights live: source, size, licence, top-1")
    s.add_argument("pattern", nargs="*", help="model names or fnmatch patterns; one exact name shows every tag, URL "
                                              "and cache path")
    s.add_argument("--tags", action="store_true", help="every weights file of each model, not only the default")
    s.add_argument("--none", action="store_true", help="the models without downloadable weights, and why")
    s.set_defaults(func=cmd_weights)
    s = sub.add_parser("convert", help="convert a timm/official checkpoint to visionzoo format")
    s.add_argument("src")
    s.add_argument("dst", help="output path, .safetensors (or .pt)")
    s.add_argument("--model", required=True, help="registered model name")
    s.set_defaults(func=cmd_convert)
    s = sub.add_parser("export", help="export a model to ONNX or a torch.export program, checked against eager")
    s.add_argument("model", help="registered model name (random weights) or a checkpoint of ours")
    s.add_argument("--format", choices=("onnx", "pt2"), default="onnx")
    s.add_argument("--img-size", type=int, default=None, help="input side (default: the model's own)")
    s.add_argument("--batch", default="dynamic", type=_batch_arg,
                   help="'dynamic' (any batch size, the default) or a fixed batch size")
    s.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    s.add_argument("--fuse", action="store_true", help="export the deploy form (model.fuse())")
    s.add_argument("--time", type=float, default=1.0,
                   help="seconds to time eager and the exported model each (0: skip timing)")
    s.add_argument("--out", required=True, help="output file (.onnx or .pt2)")
    s.set_defaults(func=cmd_export)
    add_compress_command(sub)
    add_train_commands(sub)
    add_explain_commands(sub)
    return p


def _ratio(value: str) -> float:
    try:
        r = float(value)
    except ValueError:
        r = -1.0
    if not 0.0 <= r < 1.0:
        raise argparse.ArgumentTypeError(f"must be a ratio in [0, 1), got {value!r}")
    return r


def add_compress_command(sub) -> None:  # noqa: ANN001
    from visionzoo.compress.pipeline import QUANT_CHOICES

    s = sub.add_parser("compress", help="prune, fuse and quantize (simulated or real int8); a checkpoint and a report")
    s.add_argument("model", help="registered model name (random weights) or a checkpoint (visionzoo train's files)")
    s.add_argument("--prune", type=_ratio, default=None, metavar="RATIO",
                   help="remove this fraction of heads, MLP widths and inner channels (structured)")
    s.add_argument("--importance", choices=("magnitude", "taylor"), default="magnitude", help="pruning importance")
    s.add_argument("--engine", choices=("visionzoo", "torch-pruning"), default="visionzoo",
                   help="pruning engine (torch-pruning also prunes embedding widths; pip install torch-pruning)")
    s.add_argument("--sparse-2-4", action="store_true", help="2:4 semi-structured weight sparsity (simulated)")
    s.add_argument("--fuse", action="store_true", help="model.fuse(): the deploy re-parameterisation")
    s.add_argument("--quant", action="append", default=[], metavar="SCHEME",
                   help=f"repeatable or comma-separated: {', '.join(QUANT_CHOICES)} (any wXaY[-log2|-logsqrt2|"
                        f"-adalog|-twin] with 2-8 bits is simulated; int8-* are real: torchao; ort-int8-*: "
                        f"onnxruntime)")
    s.add_argument("--calib", default="digits",
                   help="calibration and evaluation data: digits, fashion-mnist, folder:PATH or hf:NAME")
    s.add_argument("--calib-n", type=int, default=32, help="calibration images")
    s.add_argument("--eval-n", type=int, default=256, help="evaluation images for top-1 and agreement")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--img-size", type=int, default=None)
    s.add_argument("--batch-size", "-b", type=int, default=16)
    s.add_argument("--budget", type=float, default=1.0, help="seconds of interleaved timing per row (0: no timing)")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--out", required=True, help="folder for model.safetensors, int8 files, report.md/json/png")
    s.set_defaults(func=cmd_compress)


def _batch_arg(value: str) -> str:
    if value == "dynamic" or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"must be 'dynamic' or a positive integer, got {value!r}")


def main(argv: list[str] | None = None) -> int:
    """Run one command. The library's own errors (bad input) end with one line on stderr and status 2, Ctrl-C with
    one line and status 130; anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VisionZooError as e:
        print(f"visionzoo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"visionzoo {args.command}: {getattr(e, 'message', '') or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
