"""Speed and memory of registered models: throughput, latency, peak memory, an environment stamp, contention.

``run(patterns, BenchConfig())`` measures each model in a fresh child process by default
(``python -m visionzoo.bench.measure``). The child gives three things an in-process loop cannot: peak memory
on CPU (peak RSS over the child's idle baseline, reset per measurement through ``/proc/self/clear_refs``),
an ``OMP_WAIT_POLICY`` that is set before OpenMP starts, and isolation (a model that crashes or is killed
for memory becomes one error row and the run goes on).

Timing: warm-up, then ``repeats`` timed runs of an adaptive number of steps (``budget`` seconds in all per
model, batch size and mode); the reported throughput is that of the median run (min and max are kept), so
``samples_per_sec == batch_size * steps / time`` holds for the numbers in every row.

Shared machines lie. Each run records this process's CPU utilisation (CPU time / (wall x threads)) and the
cores that other processes (and the hypervisor, as steal) used meanwhile, from ``/proc/stat``. A run is
contended when others used more cores than the machine had to spare; contended runs are left out of the
median when enough clean ones exist, and a row whose runs were all contended gets ``status="contended"``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("infer", "train", "both")
OMP_POLICIES = ("passive", "active", "inherit")
MALLOC_POLICIES = ("keep", "inherit")
# glibc returns freed blocks above the mmap threshold (max 32 MB by default) to the OS, so every large activation
# of an eager forward is page-faulted in anew; "keep" makes the measuring process reuse freed memory instead
# (DeepMAD-29M batch 16 on 2 cores: 5.0 -> 10.4 img/s, MaxViT-T 7.8 -> 11.2; ConvNeXt-T unchanged). The same
# effect as running under jemalloc/tcmalloc, as deployments usually do.
MALLOC_KEEP = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}
# ConvNets, ViTs and hybrids of one size class (about 4-5 GMACs); other families of that class join by GMACs.
DEFAULT_LINEUP = ("resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224", "deit_small_patch16_224")
LINEUP_GMACS = (3.5, 5.7)
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


@dataclass
class BenchConfig:
    """What to measure and how. ``budget`` is the timed seconds per model, batch size and mode."""

    batch_sizes: tuple[int, ...] = (1, 32)
    img_size: int | None = None
    dtype: str = "fp32"
    channels_last: bool = False
    compile: str | None = None  # None = eager; otherwise a torch.compile mode ("default", "max-autotune", ...)
    fuse: bool = False
    freeze: bool = True  # compiled inference: inductor freezing (weights folded as constants, prepacked)
    threads: int | None = None
    device: str = "cpu"
    mode: str = "infer"
    repeats: int = 3
    budget: float = 3.0
    subprocess: bool = True
    omp_wait_policy: str = "passive"
    malloc_policy: str = "keep"
    compare_timm: bool = False
    roofline: bool = False
    num_classes: int = 1000
    timeout: float | None = None  # seconds per model in the child process; None = no limit

    def validate(self) -> BenchConfig:
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"bench: batch_sizes must be positive integers, got {self.batch_sizes}")
        if self.dtype not in DTYPES:
            raise ValueError(f"bench: dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.mode not in MODES:
            raise ValueError(f"bench: mode must be one of {MODES}, got {self.mode!r}")
        if self.malloc_policy not in MALLOC_POLICIES:
            raise ValueError(f"bench: malloc_policy must be one of {MALLOC_POLICIES}, got {self.malloc_policy!r}")
        if self.omp_wait_policy not in OMP_POLICIES:
            raise ValueError(f"bench: omp_wait_policy must be one of {OMP_POLICIES}, got {self.omp_wait_policy!r}")
        if self.repeats < 1 or self.budget <= 0:
            raise ValueError(f"bench: repeats must be >= 1 and budget > 0, got {self.repeats} and {self.budget}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"bench: threads must be >= 1, got {self.threads}")
        if self.img_size is not None and self.img_size < 1:
            raise ValueError(f"bench: img_size must be positive, got {self.img_size}")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("bench: device 'cuda' was asked for but torch.cuda.is_available() is False")
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


# --- environment ----------------------------------------------------------------------------------------
def cpu_info() -> tuple[str, list[str]]:
    """The CPU model name and the SIMD/matrix flags that matter for these kernels."""
    name, flags = platform.processor() or platform.machine(), []
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            text = f.read()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        name = m.group(1).strip() if m else name
        m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
        have = set(m.group(1).split()) if m else set()
        flags = [f for f in CPU_FLAGS if f in have]
    return name, flags


def omp_policy_label(policy: str | None = None) -> str:
    """What OMP_WAIT_POLICY a process gets: the configured one, or this process's environment."""
    if policy in ("passive", "active"):
        return policy.upper()
    return os.environ.get("OMP_WAIT_POLICY", "unset (runtime default: spin, then sleep)")


