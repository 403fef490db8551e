"""Which patches ended up in which token: a label map from the tracked sources, and a PNG of it (as in ToMe's
figures: every merged group painted in its mean colour, group borders in white, dropped patches darkened)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.errors import ArgumentError


def merge_labels(source: Tensor, prefix: int, grid: tuple[int, int]) -> Tensor:
    """``(H, W)`` labels of one image's patches: the final token that holds each patch, ``-1`` where it was dropped.

    ``source`` is that image's ``(N, N0)`` row of ``TokenReduction.source``; ``prefix`` its class/distillation
    tokens; ``grid`` the ``(H, W)`` patch grid of the input.
    """
    src = source[prefix:, prefix:]  # final patch tokens x input patch tokens
    if src.shape[-1] != grid[0] * grid[1]:
        raise ArgumentError(f"merge_labels: the source covers {src.shape[-1]} patches, the grid {grid} has "
                         f"{grid[0] * grid[1]}")
    held = src.amax(0) > 0
    labels = torch.where(held, src.argmax(0), torch.full_like(held, -1, dtype=torch.long))
    return labels.reshape(grid)


@torch.no_grad()
def plot_merges(model: nn.Module, image: Tensor, path: str | Path) -> Path:
    """Run ``model`` (with a token reduction applied) on ``image`` ``(C, H, W)`` and save a PNG of the input next to
    its merged patches; returns the path. Source tracking is switched on for this one pass."""
    handle = getattr(model, "token_reduction", None)
    if handle is None:
        raise ArgumentError("plot_merges: apply a token reduction first (visionzoo.tokens.apply(model, 'tome', r=8))")
    x = image[None] if image.ndim == 3 else image[:1]
    if x.ndim != 4:
        raise ArgumentError(f"plot_merges: image must be (C, H, W), got shape {tuple(image.shape)}")
    was_training, traced = model.training, [s.trace_source for s in handle.states]
    try:
        for s in handle.states:
            s.trace_source = True
        model.eval()(x.to(next(model.parameters()).device))
        source, prefix = handle.states[0].source, handle.states[0].prefix
    finally:
        model.train(was_training)
        for s, t in zip(handle.states, traced, strict=True):
            s.trace_source = t
    if source is None:
        raise ArgumentError(f"plot_merges: {handle.spec} keeps no patch-to-token source (a soft mix has none)")
    H, W = x.shape[-2:]
    n0 = source.shape[-1] - prefix
    gh = round(math.sqrt(n0 * H / W))
    gw = n0 // max(gh, 1)
    if gh * gw != n0:
        raise ArgumentError(f"plot_merges: cannot lay {n0} patch tokens out on a {H}x{W} input")
    labels = merge_labels(source[0].float().cpu(), prefix, (gh, gw))
    img = _display(model, x[0].float().cpu())  # (H, W, 3) in [0, 1]
    painted = _paint(img, labels)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    for ax, pic, title in ((axes[0], img, "input"),
                           (axes[1], painted, f"{handle.spec}: {int(labels.max()) + 1} tokens")):
        ax.imshow(pic.numpy())
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _display(model: nn.Module, x: Tensor) -> Tensor:
    cfg = getattr(model, "data_config", {}) or {}
    mean = torch.tensor(cfg.get("mean", (0.0,) * 3))[: x.shape[0], None, None]
    std = torch.tensor(cfg.get("std", (1.0,) * 3))[: x.shape[0], None, None]
    img = (x * std + mean).clamp(0, 1)
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-6) if img.max() - img.min() < 0.05 else img
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.permute(1, 2, 0)  # (3, H, W) -> (H, W, 3)


def _paint(img: Tensor, labels: Tensor) -> Tensor:
    """Each group of patches in its mean colour, borders between groups white, dropped patches darkened."""
    H, W, _ = img.shape
    gh, gw = labels.shape
    cells = F.adaptive_avg_pool2d(img.permute(2, 0, 1)[None], (gh, gw))[0].permute(1, 2, 0).reshape(-1, 3)
    flat = labels.reshape(-1)
    G = int(flat.max()) + 1
    held = flat >= 0
    sums = torch.zeros(G + 1, 3).index_add_(0, torch.where(held, flat, G), cells)
    counts = torch.zeros(G + 1).index_add_(0, torch.where(held, flat, G), torch.ones(len(flat)))
    colour = sums / counts.clamp_min(1)[:, None]
    grid_colour = torch.where(held[:, None], colour[torch.where(held, flat, G)], cells * 0.25).reshape(gh, gw, 3)
    up = grid_colour.permute(2, 0, 1)[None]
    out = F.interpolate(up, size=(H, W), mode="nearest")[0].permute(1, 2, 0).clone()
    lab = F.interpolate(labels[None, None].float(), size=(H, W), mode="nearest")[0, 0]
    edge = torch.zeros(H, W, dtype=torch.bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    out[edge] = 1.0
    return out
