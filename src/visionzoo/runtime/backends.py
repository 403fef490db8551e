"""The inference backends ``visionzoo.deploy`` chooses from, each a builder of a callable ``x -> logits``.

| backend       | fp32 | bf16 | int8 | what it runs |
|---|---|---|---|---|
| `eager`       | ✓ | autocast | dynamic-quantized Linear | the model as given, under `inference_mode` |
| `eager_tuned` | ✓ | autocast, bf16 packed | - | `fuse()`, each Linear/Conv2d on the kernel measured fastest |
| `inductor`    | ✓ | autocast | - | `torch.compile`, freezing: weights folded, prepacked (oneDNN where faster) |
| `torchscript` | ✓ | traced under autocast | - | `torch.jit.trace` + `freeze`, with oneDNN Graph fusion (LLGA) |
| `onnxruntime` | ✓ | - | dynamic quantization | the ONNX file of `visionzoo.export.onnx` |
| `openvino`    | ✓ | bf16 inference precision | - | the same ONNX file, compiled by OpenVINO for this CPU |

Every exported backend reaches the model only through ``visionzoo.export`` and the model contract (``fuse()``,
``cpu_channels_last``): no backend knows a family.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from visionzoo.errors import ArgumentError, BackendUnavailable, VisionZooError
from visionzoo.layers import AttentionCore
from visionzoo.runtime import llga
from visionzoo.runtime.attention import AttentionChoice, tune_attention
from visionzoo.runtime.cpu import cpu_name, has_bf16
from visionzoo.runtime.kernels import OPS, best_seconds, count_swapped, fast_kernels, kernel_choice

BACKENDS = ("eager", "eager_tuned", "inductor", "torchscript", "onnxruntime", "openvino")
DTYPES = ("fp32", "bf16", "int8")
TOLERANCE = {"fp32": 1e-4, "bf16": 0.1, "int8": 0.25}  # relative: max |diff| / max |eager fp32| (deploy's default)
SUPPORTS = {"eager": ("fp32", "bf16", "int8"), "eager_tuned": ("fp32", "bf16"), "inductor": ("fp32", "bf16"),
            "torchscript": ("fp32", "bf16"), "onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16")}
WHY_NOT = {("onnxruntime", "bf16"): "onnxruntime's CPU provider has no bf16 kernels for these graphs",
           ("eager_tuned", "int8"): "int8 Linear has one torch kernel (dynamic quantization): use backend 'eager'",
           ("inductor", "int8"): "int8 through inductor needs PT2E quantization (torchao), not wired here",
           ("torchscript", "int8"): "int8 through TorchScript's oneDNN Graph needs static quantization, not wired here",
           ("openvino", "int8"): "int8 through OpenVINO needs NNCF post-training quantization, not wired here"}


@dataclass
class Built:
    """A backend ready to run: the callable, what it is, how long it took to build."""

    run: Callable[[Tensor], Tensor]
    detail: str
    build_s: float = 0.0
    module: nn.Module | None = None  # the torch module behind a torch backend


class Shared:
    """What several candidates of one ``deploy`` call share: the fused deploy copy and the ONNX file."""

    def __init__(self, model: nn.Module, x: Tensor, cache_dir: str | None = None) -> None:
        self.model, self.x, self.cache_dir = model, x, cache_dir
        self._fused: nn.Module | None = None
        self.fuse_note = ""
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._onnx: str | None = None
        self._onnx_error: Exception | None = None
        self.kernels: dict[str, dict] = {}  # dtype -> {op: KernelChoice} that eager_tuned used
        self.attention: dict[str, AttentionChoice] = {}  # dtype -> what eager_tuned measured for attention

    @property
    def fused(self) -> nn.Module:
        """A copy of the model in eval mode with ``fuse()`` applied (the model itself is left alone)."""
        if self._fused is None:
            m = copy.deepcopy(self.model).eval()
            if callable(getattr(m, "fuse", None)):
                try:
                    m = m.fuse() or m
                    self.fuse_note = "fused"
                except Exception as e:  # noqa: BLE001  (a failing fuse costs speed, not correctness)
                    m = copy.deepcopy(self.model).eval()
                    self.fuse_note = f"fuse() failed ({type(e).__name__}), unfused"
            self._fused = m
        return self._fused

    def onnx_path(self) -> str:
        """The fused model as ONNX with a dynamic batch (exported once, through ``visionzoo.export.onnx``)."""
        if self._onnx_error is not None:
            raise self._onnx_error  # the export failed for an earlier candidate: do not try again
        if self._onnx is None:
            from visionzoo.export import onnx

            H, W = self.x.shape[-2:]
            if H != W:
                raise BackendUnavailable(f"ONNX export takes a square img_size; the example input is {H}x{W}")
            self._tmp = tempfile.TemporaryDirectory(prefix="visionzoo-deploy-")
            path = os.path.join(self._tmp.name, "model.onnx")
            try:
                onnx(self.fused, path, img_size=int(H), batch="dynamic", check=False, time_budget=0)
            except Exception as e:
                self._onnx_error = e
                raise
            self._onnx = path
        return self._onnx

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp, self._onnx = None, None


def agreement(out: Tensor, ref: Tensor) -> tuple[float, float | None]:
    """``(relative difference, top-1 agreement)`` of ``out`` with the eager fp32 ``ref``: ``max |out - ref| / max
    |ref|`` (inf when ``out`` is not finite) and the fraction of rows whose argmax matches (None unless logits)."""
    out, ref = out.float(), ref.float()
    if out.shape != ref.shape:
        raise VisionZooError(f"output shape {tuple(out.shape)} differs from eager's {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return math.inf, None
    rel = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item() if ref.dim() == 2 and ref.shape[-1] > 1 else None
    return rel, top1


# --- availability ----------------------------------------------------------------------------------------
def unavailable(backend: str, dtype: str) -> str | None:
    """Why ``backend`` cannot run ``dtype`` here (a sentence with the fix), or None when it can."""
    if backend not in BACKENDS:
        raise ArgumentError(f"deploy: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if dtype not in SUPPORTS[backend]:
        return WHY_NOT.get((backend, dtype), f"{backend} does not run {dtype}")
    if dtype == "bf16" and not has_bf16():
        return (f"bf16 needs bf16 hardware (avx512_bf16, AMX or Arm BF16 in the CPU flags); {cpu_name()} has none, "
                f"so bf16 would be emulated and slower than fp32; use dtype='fp32'")
    if backend == "inductor":
        if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
            return "inductor compiles C++ for the CPU and found no compiler (g++, c++ or clang++) on PATH"
    if backend in ("onnxruntime", "openvino"):
        extra = "onnx" if backend == "onnxruntime" else "openvino"  # each extra holds the exporter's packages too
        for mod in ("onnx", "onnxscript", backend):
            try:
                __import__(mod)
            except ImportError:
                return f"{backend} needs the Python package {mod!r}; pip install 'visionzoo[{extra}]'"
        if dtype == "int8":
            try:
                import onnxruntime.quantization  # noqa: F401
            except ImportError:
                return "int8 through onnxruntime needs onnxruntime.quantization; pip install 'visionzoo[onnx]'"
    return None


def versions() -> dict[str, str]:
    """Versions of the runtimes that are installed (recorded with every deploy choice)."""
    out = {"torch": torch.__version__}
    for mod in ("onnxruntime", "openvino"):
        with contextlib.suppress(Exception):
            out[mod] = __import__(mod).__version__
    return out


# --- builders --------------------------------------------------------------------------------------------
def _torch_runner(module: Callable[[Tensor], Tensor], dtype: str) -> Callable[[Tensor], Tensor]:
    amp = dtype == "bf16"

    def run(x: Tensor) -> Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = module(x)
        return y.float() if amp else y
    return run


def build(backend: str, dtype: str, shared: Shared) -> Built:
    """Build ``backend`` for ``dtype``; raises ``BackendUnavailable`` with the reason when it cannot run here."""
    why = unavailable(backend, dtype)
    if why:
        raise BackendUnavailable(f"backend {backend!r} ({dtype}): {why}")
    t0 = time.perf_counter()
    built = _BUILDERS[backend](dtype, shared)
    built.build_s = round(time.perf_counter() - t0, 3)
    return built


def _eager(dtype: str, shared: Shared) -> Built:
    model = shared.model.eval()
    if dtype == "int8":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao eager quantization is deprecated in favour of torchao
            model = quantize_dynamic(shared.fused, {nn.Linear}, dtype=torch.qint8)
        return Built(_torch_runner(model, "fp32"), "fused; Linear dynamically quantized to int8 (torch.ao, "
                     f"{torch.backends.quantized.engine}); convolutions fp32", module=model)
    what = "torch eager" + (", bf16 autocast" if dtype == "bf16" else "")
    return Built(_torch_runner(model, dtype), what, module=model)


def _eager_tuned(dtype: str, shared: Shared) -> Built:
    choices = {op: kernel_choice(op, dtype, cache_dir=shared.cache_dir) for op in OPS}
    shared.kernels[dtype] = choices
    base = shared.fused
    # a structural copy that shares the fused weights: the swap replaces modules, never tensors
    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    model = fast_kernels(copy.deepcopy(base, memo), {op: c.kernel for op, c in choices.items()}, dtype, inplace=True)
    n = count_swapped(model)
    names = {"linear": "Linear", "conv2d": "Conv2d"}
    parts = [f"{n[op]} {names[op]} on oneDNN ({c.speedup:.2f}x aten)" if c.gflops and n[op] else
             f"{n[op]} {names[op]} on oneDNN (set by {c.source})" if n[op] else
             f"{names[op]} on aten ({'measured fastest' if c.gflops else 'set by ' + c.source})"
             for op, c in choices.items()]
    detail = f"{shared.fuse_note or 'no fuse()'}; " + ", ".join(parts)
    run = _torch_runner(model, dtype)
    nhwc = bool(n["conv2d"]) and shared.x.dim() == 4
    if nhwc:  # oneDNN's convolutions run NHWC without reordering (NCHW would)
        inner, run = run, lambda x: inner(x.contiguous(memory_format=torch.channels_last))
        detail += ", NHWC input"
    if dtype != "int8" and any(isinstance(m, AttentionCore) for m in model.modules()):
        x = shared.x.contiguous(memory_format=torch.channels_last) if nhwc else shared.x
        attn = tune_attention(model, x, autocast=dtype == "bf16")
        shared.attention[dtype] = attn
        detail += (f"; attention measured per shape: {attn.explicit} core(s) on matmul+softmax+matmul, "
                   f"{attn.fused} on SDPA")
    return Built(run, detail + (", bf16 autocast" if dtype == "bf16" else ""), module=model)


def _inductor(dtype: str, shared: Shared) -> Built:
    import torch._inductor.config as inductor_config

    model = shared.fused
    cl = bool(getattr(model, "cpu_channels_last", False)) and shared.x.dim() == 4
    if cl:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    # With freezing, inductor prepacks an fp32 Linear for MKL when the batch size is static and for oneDNN when it
    # is symbolic (torch/_inductor/fx_passes/mkldnn_fusion.py), and fuses the GELU/add after it into the oneDNN
    # call. Where oneDNN measured faster here the batch is made symbolic: unbacked, so that batch 1 is not
    # specialised; a model whose code branches on the batch size then falls back to static shapes.
    onednn = dtype == "fp32" and kernel_choice("linear", "fp32", cache_dir=shared.cache_dir).kernel == "onednn"
    errors = []
    for symbolic in (True, False) if onednn else (False,):
        compiled = torch.compile(model, dynamic=None if symbolic else False)
        inner = _torch_runner(compiled, dtype)

        def run(x: Tensor, inner=inner) -> Tensor:  # noqa: ANN001
            # freezing is read when a graph is compiled (its first call), and only from the global config
            # (compile's options= does not reach it), so every call runs under the patch
            with inductor_config.patch(freezing=True):
                return inner(x.contiguous(memory_format=torch.channels_last) if cl else x)
        x = shared.x.clone()
        try:
            if symbolic:
                torch._dynamo.decorators.mark_unbacked(x, 0)
            run(x)  # compile now, so build time holds the compile
            break
        except Exception as e:  # noqa: BLE001
            if not symbolic:
                raise
            errors.append(f"symbolic batch failed ({type(e).__name__}), static shapes")
    how = "unbacked batch: Linear prepacked for oneDNN" if onednn and not errors else "static shapes"
    return Built(run, f"torch.compile (inductor, freezing, {errors[0] if errors else how}"
                 f"{', channels-last' if cl else ''}{', bf16 autocast' if dtype == 'bf16' else ''}); "
                 f"{shared.fuse_note or 'no fuse()'}", module=compiled)


def _torchscript(dtype: str, shared: Shared) -> Built:
    """The fused model traced and frozen by TorchScript, with oneDNN Graph fusion (LLGA) switched on while it is
    traced and profiled: oneDNN then runs whole chains (conv + bias + add + ReLU, linear + GELU) as one partition
    with its own primitives and layouts, as onnxruntime's and OpenVINO's graph passes do.

    Six rewrites (``visionzoo.runtime.llga``), of the trace and of the frozen graph, work around oneDNN Graph faults
    of torch 2.13, with results equal up to rounding; where one of them made strided inputs dense, the plan is also
    built without it and the faster of the two kept. A plan is traced per input shape (the profiled graph is
    specialised to it), on first use, and checked there against the eager model (``TOLERANCE``): oneDNN Graph's
    fusion may give wrong outputs on graphs not yet met, and tracing bakes shape-dependent Python in. A plan that
    fails or differs is not used: at the example input the build fails with the reason (``auto`` skips the backend);
    at a later shape that shape runs the eager model, with a warning. TorchScript is deprecated in favour of
    torch.compile/torch.export but still ships."""
    model = shared.fused
    cl = bool(getattr(model, "cpu_channels_last", False)) and shared.x.dim() == 4
    amp = dtype == "bf16"
    eager = _torch_runner(model, dtype)
    plans: dict[tuple[int, ...], Callable[[Tensor], Tensor]] = {}
    dense_notes: list[str] = []  # what the timed dense-or-views choice kept, per plan

    def plan(x: Tensor, dense: bool) -> tuple[torch.jit.ScriptModule, int]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            return llga.plan(model, x, dense)

    def traced(x: Tensor) -> Callable[[Tensor], Tensor]:
        m, wrapped = plan(x, dense=True)
        if wrapped:  # dense inputs cost a copy each: keep them only where this shape measures faster with them
            try:
                views, _ = plan(x, dense=False)
            except Exception:  # noqa: BLE001  (the dense plan stands; the check below still applies to it)
                views = None
            if views is not None:
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
                    t = best_seconds({"dense": lambda: m(x), "views": lambda: views(x)}, rounds=3, sample_s=0.0)
                kept = "views" if t["views"] < t["dense"] else "dense"
                m = views if kept == "views" else m
                dense_notes.append(f"{wrapped} strided inputs at {tuple(x.shape)}: "
                                   f"{'made dense' if kept == 'dense' else 'left as views'} "
                                   f"(timed: views {t['views'] / t['dense']:.2f}x the time of copies)")

        def call(x: Tensor, m=m) -> Tensor:  # noqa: ANN001
            with torch.no_grad():
                y = m(x)
            return y.float() if amp else y
        with torch.inference_mode():
            ref = model(x).float()
        rel, _ = agreement(call(x), ref)
        if not rel <= TOLERANCE[dtype]:
            raise VisionZooError(f"the oneDNN Graph plan for input {tuple(x.shape)} differs from eager ({rel:.1e} "
                                 f"relative, over {TOLERANCE[dtype]:.0e})")
        return call

    def run(x: Tensor) -> Tensor:
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        key = tuple(x.shape)
        if key not in plans:
            if not plans:  # the example input: a failure fails the build
                plans[key] = traced(x)
            else:
                try:
                    plans[key] = traced(x)
                except Exception as e:  # noqa: BLE001
                    warnings.warn(f"deploy torchscript: input {key} runs eager: {e}", stacklevel=2)
                    plans[key] = eager
        return plans[key](x)
    run(shared.x)  # trace, freeze, fuse and check now, so build time holds it
    return Built(run, f"TorchScript (trace + freeze, a plan per input shape, each checked against eager) with "
                 f"oneDNN Graph fusion{', channels-last' if cl else ''}{', traced under bf16 autocast' if amp else ''}"
                 f"; {shared.fuse_note or 'no fuse()'}" + "".join(f"; {n}" for n in dense_notes), module=model)


def _onnxruntime(dtype: str, shared: Shared) -> Built:
    import onnxruntime as ort

    path = shared.onnx_path()
    what = "fp32"
    if dtype == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = path.replace(".onnx", ".int8.onnx")
        quantize_dynamic(path, q, weight_type=QuantType.QInt8, per_channel=True)
        path, what = q, "int8 dynamic quantization (MatMul/Conv weights per channel, activations per batch)"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
    if not spin:  # torch's threads sleep when idle here: onnxruntime's do too, or the comparison is not like for like
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(sess.run(None, {name: x.detach().contiguous().numpy()})[0])
    return Built(run, f"onnxruntime {ort.__version__} CPU (MLAS), {what}, {'spinning' if spin else 'sleeping'} idle "
                 f"threads (as OMP_WAIT_POLICY); {shared.fuse_note or 'no fuse()'}")


def _openvino(dtype: str, shared: Shared) -> Built:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(shared.onnx_path())
    precision = "bf16" if dtype == "bf16" else "f32"  # OpenVINO's default on bf16 CPUs is bf16: say f32 for fp32
    cfg = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": torch.get_num_threads(),
           "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    compiled: dict[tuple[int, ...], object] = {}

    def request(shape: tuple[int, ...]):  # noqa: ANN202  one static-shape compile per input shape, on first use
        if shape not in compiled:
            m = model.clone()
            m.reshape({m.inputs[0].any_name: list(shape)})
            compiled[shape] = core.compile_model(m, "CPU", cfg).create_infer_request()
        return compiled[shape]

    def run(x: Tensor) -> Tensor:
        req = request(tuple(x.shape))
        req.infer({0: x.detach().contiguous().numpy()})
        return torch.from_numpy(req.get_output_tensor(0).data.copy())
    run(shared.x)
    return Built(run, f"OpenVINO {ov.__version__.split('-')[0]} CPU, {precision} inference precision, a "
                 f"static-shape compile per input shape; {shared.fuse_note or 'no fuse()'}")


_BUILDERS = {"eager": _eager, "eager_tuned": _eager_tuned, "inductor": _inductor, "torchscript": _torchscript,
             "onnxruntime": _onnxruntime, "openvino": _openvino}
