"""fp32 (and bf16) ``nn.Linear`` through the fastest kernel on this CPU, chosen by a measurement.

torch's ``F.linear`` calls the BLAS of its build (MKL's sgemm on x86). On some CPUs that is far from what the
machine can do: on an AMD EPYC with AVX-512, MKL reached 175-211 GFLOP/s on ViT/ConvNeXt linear shapes where
oneDNN's inner product (brgemm) reached 367 (issue 11). Which kernel wins depends on the CPU, the torch build
and the thread count, so it is measured once per (CPU model, torch version, threads), on the linear shapes of
the line-up's backbones, and cached (``linear_kernels.json`` under ``VISIONZOO_CACHE``); no vendor rule.

``fast_linear(model)`` then swaps every ``nn.Linear`` (by exact type) for ``OneDNNLinear`` where oneDNN won.
The swapped module keeps ``weight`` and ``bias`` (same state-dict keys, same numbers within 1e-5) and packs
the weight once into oneDNN's blocked layout, lazily, and again after the weight changes. Inference only: the
oneDNN op has no autograd formula.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.runtime.cache import JsonCache, key
from visionzoo.runtime.cpu import cpu_info

KERNELS = ("aten", "onednn")  # kernels a module swap can use in eager
# (M, K, N) of y = x @ W.T, about 0.2-0.5 GFLOP each: ConvNeXt-T block MLP (stage 1 at batch 1, stage 4 at
# batch 2), DeiT-S qkv at batch 1 and its MLP at batch 2, Swin-T stage 2 qkv at batch 1
CALIBRATION_SHAPES = ((3136, 96, 384), (3136, 384, 96), (98, 768, 3072), (197, 384, 1152), (394, 384, 1536),
                      (394, 1536, 384), (784, 192, 576))


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear(nn.Module):
    """``nn.Linear`` through oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``), its weight
    prepacked once. ``dtype=torch.bfloat16`` packs a bf16 copy and casts the input (bf16 output)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.compute_dtype = dtype
        self._packed: tuple[Tensor, Tensor | None, int] | None = None  # (weight, bias, weight._version)

    def _pack(self) -> tuple[Tensor, Tensor | None]:
        version = _version(self.weight) + (0 if self.bias is None else _version(self.bias))
        if self._packed is None or self._packed[2] != version:
            w = self.weight.detach().to(self.compute_dtype)
            b = None if self.bias is None else self.bias.detach().to(self.compute_dtype)
            self._packed = (torch.ops.mkldnn._reorder_linear_weight(w), b, version)
        return self._packed[0], self._packed[1]

    def forward(self, x: Tensor) -> Tensor:
        w, b = self._pack()
        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

    def __getstate__(self) -> dict[str, Any]:  # deepcopy/pickle: an opaque oneDNN tensor has no storage
        state = dict(self.__dict__)
        state["_packed"] = None
        return state

    def extra_repr(self) -> str:
        dt = str(self.compute_dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {dt}"


def _version(t: Tensor) -> int:
    return 0 if t.is_inference() else t._version  # inference tensors keep no version counter


@dataclass
class KernelChoice:
    """What was measured: GFLOP/s of each kernel on each calibration shape, and the kernel chosen."""

    kernel: str  # the fastest, by the geometric mean over the shapes of its speed over aten's
    speedup: float  # that geometric mean for the chosen kernel (1.0 for aten)
    gflops: dict[str, list[float]] = field(default_factory=dict)
    shapes: list[tuple[int, int, int]] = field(default_factory=list)
    cpu: str = ""
    cpu_flags: list[str] = field(default_factory=list)
    threads: int = 1
    torch: str = ""
    dtype: str = "fp32"
    source: str = "measured"  # measured | cache | VISIONZOO_LINEAR_KERNEL (set by the user, not measured)

    @property
    def cached(self) -> bool:
        return self.source == "cache"

    def summary(self) -> str:
        if not self.gflops:
            return f"{self.dtype} Linear kernel on {self.cpu}: {self.kernel} (from {self.source}, not measured)"
        rates = ", ".join(f"{k} {_gmean(v):.0f}" for k, v in self.gflops.items())
        return (f"{self.dtype} Linear kernel on {self.cpu} ({self.threads} thread(s)): {self.kernel} "
                f"({self.speedup:.2f}x aten; GFLOP/s geometric mean over {len(self.shapes)} shapes: {rates})")


def _gmean(xs: list[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-9)) for x in xs) / len(xs)) if xs else float("nan")


def _kernel_fns(name: str, x: Tensor, w: Tensor, b: Tensor):  # noqa: ANN202
    if name == "aten":
        return lambda: F.linear(x, w, b)
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.weight.data, lin.bias.data = w, b
    m = OneDNNLinear(lin, x.dtype)
    return lambda: m(x)


