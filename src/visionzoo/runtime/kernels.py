"""``nn.Linear`` and ``nn.Conv2d`` through the fastest kernel on this CPU, chosen by a measurement.

torch's ``F.linear`` calls the BLAS of its build (MKL's sgemm on x86) and ``F.conv2d`` picks a path by heuristics
(a 1x1 convolution at batch 1 in NCHW goes to im2col + sgemm, others to oneDNN with the weight reordered on every
call). On some CPUs that is far from what the machine can do: on an AMD EPYC with AVX-512, MKL reached 175-211
GFLOP/s on ViT/ConvNeXt linear shapes where oneDNN's inner product reached 367 (issue 11). Which kernel wins
depends on the CPU, the torch build and the thread count, so it is measured once per (CPU model, torch version,
threads, dtype) on the layer shapes of the line-up's backbones, and cached (``kernels.json`` under
``VISIONZOO_CACHE``); there is no vendor rule. ``VISIONZOO_KERNEL=aten|onednn`` pins the choice instead.

``fast_kernels(model)`` then swaps every ``nn.Linear`` and ``nn.Conv2d`` (by exact type) for ``OneDNNLinear`` /
``OneDNNConv2d`` where oneDNN won. A swapped module keeps ``weight`` and ``bias`` (same state-dict keys, same
numbers within 1e-5) and packs the weight once into oneDNN's blocked layout (a convolution for the first input
shape it sees), lazily, and again after the weight changes. Inference only: the oneDNN ops have no autograd.
``fuse_activations`` then folds a GELU/ReLU into the oneDNN layer before it (a oneDNN post-op) wherever nothing else
reads that layer's output.
"""
from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from visionzoo.errors import ArgumentError
from visionzoo.runtime.cache import JsonCache, key
from visionzoo.runtime.cpu import cpu_info

KERNELS = ("aten", "onednn")  # kernels a module swap can use in eager
OPS = ("linear", "conv2d")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPES_NAME = {v: k for k, v in DTYPES.items()}
# Each calibration case is a chain of distinct layers, as in a model (weights of several MB, so no layer finds its
# weight in cache, and per-call weight reorders cost what they cost in a model), 0.1-1 GFLOP per call.
# linear (M, (d0, d1, ...)): layers d0 -> d1 -> d2 ... on M rows: DeiT-S blocks at batch 1 and 2, ConvNeXt-T
# stage 1 at batch 1 and stage 4 at batch 2, Swin-T stage 2 at batch 1.
# conv2d (B, H, ((in, out, kernel, stride, groups), ...)): ResNet-50 stage 1 and stage 3 bottlenecks and its stem,
# ConvNeXt-T stage 1 depthwise 7x7, at batch 1.
CALIBRATION = {
    "linear": ((197, (384, 1152, 384, 1536, 384)), (394, (384, 1536, 384, 1536, 384)),
               (3136, (96, 384, 96, 384, 96)), (98, (768, 3072, 768, 3072, 768)), (784, (192, 576, 192, 768, 192))),
    "conv2d": ((1, 56, ((256, 64, 1, 1, 1), (64, 64, 3, 1, 1), (64, 256, 1, 1, 1)) * 2),
               (1, 14, ((1024, 256, 1, 1, 1), (256, 256, 3, 1, 1), (256, 1024, 1, 1, 1)) * 2),
               (1, 224, ((3, 64, 7, 2, 1),)), (1, 56, ((96, 96, 7, 1, 96),) * 3)),
}

CALIBRATION_ROUNDS, CALIBRATION_SAMPLE_S = 7, 0.02  # about 3 s per op on a loaded 2-core machine


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _version(t: Tensor) -> int:
    return 0 if t.is_inference() else t._version  # inference tensors keep no version counter


