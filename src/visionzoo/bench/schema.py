"""What ``visionzoo bench`` measures and what it returns: ``BenchConfig``, ``BenchResult``, ``BenchResults``."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from visionzoo.errors import ArgumentError
from visionzoo.runtime.backends import BACKENDS as DEPLOY_BACKENDS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BENCH_DTYPES = (*DTYPES, "int8")  # int8: through visionzoo.deploy's backends (dynamic quantization)
# eager: the model as given (--fuse, --channels-last, --compile apply); every other one is visionzoo.deploy's
# backend of that name (auto: deploy's measured choice per model and batch size)
BACKENDS = (*DEPLOY_BACKENDS, "auto")
DEFAULT_BACKEND = "eager_tuned"  # one backend for every architecture, each Linear on the kernel fastest here
MODES = ("infer", "train", "both")
OMP_POLICIES = ("passive", "active", "inherit")
MALLOC_POLICIES = ("keep", "inherit")


@dataclass
class BenchConfig:
    """What to measure and how. ``budget`` is the timed seconds per model, batch size and mode.

    ``batch_sizes``, ``repeats`` and ``budget`` left as ``None`` take the defaults of ``resolved``: the default
    line-up is measured quicker (batch 1 and 16, 2 repeats, 1 s) so that its 29 models fit in about 4.5 minutes.
    ``backend``: how each model runs (``BACKENDS``). The default, ``eager_tuned``, is torch eager after
    ``fuse()`` with every Linear/Conv2d and every attention call on the kernel measured fastest on this CPU, so that
    no architecture is ranked by which BLAS or attention kernel its layers happen to call; ``eager`` is the model
    exactly as given. ``deploy`` means ``backend="auto"`` (``visionzoo.deploy``'s choice, which may differ per model).
    """

    batch_sizes: tuple[int, ...] | None = None
    img_size: int | None = None
    dtype: str = "fp32"
    backend: str = DEFAULT_BACKEND
    candidates: tuple[str, ...] | None = None  # the backends auto tries (None: all)
    channels_last: bool = False
    compile: str | None = None  # None = eager; otherwise a torch.compile mode ("default", "max-autotune", ...)
    fuse: bool = False
    freeze: bool = True  # compiled inference: inductor freezing (weights folded as constants, prepacked)
    threads: int | None = None
    device: str = "cpu"
    mode: str = "infer"
    repeats: int | None = None
    budget: float | None = None
    deploy: bool = False
    subprocess: bool = True
    omp_wait_policy: str = "passive"
    malloc_policy: str = "keep"
    compare_timm: bool = False
    reference_library: str = "timm"  # what --compare-timm compares with: imported by name, never a dependency
    roofline: bool = False
    num_classes: int = 1000
    timeout: float | None = None  # seconds per model in the child process; None = no limit
    tokens: str | None = None  # token reduction applied to each model, "method:key=value,..." (visionzoo.tokens)
    quant: str | None = None  # real int8 inference: "int8-static" or "int8-dynamic" (torchao, compiled)

    def resolved(self, lineup: bool = False) -> BenchConfig:
        """Fill the defaults left as ``None`` (``lineup``: the quicker ones of the default line-up) and expand
        ``deploy``; in place, returns ``self``."""
        for key, full, quick in (("batch_sizes", (1, 32), (1, 16)), ("repeats", 3, 2), ("budget", 3.0, 1.0)):
            if getattr(self, key) is None:
                setattr(self, key, quick if lineup else full)
        if self.deploy:
            self.backend = "auto"
        elif self.backend == DEFAULT_BACKEND and (self.compile or self.dtype in ("fp16", "int8")
                                                   or self.device != "cpu"):
            # compile, fp16 autocast and GPUs measure the model as given; int8 is torch's dynamic quantization
            self.backend = "eager"
        return self

    def validate(self) -> BenchConfig:
        if self.batch_sizes is None or self.repeats is None or self.budget is None:
            self.resolved()
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ArgumentError(f"bench: batch_sizes must be positive integers, got {self.batch_sizes}")
        if self.dtype not in BENCH_DTYPES:
            raise ArgumentError(f"bench: dtype must be one of {BENCH_DTYPES}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ArgumentError(f"bench: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend != "eager" and torch.device(self.device).type != "cpu":
            raise ArgumentError(f"bench: backend {self.backend!r} chooses among CPU backends; on {self.device} use "
                             f"backend 'eager' (with --compile, --channels-last, --dtype)")
        bad = [c for c in self.candidates or () if c not in BACKENDS[:-1]]
        if bad:
            raise ArgumentError(f"bench: candidates must be among {BACKENDS[:-1]}, got {bad}")
        if self.compile and self.backend != "eager":
            raise ArgumentError(f"bench: compile applies to backend 'eager' only, got backend {self.backend!r}; "
                             f"backend 'inductor' is the compiled one (with freezing)")
        if self.dtype == "fp16" and self.backend != "eager":
            raise ArgumentError(f"bench: dtype 'fp16' runs on backend 'eager' only (autocast), got {self.backend!r}")
        if self.mode != "infer" and self.backend not in ("eager", DEFAULT_BACKEND):
            raise ArgumentError(f"bench: mode {self.mode!r} trains, and training runs the model in eager; backend "
                             f"{self.backend!r} is for inference (use mode 'infer')")
        if self.dtype == "int8" and self.mode != "infer":
            raise ArgumentError("bench: dtype 'int8' is for inference (mode 'infer')")
        if self.mode not in MODES:
            raise ArgumentError(f"bench: mode must be one of {MODES}, got {self.mode!r}")
        if self.malloc_policy not in MALLOC_POLICIES:
            raise ArgumentError(f"bench: malloc_policy must be one of {MALLOC_POLICIES}, got {self.malloc_policy!r}")
        if self.omp_wait_policy not in OMP_POLICIES:
            raise ArgumentError(f"bench: omp_wait_policy must be one of {OMP_POLICIES}, got {self.omp_wait_policy!r}")
        if self.repeats < 1 or self.budget <= 0:
            raise ArgumentError(f"bench: repeats must be >= 1 and budget > 0, got {self.repeats} and {self.budget}")
        if self.threads is not None and self.threads < 1:
            raise ArgumentError(f"bench: threads must be >= 1, got {self.threads}")
        if self.tokens is not None:
            from visionzoo.tokens import parse_spec

            parse_spec(self.tokens)  # a clear error for a mistyped method, before any model is built
        if self.img_size is not None and self.img_size < 1:
            raise ArgumentError(f"bench: img_size must be positive, got {self.img_size}")
        if self.quant is not None:
            from visionzoo.compress.int8 import BENCH_MODES

            if self.quant not in BENCH_MODES:
                raise ArgumentError(f"bench: quant must be one of {BENCH_MODES}, got {self.quant!r}")
            if self.mode != "infer" or self.dtype != "fp32" or self.device != "cpu":
                raise ArgumentError(f"bench: --quant {self.quant} measures CPU fp32-input inference only; drop --mode "
                                 f"{self.mode}, --dtype {self.dtype} or --device {self.device}")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ArgumentError("bench: device 'cuda' was asked for but torch.cuda.is_available() is False")
        return self


@dataclass
class BenchResult:
    """One row: a model at one batch size (or an error). Column names follow timm's benchmark.py."""

    model: str
    status: str = "ok"  # ok | contended | error
    error: str = ""
    family: str = ""
    kind: str = ""
    top1: float | None = None
    param_count: float | None = None  # millions, as timm
    infer_gmacs: float | None = None  # per image
    infer_gflops: float | None = None
    infer_img_size: int | None = None
    infer_batch_size: int | None = None
    infer_samples_per_sec: float | None = None  # the median run
    infer_samples_per_sec_min: float | None = None
    infer_samples_per_sec_max: float | None = None
    infer_step_time: float | None = None  # ms per step (batch) in the median run
    infer_steps: int | None = None  # steps in the median run
    infer_time: float | None = None  # seconds of the median run
    infer_latency_p50: float | None = None  # ms, batch 1 only
    infer_latency_p90: float | None = None
    infer_latency_p99: float | None = None
    infer_peak_mem_mb: float | None = None
    infer_gflop_per_sec: float | None = None
    infer_mfu: float | None = None  # achieved GFLOP/s over the matmul peak (with --roofline)
    infer_cpu_util: float | None = None
    infer_other_cores: float | None = None
    infer_compile_time: float | None = None  # seconds, first call minus a steady step
    timm_infer_samples_per_sec: float | None = None
    timm_infer_samples_per_sec_min: float | None = None
    timm_infer_samples_per_sec_max: float | None = None
    ratio_vs_timm: float | None = None  # ours / timm (> 1: ours is faster)
    timm_note: str = ""
    train_batch_size: int | None = None
    train_samples_per_sec: float | None = None
    train_samples_per_sec_min: float | None = None
    train_samples_per_sec_max: float | None = None
    train_step_time: float | None = None
    train_steps: int | None = None
    train_time: float | None = None
    train_peak_mem_mb: float | None = None
    train_cpu_util: float | None = None
    train_other_cores: float | None = None
    train_compile_time: float | None = None
    contended_runs: int = 0
    repeats: int | None = None
    device: str = ""
    dtype: str = ""
    threads: int | None = None
    omp_wait_policy: str = ""
    malloc_policy: str = ""
    channels_last: bool = False
    fused: bool = False
    compile: str = ""
    backend: str = ""  # what ran the inference rows (one of DEPLOY_BACKENDS)
    backend_detail: str = ""  # e.g. "fused; 37 Linear on onednn (1.28x aten on the calibration shapes)"
    backend_rel_diff: float | None = None  # max |out - eager fp32| / max |eager fp32| on the timed input
    backend_build_s: float | None = None  # export/compile/pack time of the backend, apart from the timing
    timm_backend: str = ""
    cpu: str = ""
    cpu_flags: str = ""  # space-separated, as /proc/cpuinfo
    tokens: str = ""  # the token reduction measured ("tome:r=13"), empty for the model as built
    quant: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class BenchResults(list):
    """``list[BenchResult]`` with the run's environment stamp, config, roofline peaks and wall time."""

    def __init__(self, rows=(), environment=None, config=None, roofline=None) -> None:  # noqa: ANN001
        super().__init__(rows)
        self.environment: dict[str, Any] = environment or {}
        self.config: dict[str, Any] = config or {}
        self.roofline: dict[str, Any] | None = roofline
        self.interrupted = False
        self.wall_s = 0.0