def measure_linear_kernels(shapes: tuple[tuple[int, int, int], ...] | None = None, dtype: str = "fp32",
                           rounds: int = 5, kernels: tuple[str, ...] | None = None,
                           sample_s: float = 0.004) -> KernelChoice:
    """Time every kernel on every shape, interleaved (A, B, A, B, ...): each sample repeats the call for about
    ``sample_s`` seconds, and a kernel's rate on a shape is its best sample of ``rounds`` (other processes only
    ever slow a sample down, so the best one is the least disturbed)."""
    shapes = shapes or CALIBRATION_SHAPES
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"measure_linear_kernels: dtype must be 'fp32' or 'bf16', got {dtype!r}")
    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    kernels = kernels or tuple(k for k in KERNELS if k == "aten" or onednn_available())
    name, flags = cpu_info()
    g = torch.Generator().manual_seed(0)
    out: dict[str, list[float]] = {k: [] for k in kernels}
    for m, k, n in shapes:
        x = torch.randn(m, k, generator=g).to(dt)
        w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dt)
        b = torch.randn(n, generator=g).to(dt)
        fns = {kn: _kernel_fns(kn, x, w, b) for kn in kernels}
        with torch.inference_mode():
            reps = {}
            for kn, fn in fns.items():
                fn()
                t0 = time.perf_counter()
                fn()
                reps[kn] = max(1, round(sample_s / max(time.perf_counter() - t0, 1e-6)))
            best: dict[str, float] = dict.fromkeys(kernels, float("inf"))
            for _ in range(rounds):
                for kn, fn in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(reps[kn]):
                        fn()
                    best[kn] = min(best[kn], (time.perf_counter() - t0) / reps[kn])
        for kn in kernels:
            out[kn].append(round(2 * m * k * n / best[kn] / 1e9, 1))
    speed = {kn: _gmean([r / r0 for r, r0 in zip(out[kn], out["aten"])]) if "aten" in out else _gmean(out[kn])
             for kn in kernels}
    best = max(kernels, key=lambda kn: speed[kn])
    return KernelChoice(kernel=best, speedup=round(speed[best], 3), gflops=out, shapes=[tuple(s) for s in shapes],
                        cpu=name, cpu_flags=flags, threads=torch.get_num_threads(), torch=torch.__version__,
                        dtype=dtype)


def linear_kernel(dtype: str = "fp32", cache: bool = True, cache_dir: str | None = None,
                  refresh: bool = False) -> KernelChoice:
    """The fastest Linear kernel here, measured once per CPU model, torch version, threads and dtype (cached).

    ``VISIONZOO_LINEAR_KERNEL=aten|onednn`` in the environment pins the kernel without measuring (reproducible
    runs, tests); the record then says so.
    """
    name, flags = cpu_info()
    pinned = os.environ.get("VISIONZOO_LINEAR_KERNEL")
    if pinned:
        if pinned not in KERNELS:
            raise ValueError(f"VISIONZOO_LINEAR_KERNEL must be one of {KERNELS}, got {pinned!r}")
        if pinned == "onednn" and not onednn_available():
            pinned = "aten"
        return KernelChoice(kernel=pinned, speedup=1.0, cpu=name, cpu_flags=flags, threads=torch.get_num_threads(),
                            torch=torch.__version__, dtype=dtype, source="VISIONZOO_LINEAR_KERNEL")
    store = JsonCache("linear_kernels.json", cache_dir)
    k = key(cpu=name, torch=torch.__version__, threads=torch.get_num_threads(), dtype=dtype,
            shapes=CALIBRATION_SHAPES, onednn=onednn_available())
    if cache and not refresh:
        hit = store.get(k)
        if hit and hit.get("kernel") in KERNELS:
            fields = {f: hit[f] for f in KernelChoice.__dataclass_fields__ if f in hit}
            fields["shapes"] = [tuple(sh) for sh in fields.get("shapes", [])]
            return KernelChoice(**{**fields, "source": "cache"})
    choice = measure_linear_kernels(dtype=dtype)
    if cache:
        store.put(k, asdict(choice))
    return choice


def fast_linear(model: nn.Module, kernel: str | None = None, dtype: str = "fp32", inplace: bool = False,
                cache_dir: str | None = None) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with every ``nn.Linear`` on the fastest kernel of this CPU.

    ``kernel``: ``None`` measures (once, cached; see ``linear_kernel``), or ``"aten"`` / ``"onednn"``.
    ``dtype="bf16"`` packs bf16 weights (use under ``torch.autocast("cpu", torch.bfloat16)``).
    """
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"fast_linear: dtype must be 'fp32' or 'bf16', got {dtype!r}")
    if kernel is None:
        kernel = linear_kernel(dtype, cache_dir=cache_dir).kernel
    if kernel not in KERNELS:
        raise ValueError(f"fast_linear: kernel must be None (measure) or one of {KERNELS}, got {kernel!r}")
    if kernel == "onednn" and not onednn_available():
        from visionzoo.errors import BackendUnavailable

        raise BackendUnavailable("fast_linear: kernel 'onednn' needs a torch build with oneDNN (mkldnn), and "
                                 "torch.backends.mkldnn.is_available() is False here; use kernel='aten'")
    model = model if inplace else copy.deepcopy(model)
    if kernel == "aten":
        return model
    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            # exact type: subclasses (nn.MultiheadAttention's out_proj) are read by their owner, not called
            if type(child) is nn.Linear and child.weight.device.type == "cpu":
                setattr(parent, name, OneDNNLinear(child, dt))
    return model


def count_swapped(model: nn.Module) -> int:
    return sum(isinstance(m, OneDNNLinear) for m in model.modules())
