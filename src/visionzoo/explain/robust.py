"""Robustness probes, comparable across models: shift consistency, patch perturbations, common corruptions and
FGSM/PGD. Every probe takes images in [0, 1] (the model's normalisation is applied inside), is deterministic for
a seed (a ``torch.Generator`` for every random draw, the model in eval mode) and gives rows of a table.

- ``shift``: the agreement of the prediction with the unshifted one under a k-pixel circular shift (``torch.roll``)
  in a random one of the 8 directions per image, and the accuracy (Zhang, "Making Convolutional Networks
  Shift-Invariant Again", ICML 2019, measures consistency the same way, between two random shifts).
- ``patch``: one ``patch`` x ``patch`` square (16, the ECCV 2022 protocol of Gu et al., "Are Vision Transformers
  Robust to Patch Perturbations?") at a random position aligned to a 16-pixel grid, filled with uniform noise
  (natural) or optimised by PGD (adversarial: unbounded values in [0, 1], ``patch_steps`` signed-gradient steps of
  ``patch_alpha`` from a uniform start, maximising the cross-entropy of the true class). Reported: accuracy and the
  fooling rate (share of the correctly classified images whose prediction changes).
- ``corrupt``: ImageNet-C's Gaussian noise, Gaussian blur, JPEG, brightness and contrast (Hendrycks & Dietterich,
  ICLR 2019) at its 5 severities, written with torch and Pillow; parameters are ImageNet-C's, in pixels for the
  blur (so a small image is blurred relatively more).
- ``pgd``: L-inf FGSM and PGD (Madry et al., 2018: ``pgd_steps`` steps of 2.5 eps / steps from a uniform random
  start) at each ``eps`` (in [0, 1] pixel units, e.g. 1/255..8/255).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from visionzoo.errors import ArgumentError

from .faithfulness import gaussian_blur

__all__ = ["CORRUPTIONS", "PROBES", "Normalized", "RobustReport", "corrupt", "robustness", "split_images",
           "summarize", "write_report"]

PROBES = ("shift", "patch", "corrupt", "pgd")
CORRUPTIONS = {  # ImageNet-C's parameters for severities 1..5
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # std in [0, 1] units
    "gaussian_blur": (1.0, 2.0, 3.0, 4.0, 6.0),  # sigma in pixels
    "jpeg": (25, 18, 15, 10, 7),  # Pillow quality
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to HSV value
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # factor around the image mean
}


class Normalized(nn.Module):
    """``model`` on ``[0, 1]`` images: ``model((x - mean) / std)``."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        C = getattr(model, "in_chans", len(mean))
        mean, std = list(mean), list(std)
        if len(mean) != C:  # grey models: the mean of the statistics
            mean, std = [sum(mean) / len(mean)] * C, [sum(std) / len(std)] * C
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean.to(x)) / self.std.to(x))


def _jpeg(x: Tensor, quality: int) -> Tensor:
    out = []
    for img in x:
        a = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()  # (C, H, W) -> (H, W, C)
        pil = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(quality))
        back = np.asarray(Image.open(buf).convert(pil.mode), dtype=np.uint8)
        back = back[..., None] if back.ndim == 2 else back
        out.append(torch.from_numpy(back.copy()).permute(2, 0, 1).float().div(255))
    return torch.stack(out).to(x)


def _brightness(x: Tensor, c: float) -> Tensor:
    """HSV value + c (hue and saturation kept): every channel scales by V'/V; black becomes grey V'."""
    v = x.amax(1, keepdim=True)
    v2 = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * v2 / v.clamp_min(1e-12), v2.expand_as(x))


