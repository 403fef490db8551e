"""``torch.export`` of any registered model: a ``.pt2`` ExportedProgram with a static or dynamic batch."""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from visionzoo.export.verify import ExportReport, example_inputs, explain_failure, images_per_second, max_abs_diff

MAX_BATCH = 1024


def batch_spec(batch: int | str) -> tuple[bool, int]:
    """``"dynamic"`` or a positive int -> (dynamic, the batch of the example input)."""
    if batch == "dynamic":
        return True, 2  # an example batch of 2: torch.export specialises sizes 0 and 1
    try:
        n = int(batch)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        from visionzoo.errors import ExportError

        raise ExportError(f"batch must be 'dynamic' or a positive integer, got {batch!r}")
    return False, n


def export_program(model: nn.Module, img_size: int | None = None, batch: int | str = "dynamic"
                   ) -> tuple[torch.export.ExportedProgram, list[torch.Tensor]]:
    """``torch.export.export`` of ``model`` in eval mode; returns the program and the inputs to check it on."""
    dynamic, n = batch_spec(batch)
    model.eval()
    inputs = example_inputs(model, img_size, (n, n + 1) if dynamic else (n,))
    shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},) if dynamic else None
    name, family = _names(model)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, (inputs[0],), dynamic_shapes=shapes)
    except Exception as e:  # noqa: BLE001  (any exporter failure becomes one clear error)
        raise explain_failure(e, name, family, "torch.export") from e
    return ep, inputs


def pt2(model: nn.Module, path: str | os.PathLike, img_size: int | None = None, batch: int | str = "dynamic",
        check: bool = True, time_budget: float = 1.0) -> ExportReport:
    """Write ``model`` as a ``torch.export`` program (``.pt2``), reload it, and check it against eager.

    ``batch``: ``"dynamic"`` (any batch from 1 to 1024) or a fixed size. ``time_budget`` seconds each for the
    eager and exported throughput (0 skips timing).
    """
    ep, inputs = export_program(model, img_size, batch)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.export.save(ep, path)
    loaded = torch.export.load(path).module()
    diff = max_abs_diff(loaded, model, inputs) if check else float("nan")
    report = ExportReport(path=path, format="pt2", model=_names(model)[0], img_size=inputs[0].shape[-1],
                          batch=str(batch), max_abs_diff=diff, checked_batches=tuple(x.shape[0] for x in inputs))
    if time_budget > 0:
        x = inputs[-1]
        report.eager_img_s = images_per_second(model, x, time_budget)
        report.exported_img_s = images_per_second(loaded, x, time_budget)
        report.timed_batch = x.shape[0]
    return report


def _names(model: nn.Module) -> tuple[str, str]:
    variant = getattr(model, "variant", None)
    name = variant[0] if variant else type(model).__name__
    if variant:
        from visionzoo.registry import get_variant

        return name, get_variant(name).family
    return name, type(model).__module__.rsplit(".", 1)[-1]
