"""Timing one model: warm-up, interleaved timed runs, throughput, latency percentiles, memory; compile and fuse
set-up; the optional same-process timm comparison."""
from __future__ import annotations

import copy
import importlib
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from visionzoo.bench.schema import DTYPES, BenchConfig, BenchResult
from visionzoo.bench.system import (
    PeakMemory,
    cpu_info,
    malloc_label,
    omp_policy_label,
    own_cpu,
    system_busy,
    usable_cpus,
)


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
    spare = max(0.0, usable_cpus() - threads)
    mems = [PeakMemory(device, baseline_mb) for _ in steps]
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
            busy0, cpu0 = system_busy(), own_cpu()
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
            cpu = own_cpu() - cpu0
            busy1 = system_busy()
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
def one_line(e: BaseException) -> str:
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


def _reference_model(name: str, cfg: BenchConfig) -> tuple[Any, str]:
    """The reference library's model of the same name (random init), or None and the reason it cannot be had.

    The library (``cfg.reference_library``, timm by default) is imported by name, only for ``--compare-timm``:
    it is an optional peer to compare with, never a dependency (it is not installed here). It must offer
    ``create_model(name, pretrained=False, num_classes=...)`` and may offer ``is_model(name)``, as timm does."""
    lib = cfg.reference_library
    try:
        ref = importlib.import_module(lib)
    except ImportError as e:
        return None, f"{lib} cannot be imported in {sys.executable} ({e}); install {lib} to compare"
    version = f"{lib} {getattr(ref, '__version__', '')}".strip()
    if hasattr(ref, "is_model") and not ref.is_model(name):
        return None, f"{version} has no model named {name!r}"
    try:
        kw = {} if cfg.img_size is None else dict(img_size=cfg.img_size)
        try:
            m = ref.create_model(name, pretrained=False, num_classes=cfg.num_classes, **kw)
        except TypeError:
            m = ref.create_model(name, pretrained=False, num_classes=cfg.num_classes)
    except Exception as e:  # noqa: BLE001  (any failure is reported, the run goes on)
        return None, f"{lib}.create_model({name!r}) failed: {one_line(e)}"
    return m.eval(), version


