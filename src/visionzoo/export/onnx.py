"""ONNX export of any registered model with the installed torch's default (dynamo) exporter, checked by
onnxruntime against eager."""
from __future__ import annotations

import contextlib
import logging
import os
import warnings

from torch import nn

from visionzoo.errors import BackendUnavailable, ExportError
from visionzoo.export.pt2 import _names, export_program
from visionzoo.export.verify import ExportReport, explain_failure, images_per_second, max_abs_diff


@contextlib.contextmanager
def _quiet_exporter():  # noqa: ANN202
    """Silence the exporter's and optimiser's per-call log lines (torchvision ops skipped, constant folding notes)."""
    logs = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def ort_session(path: str | os.PathLike, threads: int | None = None):  # noqa: ANN201  (onnxruntime.InferenceSession)
    """An onnxruntime CPU session for ``path``; a clear error when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailable("onnxruntime is not installed; pip install 'visionzoo[onnx]'") from e
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])


def ort_runner(session):  # noqa: ANN001, ANN201
    """A callable ``x -> tensor`` over an onnxruntime session with one input and one output."""
    import torch

    name = session.get_inputs()[0].name

    def run(x):  # noqa: ANN001, ANN202
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])
    return run


def onnx(model: nn.Module, path: str | os.PathLike, img_size: int | None = None, batch: int | str = "dynamic",
         opset: int | None = None, check: bool = True, optimize: bool = True, time_budget: float = 1.0,
         program: tuple | None = None) -> ExportReport:
    """Write ``model`` as ONNX (through ``torch.export``), then run it in onnxruntime and compare with eager.

    ``batch``: ``"dynamic"`` (the batch dimension is symbolic) or a fixed size; ``opset``: the ONNX opset
    (the exporter's default when ``None``); ``optimize``: onnxscript's graph optimisation (constant folding,
    fusions); ``time_budget`` seconds each for eager and onnxruntime throughput (0 skips timing); ``program``:
    ``export_program(model, img_size, batch)``'s result when the caller has it already (not exported again).
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as e:
        raise BackendUnavailable("ONNX export needs onnx and onnxscript; pip install 'visionzoo[onnx]'") from e
    import torch

    ep, inputs = program if program is not None else export_program(model, img_size, batch)
    name, family = _names(model)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(ep, dynamo=True, opset_version=opset, optimize=optimize, verbose=False)
        program.save(path)
    except Exception as e:  # noqa: BLE001  (any exporter failure becomes one clear error)
        raise explain_failure(e, name, family, "ONNX") from e
    report = ExportReport(path=path, format="onnx", model=name, img_size=inputs[0].shape[-1], batch=str(batch),
                          max_abs_diff=float("nan"), checked_batches=tuple(x.shape[0] for x in inputs),
                          opset=program.model.opset_imports.get("", None))
    if not check and time_budget <= 0:
        return report
    run = ort_runner(ort_session(path, threads=torch.get_num_threads()))
    try:
        if check:
            report.max_abs_diff = max_abs_diff(run, model, inputs)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise explain_failure(e, name, family, "onnxruntime") from e
    if time_budget > 0:
        x = inputs[-1]
        report.eager_img_s = images_per_second(model, x, time_budget)
        report.exported_img_s = images_per_second(run, x, time_budget)
        report.timed_batch = x.shape[0]
    return report
