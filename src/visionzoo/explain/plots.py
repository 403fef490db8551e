"""Pictures people look at, as PNG with matplotlib (no OpenCV): input, map and overlay side by side; a grid of
overlays across methods, blocks or heads; the robustness curves."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["denormalize", "plot_explanation", "plot_grid", "plot_robust"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def denormalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """A normalised ``(C, H, W)`` image back to [0, 1]."""
    m = torch.tensor(list(mean))[:, None, None]
    s = torch.tensor(list(std))[:, None, None]
    if len(m) != x.shape[0]:
        m, s = m.mean().view(1, 1, 1), s.mean().view(1, 1, 1)
    return (x.detach().float().cpu() * s + m).clamp(0, 1)


def _img(image: Tensor) -> np.ndarray:
    a = image.detach().float().cpu().clamp(0, 1)
    return a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)


def _map(m: Tensor, size: tuple[int, int]) -> np.ndarray:
    m = m.detach().float().cpu()
    if tuple(m.shape) != tuple(size):
        m = torch.nn.functional.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    lo, hi = m.min(), m.max()
    return ((m - lo) / (hi - lo).clamp_min(1e-12)).numpy()


def _box(ax, box: Sequence[int] | None, color: str = "lime") -> None:  # noqa: ANN001
    if box is not None:
        x0, y0, x1, y1 = [float(v) for v in box]
        ax.add_patch(_plt().Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=color, lw=1.5))


def plot_explanation(image: Tensor, saliency: Tensor, path: str | os.PathLike, title: str = "",
                     box: Sequence[int] | None = None, alpha: float = 0.5, cmap: str = "jet") -> Path:
    """Input, map and overlay side by side. ``image`` ``(C, H, W)`` in [0, 1]; ``saliency`` ``(h, w)`` (resized)."""
    plt = _plt()
    img = _img(image)
    m = _map(saliency, img.shape[:2])
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    grey = dict(cmap="gray") if img.ndim == 2 else {}
    axes[0].imshow(img, **grey)
    axes[0].set_title("input")
    im = axes[1].imshow(m, cmap=cmap, vmin=0, vmax=1)
    axes[1].set_title("map")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(img, **grey)
    axes[2].imshow(m, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    axes[2].set_title("overlay")
    for ax in axes:
        _box(ax, box)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def plot_grid(image: Tensor, maps: dict[str, Tensor], path: str | os.PathLike, title: str = "",
              box: Sequence[int] | None = None, ncols: int | None = None, alpha: float = 0.5, cmap: str = "jet"
              ) -> Path:
    """The input, then one overlay per entry of ``maps`` (methods, blocks or heads), in a grid."""
    plt = _plt()
    img = _img(image)
    items = [("input", None), *maps.items()]
    n = len(items)
    ncols = ncols or min(n, 6)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 2.5 * nrows), squeeze=False)
    grey = dict(cmap="gray") if img.ndim == 2 else {}
    for ax, (name, m) in zip(axes.flat, items):
        ax.imshow(img, **grey)
        if m is not None:
            ax.imshow(_map(m, img.shape[:2]), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
        _box(ax, box)
        ax.set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def _save(plt, fig, path: str | os.PathLike) -> Path:  # noqa: ANN001
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_robust(reports: Sequence, path: str | os.PathLike) -> Path:
    """One panel per probe that ran, every model in the same panel (``RobustReport`` objects)."""
    plt = _plt()
    probes = [p for p in ("shift", "corrupt", "pgd", "patch") if any(p in r.tables for r in reports)]
    fig, axes = plt.subplots(1, max(1, len(probes)), figsize=(4.2 * max(1, len(probes)), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, probe in zip(axes[0], probes):
        for i, r in enumerate(reports):
            c = colors[i % len(colors)]
            rows = r.tables.get(probe)
            if not rows:
                continue
            if probe == "shift":
                ax.plot([x["shift_px"] for x in rows], [x["consistency"] for x in rows], "o-", color=c, label=r.model)
                ax.set(xlabel="circular shift (px)", ylabel="agreement with unshifted (%)", title="shift consistency")
            elif probe == "corrupt":
                sev = range(1, 6)
                mean = [np.mean([x["top1"] for x in rows if x["severity"] == s]) for s in sev]
                ax.plot([0, *sev], [r.clean_top1, *mean], "o-", color=c, label=r.model)
                ax.set(xlabel="severity (0 = clean)", ylabel="top-1 (%), mean of corruptions",
                       title="common corruptions")
            elif probe == "pgd":
                e = [0, *[x["eps_255"] for x in rows]]
                ax.plot(e, [r.clean_top1, *[x["pgd_top1"] for x in rows]], "o-", color=c, label=f"{r.model} PGD")
                ax.plot(e, [r.clean_top1, *[x["fgsm_top1"] for x in rows]], "s--", color=c, alpha=0.6,
                        label=f"{r.model} FGSM")
                ax.set(xlabel="eps (/255)", ylabel="top-1 (%)", title="L-inf attacks")
            else:
                w = 0.8 / len(reports)
                xs = np.arange(len(rows)) + i * w
                ax.bar(xs, [x["fooling_rate"] for x in rows], width=w, color=c, label=r.model)
                ax.set_xticks(np.arange(len(rows)) + 0.4 - w / 2, [x["perturbation"] for x in rows], fontsize=7)
                ax.set(ylabel="fooling rate (%)", title=f"one {rows[0]['patch_px']}px patch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)
