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
from visionzoo.runtime.attention import AttentionChoice, tune_attention
from visionzoo.runtime.cpu import cpu_name, has_bf16
from visionzoo.runtime.kernels import OPS, count_swapped, fast_kernels, kernel_choice

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

    Before profiling, five rewrites of the frozen graph work around oneDNN Graph faults of torch 2.13 (results equal
    up to rounding): constant mul/add operands (``constant_operands_for_llga``), tanh-GELU (``gelu_tanh_for_llga``),
    strided pieces read elementwise (``dense_pieces_for_llga``), split pieces (``split_outputs_as_slices``) and sums
    with a LayerNorm's output (``layer_norm_sums_for_llga``). A plan is traced per input shape (the profiled graph
    is specialised to it), on first use, and checked there against the eager model (``TOLERANCE``): oneDNN Graph's
    fusion may give wrong outputs on graphs not yet met, and tracing bakes shape-dependent Python in. A plan that
    fails or differs is not used: at the example input the build fails with the reason (``auto`` skips the backend);
    at a later shape that shape runs the eager model, with a warning. TorchScript is deprecated in favour of
    torch.compile/torch.export but still ships."""
    model = shared.fused
    cl = bool(getattr(model, "cpu_channels_last", False)) and shared.x.dim() == 4
    amp = dtype == "bf16"
    eager = _torch_runner(model, dtype)
    plans: dict[tuple[int, ...], Callable[[Tensor], Tensor]] = {}

    def plan(x: Tensor, dense: bool) -> tuple[torch.jit.ScriptModule, int]:
        """The frozen, rewritten, profiled plan for ``x``, and how many pieces ``dense_pieces_for_llga`` wrapped."""
        was = torch.jit.onednn_fusion_enabled()
        torch.jit.enable_onednn_fusion(True)
        try:
            with warnings.catch_warnings(), torch.no_grad(), \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
                warnings.simplefilter("ignore", DeprecationWarning)  # trace/freeze: deprecated, still shipped
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # checked below, on this shape's output
                m = torch.jit.freeze(torch.jit.trace(model, x, check_trace=False))
                constant_operands_for_llga(m.graph)
                gelu_tanh_for_llga(m.graph)
                wrapped = dense_pieces_for_llga(m.graph) if dense else 0
                split_outputs_as_slices(m.graph)
                layer_norm_sums_for_llga(m.graph)
                for _ in range(3):  # the profiling runs after which the executor fuses and specialises
                    m(x)
        finally:
            torch.jit.enable_onednn_fusion(was)
        return m, wrapped

    def best_seconds(m: torch.jit.ScriptModule, x: Tensor) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                m(x)
                times.append(time.perf_counter() - t0)
        return min(times)

    def traced(x: Tensor) -> Callable[[Tensor], Tensor]:
        m, wrapped = plan(x, dense=True)
        if wrapped:  # dense pieces cost a copy each: keep them only where this shape measures faster with them
            try:
                views, _ = plan(x, dense=False)
            except Exception:  # noqa: BLE001  (the dense plan stands; the check below still applies to it)
                views = None
            if views is not None and best_seconds(views, x) < best_seconds(m, x):
                m = views

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
                 f"; {shared.fuse_note or 'no fuse()'}", module=model)


def _insert(graph: torch._C.Graph, before: torch._C.Node, kind: str, args: list, like: torch._C.Value
            ) -> torch._C.Value:
    """A new ``kind`` node on ``args`` just before ``before``, typed as ``like``; returns its output."""
    new = graph.create(kind, list(args), 1)
    new.insertBefore(before)
    new.output().setType(like.type())
    return new.output()


def _replace(node: torch._C.Node, value: torch._C.Value) -> None:
    node.output().replaceAllUsesWith(value)
    node.destroy()


def constant_operands_for_llga(graph: torch._C.Graph) -> int:
    """Rewrite, in place, each ``aten::mul(a, C)`` as ``aten::div(a, 1 / C)`` and each ``aten::add(a, C)`` as
    ``aten::sub(a, -C)``, where ``C`` is a constant floating tensor (a frozen parameter: a layer scale, a learned
    coefficient, a position table); returns how many nodes it rewrote.

    oneDNN Graph (torch 2.13) fails to compile a partition that holds a linear together with a mul or add whose
    other operand is such a constant ("vector::_M_range_check", measured: ``Linear(x) * p``, ``x * p + Linear(x)``,
    ``Linear(x) + p``, for ``p`` of shape (), (1,) or (C,)), and the whole plan fails with it (SReT's learned
    coefficients). It compiles the same partition with sub and div. The add rewrite is exact; the mul one is within
    an ulp (``1 / C`` is rounded), and the plan is checked against eager afterwards either way."""
    n = 0
    for kind, into in (("aten::mul", "aten::div"), ("aten::add", "aten::sub")):
        for node in graph.findAllNodes(kind):
            ins = list(node.inputs())
            if len(ins) != (2 if kind == "aten::mul" else 3) or (kind == "aten::add" and ins[2].toIValue() != 1):
                continue
            const = [i for i in (0, 1) if ins[i].node().kind() == "prim::Constant"
                     and isinstance(ins[i].toIValue(), Tensor) and ins[i].toIValue().is_floating_point()]
            if len(const) != 1 or not isinstance(ins[1 - const[0]].type(), torch._C.TensorType):
                continue
            c = ins[const[0]].toIValue()
            graph.setInsertPoint(node)
            value = graph.insertConstant((1.0 / c.double()).to(c.dtype) if kind == "aten::mul" else -c)
            _replace(node, _insert(graph, node, into, [ins[1 - const[0]], value, *ins[2:]], node.output()))
            n += 1
    return n


def gelu_tanh_for_llga(graph: torch._C.Graph) -> int:
    """Rewrite, in place, each ``aten::gelu(x, approximate="tanh")`` as its formula in plain ops,
    ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``; returns how many nodes it rewrote.

    oneDNN Graph's own tanh-GELU (torch 2.13) is off by 1.0-1.7e-4 relative after a linear (measured: Linear, GELU
    tanh, Linear), over the fp32 tolerance, so MaxViT's plan was refused; the same partition built from mul, add and
    tanh agrees with eager within 6e-7 and oneDNN Graph still fuses it."""
    n = 0
    for node in graph.findAllNodes("aten::gelu"):
        x, approximate = node.inputs()
        if approximate.toIValue() != "tanh":
            continue
        graph.setInsertPoint(node)

        def op(kind: str, *args: torch._C.Value, node=node) -> torch._C.Value:  # noqa: ANN001
            return _insert(graph, node, kind, args, node.output())
        const, one = graph.insertConstant, graph.insertConstant(1)
        inner = op("aten::add", x, op("aten::mul", op("aten::mul", op("aten::mul", x, x), x), const(0.044715)), one)
        tanh = op("aten::tanh", op("aten::mul", inner, const(math.sqrt(2 / math.pi))))
        _replace(node, op("aten::mul", op("aten::mul", x, const(0.5)), op("aten::add", tanh, const(1.0), one)))
        n += 1
    return n


_POINTWISE = frozenset(f"aten::{op}" for op in ("add", "sub", "mul", "div", "neg", "sigmoid", "relu", "gelu", "tanh",
                                                   "_convolution", "conv2d"))


def dense_pieces_for_llga(graph: torch._C.Graph) -> int:
    """Give each unpacked piece of a ``chunk``, ``split`` or ``unbind`` that an elementwise op or a convolution
    reads an ``aten::contiguous`` (a no-op where the piece is dense already, a copy where it is a strided view);
    returns how many pieces it wrapped. Pieces that only reach matmuls and attention are left as views.

    oneDNN Graph (torch 2.13) runs an elementwise partition on a strided input far slower than on a dense one:
    CAS-ViT's ``q, k, v = qkv(x).chunk(3, dim=1)`` pieces are strided at batch > 1, and its gates (conv, sigmoid,
    mul) took 200 ms a call at batch 32, where the whole plan fell to 0.45x eager (measured, AMD EPYC). Copying
    every piece instead cost DeiT-S and Swin-T 4-5% at batch 32, hence the choice by reader; and where the copies
    do not pay (T2T-ViT's row slices at batch 1: 9% slower), the ``torchscript`` backend times the plan with and
    without them and keeps the faster."""
    n = 0
    for unpack in graph.findAllNodes("prim::ListUnpack"):
        if unpack.input().node().kind() not in ("aten::chunk", "aten::split", "aten::split_with_sizes", "aten::unbind"):
            continue
        for piece in unpack.outputs():
            if not any(use.user.kind() in _POINTWISE for use in piece.uses()):
                continue
            graph.setInsertPoint(unpack)
            dense = graph.create("aten::contiguous", [piece, graph.insertConstant(0)], 1)  # 0: torch.contiguous_format
            dense.output().setType(piece.type())
            dense.insertAfter(unpack)
            piece.replaceAllUsesWith(dense.output())
            dense.replaceInput(0, piece)
            n += 1
    return n


def split_outputs_as_slices(graph: torch._C.Graph) -> int:
    """Rewrite, in place, each ``aten::split`` / ``aten::split_with_sizes`` whose pieces are unpacked into one
    ``aten::slice`` per piece (the same views); returns how many splits it rewrote.

    oneDNN Graph (torch 2.13) fails to compile a partition where a piece of a split meets a linear's output in an
    add ("vector::_M_range_check"; T2T-ViT's Performer: ``k, q, v = kqv(x).split(d)``, then ``v + proj(y)``), and
    compiles it when the piece is a slice. The bounds are the split's constants, so no size is needed: the last
    piece runs to the end."""
    n = 0
    for unpack in graph.findAllNodes("prim::ListUnpack"):
        split = unpack.input().node()
        if split.kind() not in ("aten::split", "aten::split_with_sizes") or len(list(split.inputs())) != 3:
            continue
        x, size, dim = split.inputs()
        size, dim, pieces = size.toIValue(), dim.toIValue(), list(unpack.outputs())
        if not isinstance(dim, int) or not (isinstance(size, int) or (isinstance(size, list) and
                                                                          len(size) == len(pieces))):
            continue
        sizes = size if isinstance(size, list) else [size] * len(pieces)
        graph.setInsertPoint(unpack)
        start = 0
        for i, piece in enumerate(pieces):
            end = None if i == len(pieces) - 1 else start + sizes[i]
            args = [x, *(graph.insertConstant(v) for v in (dim, start, end, 1))]
            piece.replaceAllUsesWith(_insert(graph, unpack, "aten::slice", args, piece))
            start = end
        unpack.destroy()
        if not split.output().uses():
            split.destroy()
        n += 1
    return n


def layer_norm_sums_for_llga(graph: torch._C.Graph) -> int:
    """Rewrite, in place, each ``aten::add(a, layer_norm(x))`` (alpha 1, either order) as
    ``aten::sub(a, neg(layer_norm(x)))``, which is exact; returns how many adds it rewrote.

    oneDNN Graph (torch 2.13) fuses a LayerNorm with the add that reads it and gets the sum wrong: 0.5 relative
    for ``c + LayerNorm(a)`` on fresh inputs (measured; TNT adds a LayerNorm's output to the patch tokens, and its
    plan was 0.4-0.7 off). With the negation between them it agrees within 2e-7."""
    n = 0
    for node in graph.findAllNodes("aten::add"):
        ins = list(node.inputs())
        if len(ins) != 3 or ins[2].toIValue() != 1:
            continue
        normed = [i for i in (1, 0) if ins[i].node().kind() == "aten::layer_norm"]
        if not normed:
            continue
        ln, other = ins[normed[0]], ins[1 - normed[0]]
        graph.setInsertPoint(node)
        neg = _insert(graph, node, "aten::neg", [ln], ln)
        _replace(node, _insert(graph, node, "aten::sub", [other, neg, ins[2]], node.output()))
        n += 1
    return n


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
