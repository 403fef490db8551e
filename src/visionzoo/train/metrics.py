"""Classification metrics (top-1, top-5, loss, per-class accuracy, confusion matrix), the metrics CSV and plots."""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from visionzoo.errors import ArgumentError

__all__ = ["EvalMetrics", "MetricAccumulator", "plot_confusion", "plot_history", "write_csv"]

MAX_CONFUSION_CLASSES = 20


@dataclass
class EvalMetrics:
    """Results of one evaluation. ``confusion[i, j]`` counts images of class ``i`` predicted as ``j``."""

    top1: float
    top5: float
    loss: float
    count: int
    confusion: Tensor = field(repr=False)
    classes: list[str] = field(default_factory=list, repr=False)

    @property
    def per_class(self) -> list[float]:
        """Accuracy of each class in %, ``nan`` for a class with no image."""
        c = self.confusion.double()
        return (100 * c.diag() / c.sum(1)).tolist()

    def as_dict(self) -> dict[str, Any]:
        names = self.classes or [str(i) for i in range(len(self.confusion))]
        return dict(top1=self.top1, top5=self.top5, loss=self.loss, count=self.count,
                    per_class=dict(zip(names, self.per_class)), confusion=self.confusion.tolist())


class MetricAccumulator:
    """Sums of loss, top-1/top-5 hits and the confusion matrix over batches; ``reduce`` sums them across ranks."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss * n, top-1 hits, top-5 hits, n
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor, loss: Tensor | float) -> None:
        n = target.shape[0]
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hit = topk == target[:, None]
        self.sums += torch.tensor([float(loss) * n, hit[:, 0].sum().item(), hit.any(-1).sum().item(), n],
                                  dtype=torch.float64, device=self.sums.device)
        idx = target.long() * self.num_classes + topk[:, 0]
        self.confusion += torch.bincount(idx, minlength=self.num_classes ** 2).view_as(self.confusion)

    def reduce(self) -> MetricAccumulator:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums)
            dist.all_reduce(self.confusion)
        return self

    def result(self, classes: Sequence[str] = ()) -> EvalMetrics:
        loss, top1, top5, n = self.sums.tolist()
        n = max(n, 1)
        return EvalMetrics(100 * top1 / n, 100 * top5 / n, loss / n, int(self.sums[3]), self.confusion.cpu(),
                           list(classes))


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``rows`` (dicts with the same keys, in order) as a CSV file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def _figure(ncols: int = 1, width: float = 5.0, height: float = 4.0):  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: str | os.PathLike) -> Path:  # noqa: ANN001
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_history(history: dict[str, list[dict[str, Any]]], path: str | os.PathLike, title: str = "") -> Path:
    """Loss and accuracy per epoch, one line per run: ``history = {label: rows of the metrics CSV}``."""
    plt, fig, (ax_loss, ax_acc) = _figure(2)
    for label, rows in history.items():
        ep = [r["epoch"] for r in rows]
        (line,) = ax_loss.plot(ep, [r["train_loss"] for r in rows], label=f"{label} train")
        ax_loss.plot(ep, [r["val_loss"] for r in rows], "--", color=line.get_color(), label=f"{label} val")
        ax_acc.plot(ep, [r["val_top1"] for r in rows], color=line.get_color(), label=f"{label} val top-1")
        if "ema_val_top1" in rows[0]:
            ax_acc.plot(ep, [r["ema_val_top1"] for r in rows], ":", color=line.get_color(), label=f"{label} EMA")
    ax_loss.set(xlabel="epoch", ylabel="loss", title=title or "loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_confusion(m: EvalMetrics, path: str | os.PathLike, title: str = "") -> Path:
    """The confusion matrix as a heat map with counts (at most ``MAX_CONFUSION_CLASSES`` classes)."""
    k = len(m.confusion)
    if k > MAX_CONFUSION_CLASSES:
        raise ArgumentError(f"plot_confusion draws up to {MAX_CONFUSION_CLASSES} classes, got {k}")
    names = m.classes or [str(i) for i in range(k)]
    side = 2.5 + 0.45 * k
    plt, fig, (ax,) = _figure(1, side + 1, side)
    im = ax.imshow(m.confusion.numpy(), cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    hi = int(m.confusion.max()) if k else 0
    for i in range(k):
        for j in range(k):
            v = int(m.confusion[i, j])
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > hi / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or f"top-1 {m.top1:.2f}% on {m.count} images")
    return _save(plt, fig, path)
