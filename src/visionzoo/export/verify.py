"""Checking an exported model against eager, timing both, and naming what could not be exported."""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from visionzoo.errors import ExportError


@dataclass
class ExportReport:
    """What an export wrote and how it compares with eager: the largest absolute difference over the checked
    batches, and images per second of each at ``timed_batch``."""

    path: str
    format: str
    model: str
    img_size: int
    batch: str  # "dynamic" or the fixed batch size
    max_abs_diff: float
    checked_batches: tuple[int, ...]
    eager_img_s: float | None = None
    exported_img_s: float | None = None
    timed_batch: int | None = None
    opset: int | None = None

    def summary(self) -> str:
        speed = ""
        if self.eager_img_s and self.exported_img_s:
            speed = (f"; {self.exported_img_s:.1f} img/s exported vs {self.eager_img_s:.1f} eager at batch "
                     f"{self.timed_batch} ({self.exported_img_s / self.eager_img_s:.2f}x)")
        return (f"{self.model} -> {self.path} ({self.format}, batch {self.batch}, {self.img_size}px): max |diff| vs "
                f"eager {self.max_abs_diff:.2e} over batches {list(self.checked_batches)}{speed}")


def example_inputs(model: nn.Module, img_size: int | None, batches: tuple[int, ...], seed: int = 0) -> list[Tensor]:
    """Random inputs at the model's input size (or ``img_size``), one per batch size, on its device and dtype."""
    ref = next(model.parameters(), None)
    default = model.data_config["input_size"][-1] if hasattr(model, "data_config") else 224
    size = img_size or default
    g = torch.Generator().manual_seed(seed)
    like = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    return [torch.randn(b, getattr(model, "in_chans", 3), size, size, generator=g).to(**like) for b in batches]


def max_abs_diff(run: Callable[[Tensor], Tensor], model: nn.Module, inputs: list[Tensor]) -> float:
    """The largest ``|run(x) - model(x)|`` over ``inputs``."""
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            got, ref = run(x), model(x)
            if got.shape != ref.shape:
                raise ExportError(f"the exported model returns shape {tuple(got.shape)} for batch {x.shape[0]}, "
                                  f"eager returns {tuple(ref.shape)}")
            worst = max(worst, (got.float() - ref.float()).abs().max().item())
    return worst


def images_per_second(run: Callable[[Tensor], object], x: Tensor, budget: float = 1.0) -> float:
    """Throughput of ``run`` on ``x``: one warm-up call, then calls for about ``budget`` seconds."""
    with torch.no_grad():
        run(x)
        n, t0 = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - t0 < budget:
            run(x)
            n += 1
        return n * x.shape[0] / (time.perf_counter() - t0)


_OP = re.compile(r"\b(aten(?:\.|::)[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?|prims\.[A-Za-z0-9_]+|torch\.ops\.\w+\.\w+)")


def explain_failure(e: BaseException, model_name: str, family: str, target: str) -> ExportError:
    """An ``ExportError`` that names the model, its family, the target and the op the exporter stopped at."""
    text = f"{type(e).__name__}: {e}"
    ops = list(dict.fromkeys(_OP.findall(text)))
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(("File ", "("))]
    cause = e.__cause__ or e.__context__
    while cause is not None and not lines:
        lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
        cause = cause.__cause__ or cause.__context__
    why = (lines[-1] if lines else type(e).__name__)[:240]
    where = f"at op {', '.join(ops[:3])} ({why})" if ops else f"({type(e).__name__}: {why})"
    return ExportError(f"{model_name} (family {family}) cannot be exported to {target} {where}. "
                       f"The export table in docs/export.md lists what each family supports; please report this "
                       f"with the command you ran.")
