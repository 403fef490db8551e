"""Dense-task comparison and benchmark: backbones under one head, recipe, budget and seed.

``compare_dense`` trains ``DenseModel(name, head)`` for each backbone with ``fit_dense`` and reports the task's
metric next to params, MACs (``bench.flops.profile`` at the training size) and inference img/s measured here;
``bench_dense`` times backbone + head at the dense task's usual input (512 px for seg, 640 px for det), every model
interleaved run by run in one process (``bench.timing.time_interleaved``), so the ratios between rows hold on a
shared machine.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from visionzoo.errors import ArgumentError
from visionzoo.train.dense import MAIN_METRIC, fit_dense
from visionzoo.train.dense_data import DenseSet
from visionzoo.train.loop import TrainConfig, seed_everything
from visionzoo.train.metrics import _figure, _save, write_csv

__all__ = ["BENCH_SIZES", "DenseRow", "bench_dense", "compare_dense"]

BENCH_SIZES = {"seg": 512, "det": 640, "sr": 256}


@dataclass
class DenseRow:
    model: str
    kind: str
    head: str
    metrics: dict[str, float]
    params_m: float
    gmacs: float
    img_per_s: float
    train_time_s: float = 0.0
    contended: bool = False
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def table_row(self) -> dict[str, Any]:
        row = dict(model=self.model, kind=self.kind, head=self.head, **self.metrics, params_m=self.params_m,
                   gmacs=self.gmacs, img_per_s=self.img_per_s, train_time_s=self.train_time_s,
                   contended=self.contended)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def _build(name: str, task: str, head: str, num_classes: int, dim: int, **kw: Any) -> torch.nn.Module:
    from visionzoo.heads import DenseModel

    return DenseModel(name, head, task, num_classes=num_classes, dim=dim, **kw)


def _throughput(models: list[torch.nn.Module], size: int, batch: int, budget: float, sr_scale: int = 1
                ) -> list[tuple[float, bool, float]]:
    """(img/s, contended, ms per batch) of each model, interleaved."""
    from visionzoo.bench.schema import BenchConfig
    from visionzoo.bench.timing import time_interleaved

    x = torch.rand(batch, 3, size, size)
    steps = []
    for m in models:
        m.eval()

        def step(m: torch.nn.Module = m) -> None:
            with torch.inference_mode():
                m(x)
        steps.append(step)
    cfg = BenchConfig(batch_sizes=(batch,), budget=budget, repeats=3, device="cpu")
    return [(t.samples_per_sec, t.contended_runs > 0, t.step_time_ms) for t in
            time_interleaved(steps, batch, cfg, torch.device("cpu"))]


def compare_dense(models: list[str], task: str, head: str, train: DenseSet, val: DenseSet, cfg: TrainConfig,
                  out_dir: str | Path, *, dim: int = 128, budget: float = 2.0, throughput_batch: int = 8,
                  sr_scale: int = 2, log: Callable[[str], None] | None = print) -> list[DenseRow]:
    """Train ``DenseModel(name, head)`` for each of ``models`` (runs in ``out_dir/<model>/``), then write
    ``compare.csv``, ``compare.md`` and ``compare.png`` (main metric vs img/s) into ``out_dir``."""
    from visionzoo.bench.flops import profile
    from visionzoo.registry import get_variant

    if not models:
        raise ArgumentError("compare: give at least one model name")
    for name in models:
        get_variant(name)
    out = Path(out_dir)
    say = log or (lambda s: None)
    num_classes = {"seg": len(train.classes) + 1, "det": len(train.classes), "sr": 3}[task]
    size = int(train.images.shape[-1])
    rows, trained = [], []
    for name in models:
        say(f"--- {name} + {head}")
        seed_everything(cfg.seed)
        model = _build(name, task, head, num_classes, dim,
                       head_kwargs={"scale": sr_scale} if task == "sr" else None)
        res = fit_dense(model, train, val, task, replace(cfg), out / name, log=log)
        prof = profile(model, input_size=size)
        rows.append(DenseRow(name, get_variant(name).kind, head, res.metrics, prof.params_m, prof.gmacs, 0.0,
                             res.train_time_s, history=res.history))
        trained.append(model)
    for r, (ips, cont, _) in zip(rows, _throughput(trained, size, throughput_batch, budget)):
        r.img_per_s, r.contended = ips, cont
    key = MAIN_METRIC[task]
    for r in rows:
        say(f"{r.model}: {key} {r.metrics[key]:.4f}  {r.params_m:.2f} M params  {r.gmacs:.3f} GMACs  "
            f"{r.img_per_s:.1f} img/s  trained in {r.train_time_s:.0f} s")
    write_csv([r.table_row() for r in rows], out / "compare.csv")
    (out / "compare.md").write_text(markdown(rows, task, cfg, size))
    plot(rows, task, out / "compare.png", f"{task} + {head}, {size}px, {cfg.epochs} epochs, seed {cfg.seed}")
    return rows


def bench_dense(models: list[str], task: str, head: str, img_size: int | None = None, batch_size: int = 1,
                num_classes: int = 20, dim: int = 128, budget: float = 2.0) -> list[DenseRow]:
    """Params, MACs and inference img/s of backbone + ``head`` at ``img_size`` (default ``BENCH_SIZES[task]``),
    all models interleaved in this process."""
    from visionzoo.bench.flops import profile
    from visionzoo.registry import get_variant

    if not models:
        raise ArgumentError("bench --task: give at least one model name or pattern")
    size = img_size or BENCH_SIZES[task]
    built, rows = [], []
    for name in models:
        model = _build(name, task, head, 3 if task == "sr" else num_classes, dim, img_size=size) \
            if getattr(get_variant(name).cls, "takes_img_size", False) else \
            _build(name, task, head, 3 if task == "sr" else num_classes, dim)
        m = model.input_multiple
        if size % m:
            raise ArgumentError(f"bench --task {task}: {name} + {head} needs sides that are multiples of {m}; "
                                f"--img-size {size} is not (try {-(-size // m) * m})")
        prof = profile(model, input_size=size)
        rows.append(DenseRow(name, get_variant(name).kind, head, {}, prof.params_m, prof.gmacs, 0.0))
        built.append(model)
    for r, (ips, cont, ms) in zip(rows, _throughput(built, size, batch_size, budget)):
        r.img_per_s, r.contended, r.metrics = ips, cont, {"ms_per_batch": ms}
    return rows


def markdown(rows: list[DenseRow], task: str, cfg: TrainConfig, size: int) -> str:
    keys = [k for k in rows[0].metrics if k != "val_loss"] if rows else []
    head = (f"{task}, {size}px, {cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.opt} lr {cfg.lr}, "
            f"wd {cfg.weight_decay}, seed {cfg.seed}\n\n")
    lines = ["| model | kind | head | " + " | ".join(keys) + " | params (M) | GMACs | img/s | train s |",
             "|" + "---|" * (len(keys) + 7)]
    for r in rows:
        lines.append(f"| {r.model} | {r.kind} | {r.head} | " + " | ".join(f"{r.metrics[k]:.3f}" for k in keys)
                     + f" | {r.params_m:.2f} | {r.gmacs:.3f} | {r.img_per_s:.1f}{' (contended)' if r.contended else ''}"
                     f" | {r.train_time_s:.0f} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[DenseRow], task: str, path: str | Path, title: str) -> Path:
    """Left: the main metric per epoch; right: the main metric vs measured img/s (marker area ~ params)."""
    from visionzoo.train.compare import MARKERS

    key = MAIN_METRIC[task]
    plt, fig, (ax_c, ax_s) = _figure(2, 5.5, 4.2)
    for r in rows:
        (line,) = ax_c.plot([h["epoch"] for h in r.history], [h[key] for h in r.history], marker="o", ms=3,
                            label=r.model)
        ax_s.scatter([r.img_per_s], [r.metrics[key]], s=30 + 20 * r.params_m, alpha=0.7, color=line.get_color(),
                     marker=MARKERS.get(r.kind, "o"))
        ax_s.annotate(r.model, (r.img_per_s, r.metrics[key]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax_c.set(xlabel="epoch", ylabel=key, title=title)
    ax_s.set(xlabel="inference img/s (measured here)", ylabel=key, title=f"{key} vs speed (area ~ params)")
    for ax in (ax_c, ax_s):
        ax.grid(alpha=0.3)
    ax_c.legend(fontsize=7)
    return _save(plt, fig, path)