def corrupt(x: Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """``x`` in [0, 1] with corruption ``name`` at ``severity`` 1..5 (ImageNet-C's parameters)."""
    if name not in CORRUPTIONS:
        raise ArgumentError(f"corrupt: name must be one of {tuple(CORRUPTIONS)}, got {name!r}")
    if not 1 <= severity <= 5:
        raise ArgumentError(f"corrupt: severity must be 1..5, got {severity}")
    c = CORRUPTIONS[name][severity - 1]
    if name == "gaussian_noise":
        noise = torch.randn(x.shape, generator=generator).to(x)
        out = x + noise * c
    elif name == "gaussian_blur":
        out = gaussian_blur(x, c)
    elif name == "jpeg":
        out = _jpeg(x, c)
    elif name == "brightness":
        out = _brightness(x, c)
    else:
        mean = x.mean((1, 2, 3), keepdim=True)
        out = (x - mean) * c + mean
    return out.clamp(0, 1)


@dataclass
class RobustReport:
    """``tables``: probe -> rows (dicts); ``clean_top1`` in %; ``settings``: what ran."""

    model: str
    clean_top1: float
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def _batches(n: int, bs: int) -> list[slice]:
    return [slice(i, min(n, i + bs)) for i in range(0, n, bs)]


@torch.no_grad()
def _predict(f: nn.Module, x: Tensor, bs: int) -> Tensor:
    return torch.cat([f(x[s]).argmax(1) for s in _batches(len(x), bs)])


def _pct(mask: Tensor) -> float:
    return 100.0 * mask.float().mean().item() if mask.numel() else float("nan")


def _shift_probe(f: nn.Module, x: Tensor, y: Tensor, pred: Tensor, shifts: tuple[int, ...], g: torch.Generator,
                 bs: int) -> list[dict[str, Any]]:
    dirs = torch.tensor([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
    rows = []
    for k in shifts:
        d = dirs[torch.randint(len(dirs), (len(x),), generator=g)] * k  # (N, 2)
        moved = torch.stack([torch.roll(img, shifts=(int(dy), int(dx)), dims=(1, 2)) for img, (dy, dx) in zip(x, d)])
        p = _predict(f, moved, bs)
        rows.append(dict(shift_px=k, consistency=_pct(p == pred), top1=_pct(p == y)))
    return rows


def _patch_masks(x: Tensor, patch: int, g: torch.Generator) -> Tensor:
    """One ``patch`` x ``patch`` square per image at a random position on the ``patch``-pixel grid: ``(N, 1, H, W)``."""
    N, _, H, W = x.shape
    if patch > min(H, W):
        raise ArgumentError(f"patch probe: patch {patch} is larger than the images ({H}x{W})")
    ny, nx = H // patch, W // patch
    cell = torch.randint(ny * nx, (N,), generator=g)
    mask = torch.zeros(N, 1, H, W, dtype=torch.bool)
    for i, c in enumerate(cell.tolist()):
        r, q = divmod(c, nx)
        mask[i, :, r * patch:(r + 1) * patch, q * patch:(q + 1) * patch] = True
    return mask.to(x.device)


def _patch_probe(f: nn.Module, x: Tensor, y: Tensor, pred: Tensor, patch: int, steps: int, alpha: float,
                 g: torch.Generator, bs: int) -> list[dict[str, Any]]:
    mask = _patch_masks(x, patch, g)
    noise = torch.rand(x.shape, generator=g).to(x)
    ok = pred == y
    rows = []
    natural = torch.where(mask, noise, x)
    p = _predict(f, natural, bs)
    rows.append(dict(perturbation="random-noise patch", patch_px=patch, top1=_pct(p == y),
                     fooling_rate=_pct(p[ok] != y[ok])))
    start = torch.rand(x.shape, generator=g).to(x)
    adv = torch.empty_like(x)
    for s in _batches(len(x), bs):
        xb, yb, mb = x[s], y[s], mask[s]
        delta = start[s].clone()
        for _ in range(steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(f(torch.where(mb, delta, xb)), yb)
                (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + alpha * grad.sign()).clamp(0, 1)
        adv[s] = torch.where(mb, delta, xb).detach()
    p = _predict(f, adv, bs)
    rows.append(dict(perturbation="adversarial patch (PGD)", patch_px=patch, top1=_pct(p == y),
                     fooling_rate=_pct(p[ok] != y[ok])))
    return rows


def _attack(f: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, g: torch.Generator | None) -> Tensor:
    """FGSM (``steps == 1``, no random start) or PGD in the L-inf ball of radius ``eps`` around ``x`` in [0, 1]."""
    alpha = eps if steps == 1 else 2.5 * eps / steps
    adv = x.clone() if g is None else (x + (torch.rand(x.shape, generator=g).to(x) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(F.cross_entropy(f(adv), y), adv)
        adv = torch.min(torch.max(adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def _pgd_probe(f: nn.Module, x: Tensor, y: Tensor, eps_list: tuple[float, ...], steps: int, g: torch.Generator,
               bs: int) -> list[dict[str, Any]]:
    rows = []
    for eps in eps_list:
        fgsm = torch.cat([_attack(f, x[s], y[s], eps, 1, None) for s in _batches(len(x), bs)])
        pgd = torch.cat([_attack(f, x[s], y[s], eps, steps, g) for s in _batches(len(x), bs)])
        rows.append(dict(eps=eps, eps_255=round(eps * 255, 2), fgsm_top1=_pct(_predict(f, fgsm, bs) == y),
                         pgd_top1=_pct(_predict(f, pgd, bs) == y), pgd_steps=steps))
    return rows


def _corrupt_probe(f: nn.Module, x: Tensor, y: Tensor, names: tuple[str, ...], g: torch.Generator, bs: int
                   ) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        for sev in range(1, 6):
            xc = torch.cat([corrupt(x[s], name, sev, g) for s in _batches(len(x), bs)])
            rows.append(dict(corruption=name, severity=sev, top1=_pct(_predict(f, xc, bs) == y)))
    return rows


def robustness(model: nn.Module, x: Tensor, y: Tensor, probes: tuple[str, ...] | list[str] = PROBES, *,
               mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None, seed: int = 0,
               batch_size: int = 64, shifts: tuple[int, ...] = (1, 2, 4, 8), patch: int = 16, patch_steps: int = 20,
               patch_alpha: float = 0.1, eps: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255),
               pgd_steps: int = 10, corruptions: tuple[str, ...] = tuple(CORRUPTIONS)) -> RobustReport:
    """Run ``probes`` on images ``x`` in [0, 1] ``(N, C, H, W)`` with labels ``y``; ``mean``/``std`` default to the
    model's ``data_config``. The model is put in eval mode."""
    bad = [p for p in probes if p not in PROBES]
    if bad or not probes:
        raise ArgumentError(f"probes must be a non-empty subset of {PROBES}, got {tuple(probes)}")
    if x.ndim != 4 or x.shape[0] != y.shape[0]:
        raise ArgumentError(f"robustness: x must be (N, C, H, W) with one label each, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)} labels")
    if x.min() < 0 or x.max() > 1:
        raise ArgumentError("robustness: x must hold images in [0, 1] (the model's normalisation is applied inside)")
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ArgumentError(f"corruptions must be among {tuple(CORRUPTIONS)}, got {unknown}")
    dc = getattr(model, "data_config", {}) or {}
    f = Normalized(model, mean or dc.get("mean", (0.5,) * 3), std or dc.get("std", (0.5,) * 3)).eval()
    p0 = next(model.parameters())
    x, y = x.to(p0.device, p0.dtype), y.to(p0.device)
    pred = _predict(f, x, batch_size)
    report = RobustReport(getattr(model, "name", type(model).__name__), _pct(pred == y),
                          settings=dict(seed=seed, images=len(x), shifts=shifts, patch=patch, patch_steps=patch_steps,
                                        patch_alpha=patch_alpha, eps=eps, pgd_steps=pgd_steps))
    for probe in PROBES:  # a fixed order, one generator per probe: each probe's draws do not depend on the others
        if probe not in probes:
            continue
        g = torch.Generator().manual_seed(seed + PROBES.index(probe))
        if probe == "shift":
            report.tables[probe] = _shift_probe(f, x, y, pred, tuple(shifts), g, batch_size)
        elif probe == "patch":
            report.tables[probe] = _patch_probe(f, x, y, pred, patch, patch_steps, patch_alpha, g, batch_size)
        elif probe == "corrupt":
            report.tables[probe] = _corrupt_probe(f, x, y, tuple(corruptions), g, batch_size)
        else:
            report.tables[probe] = _pgd_probe(f, x, y, tuple(eps), pgd_steps, g, batch_size)
    return report


def summarize(report: RobustReport) -> dict[str, float]:
    """One row per model for a comparison: clean top-1, mean shift consistency, mean corruption top-1, top-1 per
    severity, PGD top-1 at the largest eps, and the patch fooling rates."""
    out: dict[str, float] = {"clean_top1": report.clean_top1}
    t = report.tables
    if "shift" in t:
        out["shift_consistency"] = float(np.mean([r["consistency"] for r in t["shift"]]))
    if "corrupt" in t:
        out["corrupt_top1"] = float(np.mean([r["top1"] for r in t["corrupt"]]))
        for sev in range(1, 6):
            out[f"corrupt_s{sev}"] = float(np.mean([r["top1"] for r in t["corrupt"] if r["severity"] == sev]))
    if "pgd" in t:
        last = t["pgd"][-1]
        out[f"fgsm_top1@{last['eps_255']}/255"] = last["fgsm_top1"]
        out[f"pgd_top1@{last['eps_255']}/255"] = last["pgd_top1"]
    if "patch" in t:
        out["noise_patch_fooling"] = t["patch"][0]["fooling_rate"]
        out["adv_patch_fooling"] = t["patch"][1]["fooling_rate"]
    return out


def markdown(reports: list[RobustReport]) -> str:
    """The tables of one or more reports (models side by side per probe)."""
    lines = []
    rows = [dict(model=r.model, **{k: round(v, 2) for k, v in summarize(r).items()}) for r in reports]
    lines += _md_table(rows, "summary")
    for probe in PROBES:
        rows = [dict(model=r.model, **row) for r in reports for row in r.tables.get(probe, [])]
        if rows:
            lines += _md_table(rows, probe)
    return "\n".join(lines) + "\n"


def _md_table(rows: list[dict[str, Any]], title: str) -> list[str]:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            *["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows], ""]


def write_report(reports: RobustReport | list[RobustReport], out_dir: str | Path) -> dict[str, str]:
    """``robust.md``, ``robust.csv`` (one row per model, see ``summarize``), one CSV per probe and ``robust.png``."""
    from visionzoo.train.metrics import write_csv

    from .plots import plot_robust

    reports = [reports] if isinstance(reports, RobustReport) else list(reports)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robust.md").write_text(markdown(reports))
    write_csv([dict(model=r.model, **summarize(r)) for r in reports], out / "robust.csv")
    files = {"markdown": str(out / "robust.md"), "summary": str(out / "robust.csv")}
    for probe in PROBES:
        rows = [dict(model=r.model, **row) for r in reports for row in r.tables.get(probe, [])]
        if rows:
            write_csv(rows, out / f"robust_{probe}.csv")
            files[probe] = str(out / f"robust_{probe}.csv")
    files["plot"] = str(plot_robust(reports, out / "robust.png"))
    return files


def split_images(dataset: Any, size: int, crop_pct: float = 1.0, interpolation: str = "bicubic",
                 limit: int | None = 256, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images in [0, 1] ``(N, C, size, size)`` and labels of a ``train.data.ImageDataset`` (a seeded subset of
    ``limit``), preprocessed as evaluation is (``EvalResize``)."""
    from visionzoo.train.data import EvalResize

    n = len(dataset)
    if n == 0:
        raise ArgumentError("robustness: the evaluation split has no images")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values.tolist() \
        if limit is not None and limit < n else list(range(n))
    t = EvalResize(size, crop_pct, interpolation)
    x = torch.stack([t(dataset.load(dataset.samples[i])) for i in idx]).float().div(255)
    y = torch.tensor([dataset.targets[i] for i in idx])
    return x, y
