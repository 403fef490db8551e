"""PNG plots of bench results: reported top-1 vs measured throughput (Pareto front marked) and GMACs vs
throughput, coloured by kind. matplotlib is imported here only, with the Agg backend.

Each model is plotted at the largest batch size it was measured at without error; contended rows are drawn
hollow, since their speed is not the model's.
"""
from __future__ import annotations

import os

from visionzoo.bench.schema import BenchResult

COLOURS = {"convnet": "tab:blue", "vit": "tab:orange", "hybrid": "tab:green"}


def _points(results: list[BenchResult]) -> list[BenchResult]:
    best: dict[str, BenchResult] = {}
    for r in results:
        if r.status == "error" or not r.infer_samples_per_sec:
            continue
        cur = best.get(r.model)
        if cur is None or (r.infer_batch_size or 0) > (cur.infer_batch_size or 0):
            best[r.model] = r
    return list(best.values())


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both x and y (higher is better for both)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _figure(title: str):  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def _scatter(ax, pts: list[BenchResult], y: list[float]) -> None:  # noqa: ANN001
    for kind, colour in COLOURS.items():
        sel = [(r, v) for r, v in zip(pts, y, strict=True) if r.kind == kind]
        if not sel:
            continue
        xs = [r.infer_samples_per_sec for r, _ in sel]
        ax.scatter(xs, [v for _, v in sel], label=kind, color=colour, zorder=3,
                   facecolors=["none" if r.status == "contended" else colour for r, _ in sel])
    for r, v in zip(pts, y, strict=True):
        ax.annotate(r.model, (r.infer_samples_per_sec, v), fontsize=7, xytext=(3, 3), textcoords="offset points")


def _caption(pts: list[BenchResult]) -> str:
    if not pts:
        return "no successful measurements"
    r = pts[0]
    bss = sorted({p.infer_batch_size for p in pts})
    return (f"{r.device} {r.dtype}, {r.threads} thread(s), batch {'/'.join(map(str, bss))}, "
            f"OMP_WAIT_POLICY={r.omp_wait_policy}" + (", fused" if r.fused else "")
            + (", channels-last" if r.channels_last else "") + (f", compiled ({r.compile})" if r.compile else "")
            + ("; hollow = contended run" if any(p.status == "contended" for p in pts) else ""))


def _save(plt, fig, ax, ylabel: str, path: str) -> str:  # noqa: ANN001
    """Label the throughput axis and ``ylabel``, write the PNG and free the figure."""
    ax.set_xlabel("throughput (img/s)")
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_top1_vs_throughput(results: list[BenchResult], path: str) -> str:
    pts = [r for r in _points(results) if r.top1 is not None]
    plt, fig, ax = _figure("reported ImageNet top-1 vs measured throughput\n" + _caption(pts))
    if pts:
        y = [r.top1 for r in pts]
        _scatter(ax, pts, y)
        front = pareto_front([(r.infer_samples_per_sec, r.top1) for r in pts])
        ax.plot([pts[i].infer_samples_per_sec for i in front], [y[i] for i in front], "k--", lw=1,
                label="Pareto front", zorder=2)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no measured model has a reported top-1", ha="center", transform=ax.transAxes)
    return _save(plt, fig, ax, "top-1 (%)", path)


def plot_gmacs_vs_throughput(results: list[BenchResult], path: str) -> str:
    pts = [r for r in _points(results) if r.infer_gmacs is not None]
    plt, fig, ax = _figure("GMACs per image vs measured throughput\n" + _caption(pts))
    if pts:
        _scatter(ax, pts, [r.infer_gmacs for r in pts])
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no successful measurements", ha="center", transform=ax.transAxes)
    return _save(plt, fig, ax, "GMACs / image", path)


def write_plots(results: list[BenchResult], out_dir: str, name: str = "bench") -> dict[str, str]:
    return dict(plot_top1=plot_top1_vs_throughput(results, os.path.join(out_dir, f"{name}_top1_vs_throughput.png")),
                plot_gmacs=plot_gmacs_vs_throughput(results,
                                                    os.path.join(out_dir, f"{name}_gmacs_vs_throughput.png")))
