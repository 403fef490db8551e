"""A fair comparison: train several models under one recipe, budget and seed, then one table and one plot.

Each model starts from the same seed, sees the same data splits, augmentation, optimiser, schedule and number
of epochs. The table gives validation accuracy, training time, params, MACs (``visionzoo.profile`` at the
training size) and inference throughput measured here (``bench.timing.time_interleaved``). With ``robust``, each
trained model also goes through ``visionzoo.explain.robustness`` on the same validation images (shift
consistency, corruptions, FGSM/PGD, patches; one seed), written to ``robust.md``/``.csv``/``.png``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from visionzoo.errors import ArgumentError
from visionzoo.train.data import DataSplits
from visionzoo.train.loop import TrainConfig, build_model, fit, seed_everything
from visionzoo.train.metrics import _figure, _save, write_csv

__all__ = ["CompareRow", "compare", "measure_throughput"]


@dataclass
class CompareRow:
    model: str
    kind: str
    top1: float
    top5: float
    ema_top1: float | None
    params_m: float
    gmacs: float
    img_per_s: float
    train_time_s: float
    train_cpu_s: float
    contended: bool
    history: list[dict[str, Any]]
    robust: dict[str, float] | None = None

    def table_row(self) -> dict[str, Any]:
        row = {k: v for k, v in vars(self).items() if k not in ("history", "robust")}
        row.update(self.robust or {})
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def measure_throughput(model: torch.nn.Module, img_size: int, batch_size: int = 64, budget: float = 2.0
                       ) -> tuple[float, bool]:
    """Inference images/s of ``model`` (eval, fp32, this process's threads) and whether others took the cores."""
    from visionzoo.bench.schema import BenchConfig
    from visionzoo.bench.timing import time_interleaved

    p = next(model.parameters())
    x = torch.randn(batch_size, model.in_chans, img_size, img_size, device=p.device)
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            model(x)

    cfg = BenchConfig(batch_sizes=(batch_size,), budget=budget, repeats=3, device=str(p.device))
    t = time_interleaved([step], batch_size, cfg, p.device)[0]
    return t.samples_per_sec, t.contended_runs > 0


def compare(models: list[str], splits: DataSplits, cfg: TrainConfig, out_dir: str | Path, *, img_size: int | None,
            patch_size: int | None = None, device: str = "cpu", throughput_batch: int = 64, budget: float = 2.0,
            log: Callable[[str], None] | None = print, robust: bool = False, robust_images: int = 256,
            robust_probes: tuple[str, ...] | None = None) -> list[CompareRow]:
    """Train each of ``models`` with ``cfg`` on ``splits`` (runs in ``out_dir/<model>/``), then write
    ``compare.csv``, ``compare.md`` and ``compare.png`` into ``out_dir`` (and ``robust.*`` with ``robust``, on
    ``robust_images`` validation images)."""
    from visionzoo.bench.flops import profile
    from visionzoo.registry import get_variant
    from visionzoo.train.dist import DistInfo

    if not models:
        raise ArgumentError("compare: give at least one model name")
    for name in models:
        get_variant(name)  # unknown names fail before any training
    out = Path(out_dir)
    say = log or (lambda s: None)
    rows, reports = [], []
    for name in models:
        say(f"--- {name}")
        seed_everything(cfg.seed)
        model = build_model(name, splits.num_classes, splits.in_chans, img_size, patch_size)
        size = model.data_config["input_size"][-1]
        cpu0 = time.process_time()
        res = fit(model, splits, replace(cfg), out / name, dist_info=DistInfo(device=device), log=log)
        cpu = time.process_time() - cpu0
        prof = profile(model, input_size=size)
        tput, contended = measure_throughput(model, size, throughput_batch, budget)
        summary = None
        if robust:
            from visionzoo.explain.robust import summarize

            reports.append(_robust(model, splits, cfg, size, robust_images, robust_probes, device))
            summary = summarize(reports[-1])
        rows.append(CompareRow(name, get_variant(name).kind, res.metrics.top1, res.metrics.top5,
                               res.ema_metrics.top1 if res.ema_metrics else None, prof.params_m, prof.gmacs,
                               tput, res.train_time_s, cpu, contended, res.history, summary))
        say(f"{name}: top-1 {rows[-1].top1:.2f}%  {rows[-1].params_m:.2f} M params  {rows[-1].gmacs:.3f} GMACs  "
            f"{tput:.0f} img/s  trained in {res.train_time_s:.0f} s")
    write_csv([r.table_row() for r in rows], out / "compare.csv")
    (out / "compare.md").write_text(markdown(rows, cfg, splits.name, size))
    plot(rows, out / "compare.png", f"{splits.name}, {epochs(cfg.epochs)}, {size}px, seed {cfg.seed}")
    if reports:
        from visionzoo.explain.robust import write_report

        write_report(reports, out)
    return rows


def _robust(model: torch.nn.Module, splits: DataSplits, cfg: TrainConfig, size: int, limit: int,
            probes: tuple[str, ...] | None, device: str):  # noqa: ANN202
    """The robustness probes on ``limit`` validation images, preprocessed as evaluation is; one seed (cfg's)."""
    from visionzoo.explain.robust import PROBES, robustness, split_images

    dc = model.data_config
    x, y = split_images(splits.val, size, cfg.crop_pct or dc.get("crop_pct", 0.875),
                        dc.get("interpolation", "bicubic"), limit, cfg.seed)
    return robustness(model.to(device).eval(), x, y, probes or PROBES, seed=cfg.seed)


def markdown(rows: list[CompareRow], cfg: TrainConfig, data: str, size: int) -> str:
    head = (f"{data}, {size}px, {epochs(cfg.epochs)}, batch {cfg.batch_size}, {cfg.opt} lr {cfg.lr}, "
            f"wd {cfg.weight_decay}, seed {cfg.seed}\n\n")
    lines = ["| model | kind | top-1 % | top-5 % | params (M) | GMACs | img/s | train s |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r.model} | {r.kind} | {r.top1:.2f} | {r.top5:.2f} | {r.params_m:.2f} | {r.gmacs:.3f} | "
                     f"{r.img_per_s:.0f}{' (contended)' if r.contended else ''} | {r.train_time_s:.0f} |")
    robust = [r for r in rows if r.robust]
    if robust:
        keys = list(robust[0].robust)
        lines += ["", "robustness (visionzoo.explain.robustness; % top-1 unless named; details in robust.md)", "",
                  "| model | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
        lines += [f"| {r.model} | " + " | ".join(f"{r.robust.get(k, float('nan')):.2f}" for k in keys) + " |"
                  for r in robust]
    return head + "\n".join(lines) + "\n"


def epochs(n: int) -> str:
    return "1 epoch" if n == 1 else f"{n} epochs"


MARKERS = {"convnet": "o", "vit": "^", "hybrid": "s"}
MARKER_NAMES = {"o": "circle", "^": "triangle", "s": "square"}


def plot(rows: list[CompareRow], path: str | Path, title: str) -> Path:
    """Left: validation top-1 per epoch. Right: top-1 vs measured throughput, marker area ~ params.

    Each model keeps one colour in both panels; the marker shape gives its kind. Labels stay inside the axes.
    """
    from visionzoo.bench.plots import place_labels

    plt, fig, (ax_c, ax_s) = _figure(2, 5.5, 4.2)
    colours = []
    for r in rows:
        (line,) = ax_c.plot([h["epoch"] for h in r.history], [h["val_top1"] for h in r.history], marker="o", ms=3,
                            label=r.model)
        colours.append(line.get_color())
        ax_s.scatter([r.img_per_s], [r.top1], s=30 + 20 * r.params_m, alpha=0.7, color=colours[-1],
                     marker=MARKERS.get(r.kind, "o"))
    ax_c.set(xlabel="epoch", ylabel="val top-1 (%)", title=title)
    kinds = [k for k in MARKERS if any(r.kind == k for r in rows)]
    ax_s.set(xlabel="inference img/s (measured here)", ylabel="val top-1 (%)",
             title="top-1 vs speed (" + ", ".join(f"{MARKER_NAMES[MARKERS[k]]} {k}" for k in kinds)
             + "; area ~ params)")
    for ax in (ax_c, ax_s):
        ax.grid(alpha=0.3)
    ax_c.legend(fontsize=7)
    xs, ys = [r.img_per_s for r in rows], [r.top1 for r in rows]
    if rows:
        span_x = (max(xs) - min(xs)) or max(max(xs), 1.0) * 0.2
        span_y = (max(ys) - min(ys)) or 2.0
        ax_s.set_xlim(min(xs) - 0.25 * span_x, max(xs) + 0.25 * span_x)
        ax_s.set_ylim(min(ys) - 0.3 * span_y, max(ys) + 0.3 * span_y)
        fig.tight_layout()
        place_labels(ax_s, xs, ys, [f"{r.model}\n{r.params_m:.1f}M, {r.gmacs:.2f} GMACs" for r in rows],
                     colours=colours, sizes=[30 + 20 * r.params_m for r in rows])
    return _save(plt, fig, path)
