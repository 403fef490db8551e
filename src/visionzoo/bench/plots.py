"""PNG plots of bench results: reported top-1 vs measured throughput (Pareto front marked) and GMACs vs
throughput, coloured by kind. matplotlib is imported here only, with the Agg backend.

Each model is plotted at the largest batch size it was measured at without error; contended rows are drawn
hollow, since their speed is not the model's (and when every row is contended the plot says so instead). A
top-1 that comes from another resolution or from extra pre-training data (ImageNet-21k, ...) is drawn as a
cross, named in the legend and kept off the Pareto front. Labels are placed where they do not collide with each
other or with the points, inside the axes.
"""
from __future__ import annotations

import os

from visionzoo.bench.schema import BenchResult

COLOURS = {"convnet": "tab:blue", "vit": "tab:orange", "hybrid": "tab:green"}
ALL_CONTENDED = "every run was contended (other processes took the cores): these speeds are not the models'"


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


def top1_recipe(model: str) -> str | None:
    """Why a model's reported top-1 is not comparable with a plain ImageNet-1k number at its own size, or None.

    From the registry (``paper.img_size``) and the weights table (the pre-training behind the paper's number).
    """
    from visionzoo.pretrained import paper_top1_pretrain
    from visionzoo.registry import get_variant

    try:
        v = get_variant(model)
    except ValueError:
        return None
    why = []
    if v.paper.img_size and v.paper.img_size != v.input_size:
        why.append(f"{v.paper.img_size} px")
    extra = paper_top1_pretrain(model)
    if extra != "in1k":
        why.append(f"{extra} pre-training")
    return ", ".join(why) or None


def _figure(title: str):  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def place_labels(ax, xs: list[float], ys: list[float], labels: list[str], fontsize: float = 7,  # noqa: ANN001
                 colours: list[str] | None = None, sizes: list[float] | None = None) -> list:
    """Annotate each point with its label where it overlaps no other label, no point and not the legend, inside
    the axes.

    Tries positions around the point at growing distances (a leader line beyond the first ring) and keeps the
    first free one; when none is free, the one with the least overlap. Call it after the axis limits and the
    legend are set. ``sizes``: marker areas in points^2, as ``scatter(s=...)`` takes them (default 36). Returns
    the text artists.
    """
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    pts = ax.transData.transform(list(zip(xs, ys))) if xs else []
    radii = [(a ** 0.5 / 2) * fig.dpi / 72 for a in (sizes or [36.0] * len(labels))]  # marker radii in pixels
    point_boxes = [(x - r, y - r, x + r, y + r) for (x, y), r in zip(pts, radii)]
    placed: list[tuple[float, float, float, float]] = []
    legend = ax.get_legend()
    if legend is not None:
        lb = legend.get_window_extent(renderer)
        placed.append((lb.x0, lb.y0, lb.x1, lb.y1))
    texts = []
    dirs = [(1, 1, "left", "bottom"), (1, -1, "left", "top"), (-1, 1, "right", "bottom"), (-1, -1, "right", "top"),
            (0, 1, "center", "bottom"), (0, -1, "center", "top"), (1, 0, "left", "center"), (-1, 0, "right", "center")]

    def overlap(a, b) -> float:  # noqa: ANN001
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    order = sorted(range(len(labels)), key=lambda i: (xs[i], ys[i]))
    for i in order:
        best = None
        base = radii[i] * 72 / fig.dpi / 1.4  # start just outside the marker (diagonals reach sqrt(2) further)
        for dist in (3, 6, 10, 15, 22, 32, 45):
            for dx, dy, ha, va in dirs:
                off = (dx * (base + dist), dy * (base + dist))
                t = ax.annotate(labels[i], (xs[i], ys[i]), xytext=off, textcoords="offset points",
                                ha=ha, va=va, fontsize=fontsize, color=(colours[i] if colours else "black"))
                bb = t.get_window_extent(renderer)
                box = (bb.x0 - 1, bb.y0 - 1, bb.x1 + 1, bb.y1 + 1)
                outside = (box[0] < inside.x0) + (box[2] > inside.x1) + (box[1] < inside.y0) + (box[3] > inside.y1)
                cost = sum(overlap(box, p) for p in placed) + sum(
                    overlap(box, p) for j, p in enumerate(point_boxes) if j != i) + 1e6 * outside
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, t, box, dist)
                else:
                    t.remove()
                if cost == 0:
                    break
            if best[0] == 0:
                break
        _, t, box, dist = best
        if dist > 6:  # far from its point: draw a thin leader line
            t.remove()
            t = ax.annotate(labels[i], (xs[i], ys[i]), xytext=t.xyann, textcoords="offset points", ha=t.get_ha(),
                            va=t.get_va(), fontsize=fontsize, color=(colours[i] if colours else "black"),
                            arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0, shrinkB=3))
        placed.append(box)
        texts.append(t)
    return texts