class _Backends:
    """Ours (and timm's, with --compare-timm) through ``visionzoo.deploy`` on ``cfg.backend``: built once for
    a named backend (each runs any batch size), chosen per batch size for ``auto`` (the choice depends on it)."""

    def __init__(self, model: torch.nn.Module, ref: torch.nn.Module | None, cfg: BenchConfig) -> None:
        self.model, self.ref, self.cfg = model, ref, cfg
        self.ours = self.theirs = None

    def _deploy(self, model: torch.nn.Module, x: torch.Tensor):  # noqa: ANN202
        from visionzoo.deploy import deploy

        auto = self.cfg.backend == "auto"
        # a named backend is only checked against eager here (the bench times it); auto times its candidates
        return deploy(model, x.contiguous(), backend=self.cfg.backend, dtype=self.cfg.dtype,
                      budget=max(0.5, 0.5 * self.cfg.budget) if auto else 0.0,
                      candidates=tuple(self.cfg.candidates) if auto and self.cfg.candidates else None)

    def steps(self, x: torch.Tensor) -> list[Callable]:
        if self.ours is None or self.cfg.backend == "auto":
            self.ours = self._deploy(self.model, x)
        fns = [lambda: self.ours(x)]
        if self.ref is not None:
            if self.theirs is None or self.cfg.backend == "auto":
                self.theirs = self._deploy(self.ref, x)
            fns.append(lambda: self.theirs(x))
        return fns

    def fill(self, r: BenchResult) -> None:
        rec = self.ours.record
        chosen = next((c for c in rec.candidates if c.backend == rec.backend and c.dtype == rec.dtype), None)
        r.backend, r.backend_rel_diff = rec.backend, rec.rel_diff
        r.backend_detail = chosen.detail if chosen else ""
        r.backend_build_s = chosen.build_s if chosen else None
        r.fused = r.fused or bool(re.search(r"(^|; )fused\b", r.backend_detail))
        if self.theirs is not None:
            r.timm_backend = self.theirs.record.backend


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
    cpu_name, cpu_flags = cpu_info()
    common = dict(model=name, repeats=cfg.repeats, device=str(device), dtype=cfg.dtype,
                  threads=torch.get_num_threads() if device.type == "cpu" else None,
                  omp_wait_policy=omp_policy_label(cfg.omp_wait_policy if cfg.subprocess else "inherit"),
                  malloc_policy=malloc_label(),  # read from this (measuring) process's environment
                  channels_last=cfg.channels_last, fused=cfg.fuse, compile=cfg.compile or "",
                  backend=cfg.backend if cfg.mode != "train" else "eager", cpu=cpu_name,
                  cpu_flags=" ".join(cpu_flags), tokens=cfg.tokens or "", quant=cfg.quant or "")
    try:
        v = get_variant(name)
    except ValueError as e:
        add(BenchResult(status="error", error=str(e), **common))
        return rows
    common.update(family=v.family, kind=v.kind, top1=v.paper.top1)
    img = cfg.img_size or v.input_size
    common["infer_img_size"] = img
    try:
        # with --tokens the reduced model is counted once built (ATS's token counts depend on the input)
        prof = None if cfg.tokens else profile(name, input_size=img, img_size=cfg.img_size, num_classes=cfg.num_classes)
        if prof is not None:
            common.update(param_count=round(prof.params_m, 6), infer_gmacs=round(prof.gmacs, 6),
                          infer_gflops=round(prof.gflops, 6))
    except (ValueError, TypeError) as e:
        add(BenchResult(status="error", error=f"cannot take a {img}x{img} input: {one_line(e)}", **common))
        return rows
    except Exception:  # noqa: BLE001  (an op without a meta kernel: time it anyway, without MACs)
        pass
    try:
        torch.manual_seed(0)
        with torch.device(device):
            base = create_model(name, img_size=cfg.img_size, num_classes=cfg.num_classes).eval()
    except Exception as e:  # noqa: BLE001
        add(BenchResult(status="error", error=f"build failed: {one_line(e)}", **common))
        return rows
    if cfg.tokens:
        try:
            from visionzoo.tokens import apply_spec

            apply_spec(base, cfg.tokens)
            prof = profile(base, input_size=img)
            common.update(param_count=round(prof.params_m, 6), infer_gmacs=round(prof.gmacs, 6),
                          infer_gflops=round(prof.gflops, 6))
        except ValueError as e:
            add(BenchResult(status="error", error=f"--tokens {cfg.tokens}: {one_line(e)}", **common))
            return rows
    timm_model, timm_note = (None, "")
    if cfg.compare_timm:
        timm_model, timm_note = _reference_model(name, cfg)
    modes = ("infer", "train") if cfg.mode == "both" else (cfg.mode,)
    by_bs: dict[int, BenchResult] = {}
    for mode in modes:
        via_deploy = mode == "infer" and (cfg.backend != "eager" or cfg.dtype == "int8")
        if cfg.compile:
            _set_freezing(cfg.freeze and mode == "infer")
        try:
            if mode == "infer" and cfg.quant:  # real int8 (torchao): it compiles the quantized graph itself
                from visionzoo.compress.int8 import for_bench

                model = _prepare(base, replace(cfg, compile=None), device, cfg.fuse)
                model = for_bench(model, cfg.quant, torch.randn(max(cfg.batch_sizes), base.in_chans, img, img))
                ref = None
            elif mode == "infer":
                model = _prepare(copy.deepcopy(base) if "train" in modes else base, cfg, device,
                                 cfg.fuse and not via_deploy)
                ref = None if timm_model is None else _prepare(timm_model, cfg, device, fuse=False)
            else:
                model = _prepare(base.train(), cfg, device, fuse=False)  # fuse is a deploy transform
                ref = None
        except Exception as e:  # noqa: BLE001
            what = f"--quant {cfg.quant}" if cfg.quant else "fuse" if cfg.fuse and mode == "infer" else "prepare"
            add(BenchResult(status="error", error=f"{mode}: {what} failed: {one_line(e)}", **common))
            continue
        backends = _Backends(model, ref, cfg) if via_deploy else None
        for bs in sorted(cfg.batch_sizes):
            emit(dict(progress=dict(mode=mode, batch_size=bs)))
            r = by_bs.get(bs)
            try:
                x = torch.randn(bs, 3 if not hasattr(base, "in_chans") else base.in_chans, img, img, device=device)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if backends is not None:
                    fns = backends.steps(x)
                else:
                    make = _infer_step if mode == "infer" else _train_step
                    fns = [make(model, x, cfg, device)] + ([make(ref, x, cfg, device)] if ref is not None else [])
                t = time_interleaved(fns, bs, cfg, device, baseline_mb)
            except Exception as e:  # noqa: BLE001  (OOM, a compile failure, a size the model rejects)
                kind = ("out of memory" if _is_oom(e) else
                        f"failed (torch.compile mode {cfg.compile})" if cfg.compile else
                        f"failed (backend {cfg.backend})" if backends is not None else "failed")
                add(BenchResult(status="error", error=f"{mode} at batch {bs} {kind}: {one_line(e)}",
                                infer_batch_size=bs, **common))
                if _is_oom(e):
                    break  # larger batches will not fit either
                continue
            if r is None:
                r = BenchResult(**common)
                by_bs[bs] = r
            _fill(r, mode, bs, t[0], cfg)
            if backends is not None:
                backends.fill(r)
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