def malloc_label(policy: str | None = None) -> str:
    """Whether a process keeps freed memory (``keep``, our glibc settings) or has the system's malloc settings."""
    keep = policy == "keep" or all(os.environ.get(k) == v for k, v in MALLOC_KEEP.items())
    return "keep" if keep else "system"


def environment(cfg: BenchConfig | None = None) -> dict[str, Any]:
    """A stamp of what the numbers depend on: versions, device, CPU model and flags, threads, OMP policy."""
    cfg = cfg or BenchConfig()
    import visionzoo

    name, flags = cpu_info()
    env = dict(visionzoo=visionzoo.__version__, torch=torch.__version__, python=platform.python_version(),
               platform=platform.platform(), device=cfg.device, cpu=name, cpu_flags=flags,
               cpu_count=os.cpu_count(), cpus_usable=_usable_cpus(),
               threads=cfg.threads or torch.get_num_threads(),
               omp_wait_policy=omp_policy_label(cfg.omp_wait_policy if cfg.subprocess else "inherit"),
               malloc_policy=malloc_label(cfg.malloc_policy if cfg.subprocess else "inherit"),
               omp_num_threads=os.environ.get("OMP_NUM_THREADS"), mkldnn=torch.backends.mkldnn.is_available(),
               load_avg=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
               time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if torch.device(cfg.device).type == "cuda" and torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- contention and memory probes ------------------------------------------------------------------------
def _system_busy() -> float | None:
    """Seconds of CPU that every process on the machine (plus steal) has used, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in parts[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    try:
        import resource  # microsecond resolution, where os.times() counts clock ticks

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    except ImportError:
        t = os.times()
        return t.user + t.system


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb(key: str = "VmRSS") -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if key == "VmHWM":
        import resource

        scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return None


class _Memory:
    """Peak memory of one measurement: CUDA's allocator peak, or peak RSS over the idle baseline on CPU."""

    def __init__(self, device: torch.device, baseline_mb: float | None) -> None:
        self.cuda = device.type == "cuda"
        self.baseline = baseline_mb
        self.peak: float | None = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.baseline is not None and not _reset_peak_rss():
            self.baseline = None  # without a resettable peak the number would mix measurements

    def stop(self) -> None:
        if self.cuda:
            mb = torch.cuda.max_memory_allocated() / 2**20
        elif self.baseline is not None:
            mb = (_rss_mb("VmHWM") or 0.0) - self.baseline
        else:
            return
        self.peak = mb if self.peak is None else max(self.peak, mb)


# --- timing ------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    samples_per_sec: float
    samples_per_sec_min: float
    samples_per_sec_max: float
    step_time_ms: float
    steps: int
    time_s: float
    step_times: list[float] = field(repr=False, default_factory=list)
    cpu_util: float | None = None
    other_cores: float | None = None
    contended_runs: int = 0
    all_contended: bool = False
    peak_mem_mb: float | None = None
    first_step_s: float = 0.0


@dataclass
class _Run:
    steps: int
    time_s: float
    cpu_util: float
    other_cores: float | None
    contended: bool


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def time_interleaved(steps: list[Callable[[], None]], batch_size: int, cfg: BenchConfig, device: torch.device,
                     baseline_mb: float | None = None) -> list[Timing]:
    """Warm each step function up, then time ``cfg.repeats`` runs of each, interleaved run by run."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync_each = device.type != "cuda" or batch_size == 1  # per-step latency; on CUDA only where it is latency
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    spare = max(0.0, _usable_cpus() - threads)
    mems = [_Memory(device, baseline_mb) for _ in steps]
    first, est = [], []
    for fn, mem in zip(steps, mems, strict=True):
        mem.start()
        t0 = time.perf_counter()
        fn()
        sync()
        last = first_s = time.perf_counter() - t0
        n = 1
        # at least two warm-up steps (a compiled model always: its first step is the compile), unless an eager
        # step is slow; and at least a tenth of the budget
        while (n < 2 and (last < 1.0 or cfg.compile)) or time.perf_counter() - t0 < 0.1 * cfg.budget:
            t1 = time.perf_counter()
            fn()
            sync()
            last = time.perf_counter() - t1
            n += 1
        mem.stop()
        first.append(first_s)
        est.append(last)
    n_steps = [max(1, round(cfg.budget / cfg.repeats / max(e, 1e-6))) for e in est]
    runs: list[list[_Run]] = [[] for _ in steps]
    step_times: list[list[float]] = [[] for _ in steps]
    for _ in range(cfg.repeats):
        for i, (fn, mem) in enumerate(zip(steps, mems, strict=True)):
            mem.start()
            busy0, cpu0 = _system_busy(), _own_cpu()
            t0 = time.perf_counter()
            for _ in range(n_steps[i]):
                if sync_each:
                    ts = time.perf_counter()
                    fn()
                    sync()
                    step_times[i].append(time.perf_counter() - ts)
                else:
                    fn()
            sync()
            wall = time.perf_counter() - t0
            cpu = _own_cpu() - cpu0
            busy1 = _system_busy()
            mem.stop()
            # /proc/stat counts clock ticks (10 ms): too coarse for shorter runs
            other = None if busy0 is None or wall < 0.05 else max(0.0, (busy1 - busy0 - cpu) / wall)
            util = cpu / (wall * threads)
            # contended: others used more cores than we left free (0.25 core of slack for the OS and clock ticks)
            contended = other is not None and other > spare + 0.25
            runs[i].append(_Run(n_steps[i], wall, util, other, contended))
    out = []
    for i in range(len(steps)):
        clean = [r for r in runs[i] if not r.contended]
        pool = clean or runs[i]
        tput = sorted(pool, key=lambda r: batch_size * r.steps / r.time_s)
        med = tput[(len(tput) - 1) // 2]  # the lower median: one real run, so B x steps / time holds
        rates = [batch_size * r.steps / r.time_s for r in pool]
        out.append(Timing(samples_per_sec=batch_size * med.steps / med.time_s, samples_per_sec_min=min(rates),
                          samples_per_sec_max=max(rates), step_time_ms=1e3 * med.time_s / med.steps,
                          steps=med.steps, time_s=med.time_s, step_times=step_times[i], cpu_util=med.cpu_util,
                          other_cores=med.other_cores, contended_runs=len(runs[i]) - len(clean),
                          all_contended=not clean, peak_mem_mb=mems[i].peak,
                          first_step_s=first[i] - est[i]))
    return out


# --- one model ---------------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", ())
    return (oom and isinstance(e, oom)) or "out of memory" in str(e).lower() or "can't allocate memory" in str(e)


def _prepare(model: torch.nn.Module, cfg: BenchConfig, device: torch.device, fuse: bool) -> torch.nn.Module:
    model = model.to(device)
    if fuse:
        if not hasattr(model, "fuse"):
            raise TypeError(f"{type(model).__name__} has no fuse()")
        model.eval()
        model = model.fuse() or model
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        # one static graph per batch size: "automatic dynamic" recompiles the second shape as a slower
        # symbolic-shape graph, which would make every batch size after the first look slower
        model = torch.compile(model, mode=None if cfg.compile == "default" else cfg.compile, dynamic=False)
    return model


def _set_freezing(on: bool) -> None:
    """Inductor freezing for compiled inference: parameters become constants, so conv/linear weights are
    prepacked for oneDNN and conv+BN folded. Read when a graph is compiled (its first call), so it is set per mode."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = on


def _infer_step(model: torch.nn.Module, x: torch.Tensor, cfg: BenchConfig, device: torch.device) -> Callable:
    amp = cfg.dtype != "fp32"
    dtype = DTYPES[cfg.dtype]

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
            model(x)
    return step


def _train_step(model: torch.nn.Module, x: torch.Tensor, cfg: BenchConfig, device: torch.device) -> Callable:
    amp = cfg.dtype != "fp32"
    dtype = DTYPES[cfg.dtype]
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    target = torch.randint(0, max(cfg.num_classes, 1), (x.shape[0],), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            out = model(x)
        loss = F.cross_entropy(out.float(), target) if cfg.num_classes else out.float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _timm_model(name: str, cfg: BenchConfig) -> tuple[Any, str]:
    """timm's model of the same name (random init), or None and the reason it cannot be had."""
    try:
        import timm
    except ImportError as e:
        return None, f"timm cannot be imported in {sys.executable} ({e}); install timm to compare"
    if not timm.is_model(name):
        return None, f"timm {timm.__version__} has no model named {name!r}"
    try:
        kw = {} if cfg.img_size is None else dict(img_size=cfg.img_size)
        try:
            m = timm.create_model(name, pretrained=False, num_classes=cfg.num_classes, **kw)
        except TypeError:
            m = timm.create_model(name, pretrained=False, num_classes=cfg.num_classes)
    except Exception as e:  # noqa: BLE001  (any failure is reported, the run goes on)
        return None, f"timm.create_model({name!r}) failed: {_one_line(e)}"
    return m.eval(), f"timm {timm.__version__}"


def measure_model(name: str, cfg: BenchConfig, emit: Callable[[dict], None] | None = None,
                  baseline_mb: float | None = None) -> list[BenchResult]:
    """Measure one registered model at every batch size (and mode); errors become rows, never exceptions."""
    from visionzoo import create_model, get_variant, profile

    emit = emit or (lambda d: None)
    rows: list[BenchResult] = []

    def add(r: BenchResult) -> None:
        rows.append(r)
        emit(dict(row=asdict(r)))

    device = torch.device(cfg.device)
    common = dict(model=name, repeats=cfg.repeats, device=str(device), dtype=cfg.dtype,
                  threads=torch.get_num_threads() if device.type == "cpu" else None,
                  omp_wait_policy=omp_policy_label(cfg.omp_wait_policy if cfg.subprocess else "inherit"),
                  malloc_policy=malloc_label(),  # read from this (measuring) process's environment
                  channels_last=cfg.channels_last, fused=cfg.fuse, compile=cfg.compile or "")
    try:
        v = get_variant(name)
    except ValueError as e:
        add(BenchResult(status="error", error=str(e), **common))
        return rows
    common.update(family=v.family, kind=v.kind, top1=v.paper.top1)
    img = cfg.img_size or v.input_size
    common["infer_img_size"] = img
    try:
        prof = profile(name, input_size=img, img_size=cfg.img_size, num_classes=cfg.num_classes)
        common.update(param_count=round(prof.params_m, 6), infer_gmacs=round(prof.gmacs, 6),
                      infer_gflops=round(prof.gflops, 6))
    except (ValueError, TypeError) as e:
        add(BenchResult(status="error", error=f"cannot take a {img}x{img} input: {_one_line(e)}", **common))
        return rows
    except Exception:  # noqa: BLE001  (an op without a meta kernel: time it anyway, without MACs)
        pass
    try:
        torch.manual_seed(0)
        with torch.device(device):
            base = create_model(name, img_size=cfg.img_size, num_classes=cfg.num_classes).eval()
    except Exception as e:  # noqa: BLE001
        add(BenchResult(status="error", error=f"build failed: {_one_line(e)}", **common))
        return rows
    timm_model, timm_note = (None, "")
    if cfg.compare_timm:
        timm_model, timm_note = _timm_model(name, cfg)
    modes = ("infer", "train") if cfg.mode == "both" else (cfg.mode,)
    by_bs: dict[int, BenchResult] = {}
    for mode in modes:
        if cfg.compile:
            _set_freezing(cfg.freeze and mode == "infer")
        try:
            if mode == "infer":
                model = _prepare(copy.deepcopy(base) if "train" in modes else base, cfg, device, cfg.fuse)
                ref = None if timm_model is None else _prepare(timm_model, cfg, device, fuse=False)
            else:
                model = _prepare(base.train(), cfg, device, fuse=False)  # fuse is a deploy transform
                ref = None
        except Exception as e:  # noqa: BLE001
            what = "fuse" if cfg.fuse and mode == "infer" else "prepare"
            add(BenchResult(status="error", error=f"{mode}: {what} failed: {_one_line(e)}", **common))
            continue
        for bs in sorted(cfg.batch_sizes):
            emit(dict(progress=dict(mode=mode, batch_size=bs)))
            r = by_bs.get(bs)
            try:
                x = torch.randn(bs, 3 if not hasattr(base, "in_chans") else base.in_chans, img, img, device=device)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                make = _infer_step if mode == "infer" else _train_step
                fns = [make(model, x, cfg, device)] + ([make(ref, x, cfg, device)] if ref is not None else [])
                t = time_interleaved(fns, bs, cfg, device, baseline_mb)
            except Exception as e:  # noqa: BLE001  (OOM, a compile failure, a size the model rejects)
                kind = ("out of memory" if _is_oom(e) else
                        f"failed (torch.compile mode {cfg.compile})" if cfg.compile else "failed")
                add(BenchResult(status="error", error=f"{mode} at batch {bs} {kind}: {_one_line(e)}",
                                infer_batch_size=bs, **common))
                if _is_oom(e):
                    break  # larger batches will not fit either
                continue
            if r is None:
                r = BenchResult(**common)
                by_bs[bs] = r
            _fill(r, mode, bs, t[0], cfg)
            if len(t) > 1:
                r.timm_infer_samples_per_sec = round(t[1].samples_per_sec, 3)
                r.timm_infer_samples_per_sec_min = round(t[1].samples_per_sec_min, 3)
                r.timm_infer_samples_per_sec_max = round(t[1].samples_per_sec_max, 3)
                r.ratio_vs_timm = round(t[0].samples_per_sec / t[1].samples_per_sec, 3)
            if cfg.compare_timm:
                r.timm_note = timm_note
    for bs in sorted(by_bs):
        add(by_bs[bs])
    return rows


def _fill(r: BenchResult, mode: str, bs: int, t: Timing, cfg: BenchConfig) -> None:
    p = mode + "_"
    setattr(r, p + "batch_size", bs)
    for k, v in (("samples_per_sec", t.samples_per_sec), ("samples_per_sec_min", t.samples_per_sec_min),
                 ("samples_per_sec_max", t.samples_per_sec_max), ("step_time", t.step_time_ms),
                 ("time", t.time_s), ("cpu_util", t.cpu_util), ("other_cores", t.other_cores),
                 ("peak_mem_mb", t.peak_mem_mb)):
        setattr(r, p + k, None if v is None else round(v, 6))
    setattr(r, p + "steps", t.steps)
    if cfg.compile:
        setattr(r, p + "compile_time", round(max(0.0, t.first_step_s), 3))
    if mode == "infer":
        if bs == 1 and t.step_times:
            r.infer_latency_p50, r.infer_latency_p90, r.infer_latency_p99 = (
                round(1e3 * _percentile(t.step_times, q), 4) for q in (50, 90, 99))
        if r.infer_gflops is not None:
            r.infer_gflop_per_sec = round(r.infer_gflops * t.samples_per_sec, 3)
    r.contended_runs += t.contended_runs
    if t.all_contended:
        r.status = "contended"


# --- the run: models in child processes -------------------------------------------------------------------
def resolve_models(patterns: list[str] | tuple[str, ...] | str | None) -> tuple[list[str], list[BenchResult]]:
    """Registered names for ``patterns`` (the default line-up when empty) and error rows for those matching none.

    A glob leaves out the tiny ``*_test`` variants unless it names them (``'*_test'``).
    """
    from visionzoo import list_models

    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        return default_lineup(), []
    names, errors = [], []
    for p in patterns:
        if not any(c in p for c in "*?["):
            found = [p]  # an exact name; an unknown one becomes an error row with "did you mean"
        else:
            found = [n for n in list_models(p) if "test" in p or not n.endswith("_test")]
            if not found:
                errors.append(BenchResult(model=p, status="error",
                                          error=f"no registered model matches {p!r}; see `visionzoo list`"))
        names += [n for n in found if n not in names]
    return names, errors


def default_lineup() -> list[str]:
    """The named ConvNets, ViTs and hybrids of the ~4-5 GMACs class, plus one variant per other family there."""
    from visionzoo import get_variant, list_families, list_models

    names = [n for n in DEFAULT_LINEUP if n in set(list_models())]
    have = {get_variant(n).family for n in names}
    lo, hi = LINEUP_GMACS
    for fam in list_families():
        if fam.name in have:
            continue
        cands = [get_variant(n) for n in fam.variants if not n.endswith("_test")]
        cands = [v for v in cands if v.gmacs is not None and lo <= v.gmacs <= hi and v.input_size <= 256]
        if cands:
            names.append(min(cands, key=lambda v: abs(v.gmacs - 4.5)).name)
    return names


def _child_env(cfg: BenchConfig) -> dict[str, str]:
    env = dict(os.environ)
    if cfg.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = cfg.omp_wait_policy.upper()
    if cfg.malloc_policy == "keep":
        env.update(MALLOC_KEEP)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _in_child(task: str, cfg: BenchConfig, model: str | None = None) -> tuple[list[dict], str | None]:
    """Run ``task`` in ``python -m visionzoo.bench.measure``; the lines it wrote and why it died, if it did."""
    with tempfile.TemporaryDirectory(prefix="visionzoo-bench-") as tmp:
        job, out = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.jsonl")
        with open(job, "w") as f:
            json.dump(dict(task=task, model=model, config=asdict(cfg)), f)
        proc = subprocess.Popen([sys.executable, "-m", "visionzoo.bench.measure", job, out], env=_child_env(cfg),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        why = None
        try:
            _, err = proc.communicate(timeout=cfg.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            why = f"timed out after {cfg.timeout:.0f} s"
        except KeyboardInterrupt:
            proc.kill()
            proc.communicate()
            raise _Interrupted(_read_lines(out)) from None
        lines = _read_lines(out)
        if why is None and not (lines and lines[-1].get("done")):
            rc = proc.returncode
            tail = [ln for ln in (err or "").strip().splitlines() if ln.strip()][-1:] or [""]
            why = (f"measuring process was killed by signal {-rc}" + (" (likely out of memory)" if rc == -9 else "")
                   if rc < 0 else f"measuring process exited with code {rc}: {tail[0][:200]}")
        return lines, why


class _Interrupted(Exception):
    def __init__(self, lines: list[dict]) -> None:
        super().__init__("interrupted")
        self.lines = lines


def _read_lines(path: str) -> list[dict]:
    out = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def _rows_from_lines(name: str, lines: list[dict], why: str | None) -> list[BenchResult]:
    rows = [BenchResult.from_dict(d["row"]) for d in lines if "row" in d]
    if why:
        where = [d["progress"] for d in lines if "progress" in d]
        at = f" during {where[-1]['mode']} at batch {where[-1]['batch_size']}" if where else ""
        rows.append(BenchResult(model=name, status="error", error=f"{why}{at}",
                                infer_batch_size=where[-1]["batch_size"] if where else None))
    return rows


def measure_roofline(cfg: BenchConfig) -> dict[str, Any]:
    """The machine's matmul peaks and memory bandwidth, measured with the run's threads and OMP policy."""
    if cfg.subprocess:
        lines, why = _in_child("roofline", cfg)
        got = [d["roofline"] for d in lines if "roofline" in d]
        if not got:
            raise RuntimeError(f"roofline measurement failed: {why}")
        return got[0]
    from visionzoo.bench.roofline import measure_peaks

    return measure_peaks(cfg.device)


def run(patterns: list[str] | tuple[str, ...] | str | None = None, config: BenchConfig | None = None,
        progress: Callable[[str, int, int, list[BenchResult]], None] | None = None) -> BenchResults:
    """Measure every model matching ``patterns`` (the default line-up when empty); see the module docstring.

    ``progress(name, index, total, rows)`` is called after each model. Ctrl-C stops the run and keeps the rows
    measured so far (``results.interrupted`` is then True).
    """
    cfg = copy.deepcopy(config or BenchConfig()).validate()
    t0 = time.perf_counter()
    names, rows = resolve_models(patterns)
    from visionzoo import list_models

    known = set(list_models())
    results = BenchResults(rows, environment(cfg), asdict(cfg))
    if cfg.threads and not cfg.subprocess:
        torch.set_num_threads(cfg.threads)
    try:
        if cfg.roofline:
            try:
                results.roofline = measure_roofline(cfg)
            except Exception as e:  # noqa: BLE001
                results.roofline = dict(error=_one_line(e))
        for i, name in enumerate(names):
            if name not in known:  # an unknown name needs no child process to say so
                got = measure_model(name, cfg)
            elif cfg.subprocess:
                try:
                    lines, why = _in_child("model", cfg, name)
                except _Interrupted as e:
                    results += _rows_from_lines(name, e.lines, None)
                    raise KeyboardInterrupt from None
                got = _rows_from_lines(name, lines, why)
            else:
                got = measure_model(name, cfg)
            results += got
            if progress is not None:
                progress(name, i, len(names), got)
    except KeyboardInterrupt:
        results.interrupted = True
    _add_mfu(results)
    results.wall_s = time.perf_counter() - t0
    return results


def _add_mfu(results: BenchResults) -> None:
    roof = results.roofline or {}
    for r in results:
        peak = roof.get(f"{r.dtype}_gflops") or roof.get("fp32_gflops")
        if peak and r.infer_gflop_per_sec is not None:
            r.infer_mfu = round(r.infer_gflop_per_sec / peak, 4)


def _child_main(job_path: str, out_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    cfg = BenchConfig(**{**job["config"], "batch_sizes": tuple(job["config"]["batch_sizes"])})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = open(out_path, "a", buffering=1)

    def emit(d: dict) -> None:
        out.write(json.dumps(d) + "\n")
        out.flush()

    if job["task"] == "roofline":
        from visionzoo.bench.roofline import measure_peaks

        emit(dict(roofline=measure_peaks(cfg.device)))
    else:
        import visionzoo  # noqa: F401  (imports and registration are part of the idle baseline)

        baseline = _rss_mb() if torch.device(cfg.device).type == "cpu" else None
        measure_model(job["model"], cfg, emit, baseline)
    emit(dict(done=True))
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))
