"""Measuring a compressed model against the fp32 one: per-layer SQNR, agreement, top-1, params, MACs, img/s;
interleaved timing in one process; the markdown table and the plot of ``visionzoo compress``."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from visionzoo.compress.quantizers import sqnr_db

__all__ = ["CompressReport", "Row", "agreement", "layer_sqnr", "predict", "time_interleaved"]


@torch.no_grad()
def predict(run: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 64) -> Tensor:
    """The logits of ``run`` over ``x`` in batches."""
    return torch.cat([run(b).float() for b in x.split(batch_size)])


def agreement(a: Tensor, b: Tensor) -> float:
    """The fraction of rows whose argmax is the same in two logit tensors."""
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def top1(logits: Tensor, labels: Tensor | None) -> float | None:
    return None if labels is None else 100.0 * (logits.argmax(-1) == labels).float().mean().item()


@torch.no_grad()
def layer_sqnr(ref: nn.Module, model: nn.Module, x: Tensor, names: list[str] | None = None) -> dict[str, float]:
    """SQNR (dB) of each named layer's output in ``model`` against the same layer of ``ref`` on input ``x``.

    ``names`` default to the fake-quantized layers and attention cores of ``model``. The error accumulates: each
    layer of ``model`` sees the quantized outputs of the layers before it, as it does at inference.
    """
    from visionzoo.compress.quantize import quant_layers

    names = list(quant_layers(model)) if names is None else names
    outs: dict[str, dict[str, Tensor]] = {"ref": {}, "q": {}}

    def grab(store: dict[str, Tensor], name: str):  # noqa: ANN202
        def hook(m: nn.Module, args: tuple, out: object) -> None:
            if isinstance(out, Tensor) and name not in store:
                store[name] = out.detach()
        return hook

    handles = []
    for key, net in (("ref", ref), ("q", model)):
        mods = dict(net.named_modules())
        for n in names:
            if n in mods:
                handles.append(mods[n].register_forward_hook(grab(outs[key], n)))
    try:
        ref.eval()(x)
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return {n: sqnr_db(outs["ref"][n], outs["q"][n]) for n in names if n in outs["ref"] and n in outs["q"]
            and outs["ref"][n].shape == outs["q"][n].shape}


def time_interleaved(runs: dict[str, Callable[[Tensor], object]], x: Tensor, budget: float = 2.0, repeats: int = 3
                     ) -> dict[str, float]:
    """Images per second of each callable on ``x``: warm-up, then ``repeats`` rounds that time each one in turn
    (interleaved, so load from other processes falls on all alike); the median round of each."""
    rates: dict[str, list[float]] = {k: [] for k in runs}
    steps = {}
    with torch.inference_mode():
        for k, fn in runs.items():  # warm-up (the first call of a compiled model compiles) and a step estimate
            fn(x)
            t0 = time.perf_counter()
            fn(x)
            steps[k] = max(1, round(budget / repeats / max(time.perf_counter() - t0, 1e-4)))
        for _ in range(repeats):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                for _ in range(steps[k]):
                    fn(x)
                rates[k].append(steps[k] * x.shape[0] / (time.perf_counter() - t0))
    return {k: sorted(v)[len(v) // 2] for k, v in rates.items()}


@dataclass
class Row:
    """One model in a compression report: the fp32 reference or a compressed form."""

    name: str
    params_m: float | None = None
    gmacs: float | None = None
    img_s: float | None = None
    top1: float | None = None
    agreement: float | None = None  # with the fp32 reference, 0..1
    sqnr_db: float | None = None  # of the logits against the fp32 reference
    note: str = ""


@dataclass
class CompressReport:
    """Rows (fp32 first), per-layer SQNR of the simulated quantization, and how it was measured."""

    model: str
    rows: list[Row] = field(default_factory=list)
    layer_sqnr: dict[str, dict[str, float]] = field(default_factory=dict)
    setup: dict[str, object] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        head = "| model | params (M) | GMACs | img/s | top-1 % | agreement % | logit SQNR dB | note |\n"
        head += "|---|---|---|---|---|---|---|---|\n"
        lines = []
        for r in self.rows:
            lines.append("| " + " | ".join([
                r.name, _f(r.params_m, 3), _f(r.gmacs, 3), _f(r.img_s, 1), _f(r.top1, 2),
                _f(None if r.agreement is None else 100 * r.agreement, 2), _f(r.sqnr_db, 1), r.note]) + " |")
        setup = ", ".join(f"{k} {v}" for k, v in self.setup.items())
        return f"{self.model}: {setup}\n\n" + head + "\n".join(lines) + "\n"

    def sqnr_markdown(self) -> str:
        if not self.layer_sqnr:
            return ""
        schemes = list(self.layer_sqnr)
        layers = list(dict.fromkeys(n for s in schemes for n in self.layer_sqnr[s]))
        out = "| layer | " + " | ".join(schemes) + " |\n|---|" + "---|" * len(schemes) + "\n"
        for n in layers:
            out += f"| {n} | " + " | ".join(_f(self.layer_sqnr[s].get(n), 1) for s in schemes) + " |\n"
        return out

    def write(self, out_dir: str | Path, plot: bool = True) -> dict[str, str]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(self.markdown() + ("\nper-layer SQNR (dB)\n\n" + self.sqnr_markdown()
                                                          if self.layer_sqnr else ""))
        (out / "report.json").write_text(json.dumps(dict(model=self.model, setup=self.setup,
                                                         rows=[asdict(r) for r in self.rows],
                                                         layer_sqnr=self.layer_sqnr), indent=1, default=str))
        self.files.update(report=str(out / "report.md"), json=str(out / "report.json"))
        if plot:
            try:
                self.files["plot"] = str(self.plot(out / "report.png"))
            except ImportError:
                pass
        return self.files

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = 2 if self.layer_sqnr else 1
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
        ax = axes[0][0]
        for r in self.rows:
            y = r.agreement * 100 if r.agreement is not None else r.top1
            x = r.img_s if r.img_s is not None else r.gmacs
            if x is None or y is None:
                continue
            ax.scatter([x], [y], s=30 + 10 * (r.params_m or 1))
            ax.annotate(r.name, (x, y), fontsize=7)
        ax.set_xlabel("img/s" if any(r.img_s for r in self.rows) else "GMACs")
        ax.set_ylabel("agreement with fp32 % (top-1 for fp32)")
        ax.set_title(self.model)
        if self.layer_sqnr:
            ax = axes[0][1]
            for scheme, vals in self.layer_sqnr.items():
                ys = [v if math.isfinite(v) else 100.0 for v in vals.values()]
                ax.plot(range(len(ys)), ys, marker=".", label=scheme)
            ax.set_xlabel("layer (execution order)")
            ax.set_ylabel("output SQNR dB")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)


def _f(v: float | None, nd: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{nd}f}"