class _Packed(nn.Module):
    """Keeps ``weight``/``bias`` as the module it replaces did, and a oneDNN-packed copy made on first use."""

    def __init__(self, m: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = m.weight
        self.bias = m.bias
        self.compute_dtype = dtype
        self._packed: tuple[Tensor, Tensor | None, int] | None = None  # (weight, bias, weights' versions)

    def _reorder(self, w: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _pack(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        version = _version(self.weight) + (0 if self.bias is None else _version(self.bias))
        if self._packed is None or self._packed[2] != version:
            w = self.weight.detach().to(self.compute_dtype)
            b = None if self.bias is None else self.bias.detach().to(self.compute_dtype)
            self._packed = (self._reorder(w, x), b, version)
        return self._packed[0], self._packed[1]

    def __getstate__(self) -> dict[str, Any]:  # deepcopy/pickle: an opaque oneDNN tensor has no storage
        state = dict(self.__dict__)
        state["_packed"] = None
        return state


def _post_repr(m: nn.Module) -> str:
    if m.post_op == "none":
        return ""
    return f", then {m.post_op}" + (f" ({m.algorithm})" if m.algorithm and m.algorithm != "none" else "")


class OneDNNLinear(_Packed):
    """``nn.Linear`` through oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``), its weight
    prepacked. ``dtype=torch.bfloat16`` packs a bf16 copy and casts the input (bf16 output)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(linear, dtype)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.post_op, self.algorithm = "none", ""  # an activation oneDNN applies to the output (fuse_activations)

    def _reorder(self, w: Tensor, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(w)

    def forward(self, x: Tensor) -> Tensor:
        x = x if x.dtype == self.compute_dtype else x.to(self.compute_dtype)
        w, b = self._pack(x)
        return torch.ops.mkldnn._linear_pointwise(x, w, b, self.post_op, [], self.algorithm)

    def extra_repr(self) -> str:
        dt = str(self.compute_dtype).removeprefix("torch.")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{dt}{_post_repr(self)}")


class OneDNNConv2d(_Packed):
    """``nn.Conv2d`` (zero padding) through oneDNN (``torch.ops.mkldnn._convolution_pointwise``), its weight
    prepacked for the first input shape it sees; other shapes run too. NCHW or NHWC input."""

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(conv, dtype)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.padding, self.stride = list(_explicit_padding(conv)), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.post_op, self.algorithm = "none", ""  # an activation oneDNN applies to the output (fuse_activations)

    def _reorder(self, w: Tensor, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._reorder_convolution_weight(w, self.padding, self.stride, self.dilation,
                                                            self.groups, list(x.shape))

    def forward(self, x: Tensor) -> Tensor:
        x = x if x.dtype == self.compute_dtype else x.to(self.compute_dtype)
        w, b = self._pack(x)
        return torch.ops.mkldnn._convolution_pointwise(x, w, b, self.padding, self.stride, self.dilation,
                                                       self.groups, self.post_op, [], self.algorithm)

    def extra_repr(self) -> str:
        dt = str(self.compute_dtype).removeprefix("torch.")
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, {dt}{_post_repr(self)}")


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The symmetric zero padding of ``conv`` as two ints, or None where it has none (``"same"`` with an even
    kernel, another padding mode)."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return tuple(conv.padding)


SWAPS: dict[str, tuple[type[nn.Module], type[_Packed], Callable[[nn.Module], bool]]] = {
    "linear": (nn.Linear, OneDNNLinear, lambda m: True),
    "conv2d": (nn.Conv2d, OneDNNConv2d, lambda m: _explicit_padding(m) is not None),
}


# --- measuring ---------------------------------------------------------------------------------------------
@dataclass
class KernelChoice:
    """What was measured for one op and dtype: GFLOP/s of each kernel per calibration case, and the choice."""

    op: str
    kernel: str  # the fastest by the geometric mean over the cases of its speed over aten's
    speedup: float  # that geometric mean for the chosen kernel (1.0 for aten)
    gflops: dict[str, list[float]] = field(default_factory=dict)
    cases: list[str] = field(default_factory=list)
    cpu: str = ""
    cpu_flags: list[str] = field(default_factory=list)
    threads: int = 1
    torch: str = ""
    dtype: str = "fp32"
    source: str = "measured"  # measured | cache | VISIONZOO_KERNEL (set by the user, not measured)

    @property
    def cached(self) -> bool:
        return self.source == "cache"

    def summary(self) -> str:
        if not self.gflops:
            return f"{self.dtype} {self.op} kernel on {self.cpu}: {self.kernel} (from {self.source}, not measured)"
        rates = ", ".join(f"{k} {_gmean(v):.0f}" for k, v in self.gflops.items())
        return (f"{self.dtype} {self.op} kernel on {self.cpu} ({self.threads} thread(s)): {self.kernel} "
                f"({self.speedup:.2f}x aten; GFLOP/s geometric mean over {len(self.cases)} cases: {rates})")


def _gmean(xs: list[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-9)) for x in xs) / len(xs)) if xs else float("nan")


def _chain(op: str, case: tuple, dt: torch.dtype, g: torch.Generator) -> tuple[str, float, nn.Sequential, Tensor]:
    """The layers of one calibration case (default init: the values do not change the speed), its input and its
    GFLOP per call."""
    if op == "linear":
        m, dims = case
        seq = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims, dims[1:])])
        return (f"{m}x{'-'.join(map(str, dims))}", sum(2 * m * a * b for a, b in zip(dims, dims[1:])) / 1e9,
                seq.to(dt).eval(), torch.randn(m, dims[0], generator=g).to(dt))
    bs, h, layers = case
    seq, flop, size = nn.Sequential(), 0.0, h
    for cin, cout, k, stride, groups in layers:
        seq.append(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups))
        size = (size + 2 * (k // 2) - k) // stride + 1
        flop += 2 * bs * cout * (cin // groups) * k * k * size * size / 1e9
    first = layers[0]
    label = f"{bs}x{first[0]}x{h}x{h} " + "-".join(f"k{k}" + (f"g{gr}" if gr > 1 else "") for _, _, k, _, gr in layers)
    return label, flop, seq.to(dt).eval(), torch.randn(bs, first[0], h, h, generator=g).to(dt)


def _cases(op: str, case: tuple, dt: torch.dtype, g: torch.Generator
           ) -> tuple[str, float, dict[str, Callable[[], object]]]:
    """(label, GFLOP, {kernel: call}) for one calibration case. Convolutions: ``aten`` runs NCHW input,
    ``aten_nhwc`` NHWC (a model runs either; the faster is aten's rate), ``onednn`` NHWC (what eager_tuned feeds)."""
    label, flop, seq, x = _chain(op, case, dt, g)
    fast = fast_kernels(seq, "onednn", DTYPES_NAME[dt], ops=(op,))
    if op == "linear":
        return label, flop, {"aten": lambda: seq(x), "onednn": lambda: fast(x)}
    x_cl = x.contiguous(memory_format=torch.channels_last)
    seq_cl = copy.deepcopy(seq).to(memory_format=torch.channels_last)
    return label, flop, {"aten": lambda: seq(x), "aten_nhwc": lambda: seq_cl(x_cl), "onednn": lambda: fast(x_cl)}


def best_seconds(fns: dict[str, Callable[[], object]], rounds: int, sample_s: float) -> dict[str, float]:
    """Seconds per call of each function: the best of ``rounds`` interleaved samples (A, B, A, B, ...), each sample
    repeating the call for about ``sample_s`` seconds (other processes only ever slow a sample down, so the best one
    is the least disturbed)."""
    reps = {}
    for kn, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        reps[kn] = max(1, round(sample_s / max(time.perf_counter() - t0, 1e-6)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for kn, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[kn]):
                fn()
            best[kn] = min(best[kn], (time.perf_counter() - t0) / reps[kn])
    return best


def measure_kernels(op: str = "linear", dtype: str = "fp32", shapes: tuple[tuple, ...] | None = None,
                    rounds: int | None = None, sample_s: float | None = None) -> KernelChoice:
    """Time each kernel on each calibration case, interleaved (A, B, A, B, ...): a sample repeats the call for
    about ``sample_s`` seconds, and a kernel's rate on a case is its best sample of ``rounds`` (other processes
    only ever slow a sample down, so the best one is the least disturbed)."""
    rounds, sample_s = rounds or CALIBRATION_ROUNDS, CALIBRATION_SAMPLE_S if sample_s is None else sample_s
    if op not in OPS:
        raise ArgumentError(f"measure_kernels: op must be one of {OPS}, got {op!r}")
    if dtype not in DTYPES:
        raise ArgumentError(f"measure_kernels: dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    kernels = tuple(k for k in KERNELS if k == "aten" or onednn_available())
    name, flags = cpu_info()
    g = torch.Generator().manual_seed(0)
    out: dict[str, list[float]] = {k: [] for k in kernels}
    labels = []
    for case in shapes or CALIBRATION[op]:
        label, gflop, fns = _cases(op, case, DTYPES[dtype], g)
        labels.append(label)
        if "onednn" not in kernels:
            fns.pop("onednn")
        with torch.inference_mode():
            best = best_seconds(fns, rounds, sample_s)
        best["aten"] = min(best["aten"], best.pop("aten_nhwc", float("inf")))
        for kn in kernels:
            out[kn].append(round(gflop / best[kn], 1))
    speed = {kn: _gmean([r / r0 for r, r0 in zip(out[kn], out["aten"])]) for kn in kernels}
    chosen = max(kernels, key=lambda kn: speed[kn])
    return KernelChoice(op=op, kernel=chosen, speedup=round(speed[chosen], 3), gflops=out, cases=labels, cpu=name,
                        cpu_flags=flags, threads=torch.get_num_threads(), torch=torch.__version__, dtype=dtype)


def kernel_choice(op: str = "linear", dtype: str = "fp32", cache: bool = True, cache_dir: str | None = None,
                  refresh: bool = False) -> KernelChoice:
    """The fastest kernel for ``op`` here: measured once per CPU model, torch version, threads and dtype, then
    read from the cache; or pinned by ``VISIONZOO_KERNEL=aten|onednn`` (reproducible runs, tests)."""
    if op not in OPS:
        raise ArgumentError(f"kernel_choice: op must be one of {OPS}, got {op!r}")
    name, flags = cpu_info()
    pinned = os.environ.get("VISIONZOO_KERNEL")
    if pinned:
        if pinned not in KERNELS:
            raise ArgumentError(f"VISIONZOO_KERNEL must be one of {KERNELS}, got {pinned!r}")
        return KernelChoice(op=op, kernel=pinned if onednn_available() else "aten", speedup=1.0, cpu=name,
                            cpu_flags=flags, threads=torch.get_num_threads(), torch=torch.__version__, dtype=dtype,
                            source="VISIONZOO_KERNEL")
    store = JsonCache("kernels.json", cache_dir)
    k = key(op=op, cpu=name, torch=torch.__version__, threads=torch.get_num_threads(), dtype=dtype,
            shapes=CALIBRATION[op], onednn=onednn_available())
    if cache and not refresh:
        hit = store.get(k)
        if hit and hit.get("kernel") in KERNELS:
            fields = {f: hit[f] for f in KernelChoice.__dataclass_fields__ if f in hit}
            return KernelChoice(**{**fields, "source": "cache"})
    choice = measure_kernels(op, dtype)
    if cache:
        store.put(k, asdict(choice))
    return choice


def linear_kernel(dtype: str = "fp32", **kw: Any) -> KernelChoice:
    return kernel_choice("linear", dtype, **kw)


# --- swapping ----------------------------------------------------------------------------------------------
def fast_kernels(model: nn.Module, kernels: str | dict[str, str] | None = None, dtype: str = "fp32",
                 ops: tuple[str, ...] = OPS, inplace: bool = False, cache_dir: str | None = None) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with every ``nn.Linear`` and ``nn.Conv2d`` on the fastest kernel here.

    ``kernels``: ``None`` measures (once per CPU, cached; see ``kernel_choice``), ``"aten"`` / ``"onednn"`` for
    every op, or ``{"linear": ..., "conv2d": ...}``. ``dtype="bf16"`` packs bf16 weights and casts inputs (run it
    under ``torch.autocast("cpu", torch.bfloat16)``). ``ops`` limits the swap, e.g. ``("linear",)``.
    """
    if dtype not in DTYPES:
        raise ArgumentError(f"fast_kernels: dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    bad = [op for op in ops if op not in OPS]
    if bad:
        raise ArgumentError(f"fast_kernels: ops must be among {OPS}, got {bad}")
    kernels = {op: kernels for op in ops} if isinstance(kernels, str) or kernels is None else dict(kernels)
    for op in ops:
        k = kernels.get(op)
        if k is None:
            kernels[op] = kernel_choice(op, dtype, cache_dir=cache_dir).kernel
        elif k not in KERNELS:
            raise ArgumentError(f"fast_kernels: kernel must be None (measure) or one of {KERNELS}, got {k!r}")
        elif k == "onednn" and not onednn_available():
            from visionzoo.errors import BackendUnavailable

            raise BackendUnavailable("fast_kernels: kernel 'onednn' needs a torch build with oneDNN (mkldnn), and "
                                     "torch.backends.mkldnn.is_available() is False here; use kernel 'aten'")
    model = model if inplace else copy.deepcopy(model)
    swaps = [SWAPS[op] for op in ops if kernels[op] == "onednn"]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            for cls, fast, ok in swaps:
                # exact type: subclasses (nn.MultiheadAttention's out_proj) may be read by their owner, not called
                if type(child) is cls and child.weight.device.type == "cpu" and ok(child):
                    setattr(parent, name, fast(child, DTYPES[dtype]))
    fuse_activations(model)
    return model


def _post_op(act: nn.Module) -> tuple[str, str] | None:
    """oneDNN's name for ``act`` as a post-op (``(attr, algorithm)``), or None where it has none we use."""
    if type(act) is nn.ReLU:
        return "relu", ""
    if isinstance(act, nn.GELU) and type(act).forward is nn.GELU.forward:  # GELU and GELUTanh, not a new forward
        return "gelu", "tanh" if act.approximate == "tanh" else "none"
    return None


def fuse_activations(model: nn.Module) -> int:
    """Fold activations into the oneDNN layer before them, as oneDNN post-ops (one pass over the activations fewer);
    in place, inference only. Where it is certain that the activation reads only that layer's output: the shared
    ``layers.Mlp`` (fc1, act) and ``layers.ConvMlp`` without a norm (fc1, act), and children of an ``nn.Sequential``
    with nothing between them but ``nn.Identity`` (a BatchNorm that ``fuse()`` folded) or a dropout that is off.
    Returns how many were folded."""
    from visionzoo.layers import ConvMlp, Mlp

    fast = (OneDNNLinear, OneDNNConv2d)
    n = 0

    def fold(layer: nn.Module, act: nn.Module) -> bool:
        post = _post_op(act)
        if not isinstance(layer, fast) or layer.post_op != "none" or post is None:
            return False
        layer.post_op, layer.algorithm = post
        return True

    for m in model.modules():
        if type(m) is Mlp and not (m.training and m.drop1.p > 0) and fold(m.fc1, m.act):
            m.act = nn.Identity()
            n += 1
        elif type(m) is ConvMlp and isinstance(m.norm, nn.Identity) and fold(m.fc1, m.act):
            m.act = nn.Identity()
            n += 1
        elif type(m) is nn.Sequential:
            kids = list(m.named_children())
            for i, (_, a) in enumerate(kids):
                j = i + 1
                while j < len(kids) and _passes_through(kids[j][1]):  # a BN folded by fuse() left an Identity
                    j += 1
                if j < len(kids) and fold(a, kids[j][1]):
                    setattr(m, kids[j][0], nn.Identity())
                    n += 1
    return n


def _passes_through(m: nn.Module) -> bool:
    """``m`` returns its input unchanged: ``nn.Identity``, or a dropout that is off."""
    return type(m) is nn.Identity or (isinstance(m, nn.Dropout) and (not m.training or m.p == 0))


def fast_linear(model: nn.Module, kernel: str | None = None, dtype: str = "fp32", inplace: bool = False,
                cache_dir: str | None = None) -> nn.Module:
    """``fast_kernels`` for ``nn.Linear`` only."""
    return fast_kernels(model, kernel, dtype, ("linear",), inplace, cache_dir)


def count_swapped(model: nn.Module) -> dict[str, int]:
    """How many modules of each op run on oneDNN: ``{"linear": n, "conv2d": n}``."""
    return {op: sum(isinstance(m, SWAPS[op][1]) for m in model.modules()) for op in OPS}
