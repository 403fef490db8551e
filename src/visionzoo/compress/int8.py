"""Real int8 inference on CPU: torchao (PT2E static with the X86 quantizer, dynamic int8 linears) and
onnxruntime (``quantize_static`` QDQ per-channel, ``quantize_dynamic``) on the graph ``visionzoo.export.onnx``
writes. Every path returns a callable ``x -> logits``; ``measure`` times them against fp32 in one process.

torchao follows its PT2E tutorial (``torch.export`` -> ``prepare_pt2e(X86InductorQuantizer)`` -> calibrate ->
``convert_pt2e`` -> ``torch.compile``, Inductor lowering the q/dq patterns to oneDNN int8 kernels) and
``quantize_(model, Int8DynamicActivationInt8WeightConfig())`` (per-token dynamic activations, per-channel
weights), which is meant to run under ``torch.compile``. onnxruntime's static path uses QDQ, per-channel int8
weights and uint8 activations calibrated with MinMax on the calibration images (its defaults otherwise).
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from visionzoo.errors import ArgumentError, BackendUnavailable

BACKENDS = ("torchao-static", "torchao-dynamic", "ort-static", "ort-dynamic")
BENCH_MODES = ("int8-static", "int8-dynamic")  # what ``visionzoo bench --quant`` takes (torchao, compiled)


@dataclass
class Int8Model:
    """A real int8 model: ``run(x)`` gives logits; ``path`` is the file written (ONNX), if any."""

    backend: str
    run: Callable[[Tensor], Tensor]
    path: str | None = None
    note: str = ""

    def __call__(self, x: Tensor) -> Tensor:
        return self.run(x)


def _need_torchao():  # noqa: ANN202
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable("real int8 through torchao needs torchao: pip install 'visionzoo[quant]' "
                                 "(or pip install torchao)") from e


def _quiet():  # noqa: ANN202
    import logging

    for name in ("torchao", "torch._inductor", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="torchao")


def _compile(module: nn.Module, freeze: bool = True, dynamic: bool | None = False) -> Callable[[Tensor], Tensor]:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = freeze
    compiled = torch.compile(module, dynamic=dynamic)

    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return compiled(x)
    return run


def torchao_static(model: nn.Module, calib: list[Tensor], compile: bool = True) -> Int8Model:
    """PT2E static int8 (X86InductorQuantizer, its default config) calibrated on ``calib``; convs and linears."""
    _need_torchao()
    _quiet()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    if not calib:
        raise ArgumentError("torchao-static needs calibration images; the calibration set is empty")
    model = copy.deepcopy(model).eval()
    # NOTE: exported with grad mode on, as torchao's PT2E tutorial does: under no_grad the linears export in a form
    # Inductor's int8 patterns do not match (DeiT-S batch 16: 1.07x fp32 eager instead of 1.8x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1, max=1024)
        try:  # any batch size, as the fp32 model
            graph = torch.export.export(model, (calib[0],), dynamic_shapes=({0: batch},)).module()
        except Exception:  # noqa: BLE001  (a family that specialises the batch: the calibration batch size only)
            graph = torch.export.export(model, (calib[0],)).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for x in calib:
                prepared(x)
        converted = convert_pt2e(prepared)
    if not compile:
        return Int8Model("torchao-static", converted, note="not compiled: q/dq simulated in fp32")
    return Int8Model("torchao-static", _compile(converted, dynamic=None), note="compiled, freezing")


def torchao_dynamic(model: nn.Module, compile: bool = True) -> Int8Model:
    """Dynamic int8 linears (per-token activations, per-channel weights) through ``torchao.quantize_``."""
    _need_torchao()
    _quiet()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    if not compile:
        def run(x: Tensor) -> Tensor:
            with torch.no_grad():
                return model(x)
        return Int8Model("torchao-dynamic", run, note="eager")
    return Int8Model("torchao-dynamic", _compile(model, freeze=False), note="compiled")


def _need_ort():  # noqa: ANN202
    try:
        import onnxruntime.quantization as q
    except ImportError as e:
        raise BackendUnavailable("onnxruntime int8 needs onnx, onnxscript and onnxruntime: "
                                 "pip install 'visionzoo[onnx]'") from e
    return q


def export_fp32(model: nn.Module, path: str | os.PathLike) -> str:
    """The fp32 ONNX graph (dynamic batch) of ``model`` through ``visionzoo.export.onnx``, not re-checked."""
    from visionzoo.export import onnx as export_onnx

    export_onnx(model, path, batch="dynamic", check=False, time_budget=0)
    return os.fspath(path)


def _preprocess(q, src: str, dst: str) -> str:  # noqa: ANN001
    """onnxruntime's recommended pre-processing (shape inference, graph optimisation); the input if it fails."""
    try:
        with _quiet_root():
            q.quant_pre_process(src, dst, skip_symbolic_shape=True)
        return dst
    except Exception:  # noqa: BLE001  (optional step)
        return src