def _scatter(ax, pts: list[BenchResult], y: list[float], odd: list[bool] | None = None) -> None:  # noqa: ANN001
    """Points coloured by kind, hollow when contended; ``odd`` points (another recipe) drawn as crosses."""
    odd = odd or [False] * len(pts)
    for kind, colour in COLOURS.items():
        for cross in (False, True):
            sel = [(r, v) for r, v, o in zip(pts, y, odd, strict=True) if r.kind == kind and o == cross]
            if not sel:
                continue
            xs = [r.infer_samples_per_sec for r, _ in sel]
            if cross:
                ax.scatter(xs, [v for _, v in sel], color=colour, marker="x", zorder=3)
            else:
                ax.scatter(xs, [v for _, v in sel], label=kind, color=colour, zorder=3,
                           facecolors=["none" if r.status == "contended" else colour for r, _ in sel])


def _label(ax, pts: list[BenchResult], y: list[float], odd: list[bool] | None = None) -> None:  # noqa: ANN001
    odd = odd or [False] * len(pts)
    names = [r.model + (" \u2020" if o else "") for r, o in zip(pts, odd, strict=True)]
    place_labels(ax, [r.infer_samples_per_sec for r in pts], y, names)


def _caption(pts: list[BenchResult]) -> str:
    if not pts:
        return "no successful measurements"
    r = pts[0]
    bss = sorted({p.infer_batch_size for p in pts})
    n_cont = sum(p.status == "contended" for p in pts)
    note = ""
    if 0 < n_cont < len(pts):
        note = "; hollow = contended run"
    elif n_cont == len(pts):
        note = "\n" + ALL_CONTENDED  # hollow vs solid would tell nothing: say it
    return (f"{r.device} {r.dtype}, {r.threads} thread(s), batch {'/'.join(map(str, bss))}, "
            f"OMP_WAIT_POLICY={r.omp_wait_policy}" + (", fused" if r.fused else "")
            + (", channels-last" if r.channels_last else "") + (f", compiled ({r.compile})" if r.compile else "")
            + note)


def _save(plt, fig, ax, ylabel: str, path: str) -> str:  # noqa: ANN001
    """Label the throughput axis and ``ylabel``, write the PNG and free the figure."""
    ax.set_xlabel("throughput (img/s)")
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pad_limits(ax, xs: list[float], ys: list[float]) -> None:  # noqa: ANN001
    """Room around the points so labels fit inside the axes."""
    if not xs:
        return
    lo, hi = min(xs), max(xs)
    span = (hi - lo) or max(hi, 1.0) * 0.2
    ax.set_xlim(lo - 0.2 * span, hi + 0.35 * span)
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or max(abs(hi), 1.0) * 0.05
    ax.set_ylim(lo - 0.15 * span, hi + 0.25 * span)


def plot_top1_vs_throughput(results: list[BenchResult], path: str) -> str:
    pts = [r for r in _points(results) if r.top1 is not None]
    plt, fig, ax = _figure("reported ImageNet top-1 vs measured throughput\n" + _caption(pts))
    if pts:
        y = [r.top1 for r in pts]
        recipes = [top1_recipe(r.model) for r in pts]
        odd = [w is not None for w in recipes]
        _scatter(ax, pts, y, odd)
        same = [i for i, o in enumerate(odd) if not o]
        front = [same[k] for k in pareto_front([(pts[i].infer_samples_per_sec, y[i]) for i in same])]
        ax.plot([pts[i].infer_samples_per_sec for i in front], [y[i] for i in front], "k--", lw=1,
                label="Pareto front (ImageNet-1k, own size)", zorder=2)
        if any(odd):
            ax.scatter([], [], marker="x", color="0.3",
                       label="\u2020 top-1 at another size or with extra data (off the front)")
        _pad_limits(ax, [r.infer_samples_per_sec for r in pts], y)
        ax.legend(fontsize=7, loc="best")
        _label(ax, pts, y, odd)
    else:
        ax.text(0.5, 0.5, "no measured model has a reported top-1", ha="center", transform=ax.transAxes)
    return _save(plt, fig, ax, "top-1 (%)", path)


def plot_gmacs_vs_throughput(results: list[BenchResult], path: str) -> str:
    pts = [r for r in _points(results) if r.infer_gmacs is not None]
    plt, fig, ax = _figure("GMACs per image vs measured throughput\n" + _caption(pts))
    if pts:
        y = [r.infer_gmacs for r in pts]
        _scatter(ax, pts, y)
        _pad_limits(ax, [r.infer_samples_per_sec for r in pts], y)
        ax.legend(fontsize=7, loc="best")
        _label(ax, pts, y)
    else:
        ax.text(0.5, 0.5, "no successful measurements", ha="center", transform=ax.transAxes)
    return _save(plt, fig, ax, "GMACs / image", path)


def write_plots(results: list[BenchResult], out_dir: str, name: str = "bench") -> dict[str, str]:
    return dict(plot_top1=plot_top1_vs_throughput(results, os.path.join(out_dir, f"{name}_top1_vs_throughput.png")),
                plot_gmacs=plot_gmacs_vs_throughput(results,
                                                    os.path.join(out_dir, f"{name}_gmacs_vs_throughput.png")))