def ort_runner(path: str, threads: int | None = None) -> Callable[[Tensor], Tensor]:
    from visionzoo.export.onnx import ort_runner as runner
    from visionzoo.export.onnx import ort_session

    return runner(ort_session(path, threads=threads or torch.get_num_threads()))


def ort_dynamic(model: nn.Module, out_dir: str | os.PathLike, fp32_path: str | None = None) -> Int8Model:
    """``onnxruntime.quantization.quantize_dynamic`` (int8 weights, dynamic uint8 activations)."""
    q = _need_ort()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = fp32_path or export_fp32(model, out / "model.fp32.onnx")
    pre = _preprocess(q, src, str(out / "model.pre.onnx"))
    dst = str(out / "model.int8-dynamic.onnx")
    with _quiet_root():
        q.quantize_dynamic(pre, dst, weight_type=q.QuantType.QInt8)
    return Int8Model("ort-dynamic", ort_runner(dst), dst)


class _quiet_root:
    """onnxruntime's quantizer logs per-weight notes on the root logger: keep them out of the user's terminal."""

    def __enter__(self) -> None:
        import logging

        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        self.catch = warnings.catch_warnings()
        self.catch.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        import logging

        logging.getLogger().setLevel(self.level)
        self.catch.__exit__(*exc)


class _Reader:
    """onnxruntime's CalibrationDataReader over our calibration batches."""

    def __init__(self, name: str, calib: list[Tensor]) -> None:
        self.items = iter([{name: x.numpy()} for x in calib])

    def get_next(self):  # noqa: ANN201
        return next(self.items, None)


ORT_STATIC_OPS = ("Conv", "MatMul", "Gemm")


def ort_static(model: nn.Module, calib: list[Tensor], out_dir: str | os.PathLike, fp32_path: str | None = None,
               op_types: tuple[str, ...] | None = ORT_STATIC_OPS) -> Int8Model:
    """``onnxruntime.quantization.quantize_static``: QDQ, per-channel int8 weights, uint8 activations (MinMax).

    ``op_types``: the ops quantized, by default convs and matmuls (as torchao's static path: convs and linears; the
    attention matmuls are MatMuls too); ``None`` lets onnxruntime quantize every op it can (adds, softmax, norms...),
    which costs much more accuracy (DeiT-S random weights: 22% agreement with fp32 against 94% for torchao static).
    """
    q = _need_ort()
    if not calib:
        raise ArgumentError("ort-static needs calibration images; the calibration set is empty")
    import onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = fp32_path or export_fp32(model, out / "model.fp32.onnx")
    pre = _preprocess(q, src, str(out / "model.pre.onnx"))
    name = onnx.load(pre, load_external_data=False).graph.input[0].name
    dst = str(out / "model.int8-static.onnx")
    with _quiet_root():
        q.quantize_static(pre, dst, _Reader(name, calib), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          op_types_to_quantize=list(op_types) if op_types else None)
    return Int8Model("ort-static", ort_runner(dst), dst)


def int8(model: nn.Module, backend: str, calib: list[Tensor] | None = None, out_dir: str | os.PathLike | None = None,
         compile: bool = True) -> Int8Model:
    """Real int8 ``model`` through ``backend``: one of ``BACKENDS``."""
    if backend not in BACKENDS:
        raise ArgumentError(f"int8 backend must be one of {BACKENDS}, got {backend!r}")
    calib = list(calib or [])
    if backend == "torchao-static":
        return torchao_static(model, calib, compile)
    if backend == "torchao-dynamic":
        return torchao_dynamic(model, compile)
    out = out_dir or tempfile.mkdtemp(prefix="visionzoo-int8-")
    return ort_static(model, calib, out) if backend == "ort-static" else ort_dynamic(model, out)


def for_bench(model: nn.Module, mode: str, example: Tensor) -> Callable[[Tensor], Tensor]:
    """The model ``visionzoo bench --quant MODE`` times: torchao int8, compiled (calibrated on ``example``)."""
    if mode == "int8-static":
        return torchao_static(model, [example]).run
    if mode == "int8-dynamic":
        return torchao_dynamic(model).run
    raise ArgumentError(f"--quant must be one of {BENCH_MODES}, got {mode!r}")
