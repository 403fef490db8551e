"""``visionzoo.deploy(model, example_input)``: the fastest way to run a model on this machine, chosen by measuring.

    fast = visionzoo.deploy(model, torch.randn(16, 3, 224, 224))      # backend="auto", dtype="fp32"
    logits = fast(images)
    print(fast.record.summary())                                      # what ran, why, every candidate's speed

``backend="auto"`` builds every backend that can run here (``visionzoo.runtime.backends``: eager, eager_tuned,
inductor, torchscript, onnxruntime, openvino), checks each against eager fp32 on the example input, times the ones that
agree (interleaved in blocks, A A, B B, C C, A A, ...; medians), and keeps the fastest. fp32 candidates
must agree within ``tol`` (default 1e-4, relative: max |diff| over max |eager|); precision is lowered only when
``dtype`` asks for it, and then the record gives the agreement with fp32 (relative difference, top-1 agreement on
the example batch). bf16 is refused where the CPU has no bf16 hardware, or where it measures slower than fp32 (the
message gives the ratio).

The choice is cached per CPU model, torch version, threads, model, input shape and dtype (``deploy.json`` under
``VISIONZOO_CACHE``, default ``~/.cache/visionzoo``): the next call builds only the chosen backend and checks it
again, without timing. ``cache=False`` measures afresh.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from visionzoo.errors import ArgumentError, BackendUnavailable, VisionZooError
from visionzoo.runtime import backends as B
from visionzoo.runtime.cache import JsonCache, key
from visionzoo.runtime.cpu import cpu_info

__all__ = ["Candidate", "DeployRecord", "Deployed", "deploy"]

TOLERANCE = B.TOLERANCE  # relative: max |diff| / max |eager fp32|


@dataclass
class Candidate:
    """One backend tried by ``deploy``: its status, agreement with eager fp32 and speed on the example input."""

    backend: str
    dtype: str
    status: str  # ok | chosen | rejected (tolerance) | failed (build or run) | unavailable | baseline
    reason: str = ""
    detail: str = ""
    build_s: float | None = None
    ms: float | None = None  # median ms per call on the example input
    img_s: float | None = None
    rel_diff: float | None = None  # max |out - eager fp32| / max |eager fp32|
    top1_agreement: float | None = None  # fraction of the example batch whose argmax matches eager fp32


@dataclass
class DeployRecord:
    """What ``deploy`` chose and why, with every candidate's timing: enough to reproduce or question it."""

    backend: str
    dtype: str
    why: str
    model: str
    input_shape: list[int]
    tolerance: float
    rel_diff: float | None
    top1_agreement: float | None
    speedup_vs_eager: float | None  # chosen img/s over eager fp32 img/s, both measured in this call
    candidates: list[Candidate] = field(default_factory=list)
    cpu: str = ""
    cpu_flags: list[str] = field(default_factory=list)
    threads: int = 1
    torch: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    kernels: dict[str, Any] = field(default_factory=dict)  # eager_tuned's kernel per op, measured on this CPU
    cached: bool = False
    time: str = ""

    def summary(self) -> str:
        lines = [f"deploy {self.model} {tuple(self.input_shape)} on {self.cpu} ({self.threads} thread(s), torch "
                 f"{self.torch}): {self.backend} {self.dtype}" + (" (cached choice)" if self.cached else ""),
                 f"  why: {self.why}"]
        for c in self.candidates:
            speed = f"{c.img_s:8.1f} img/s {c.ms:9.2f} ms" if c.img_s else " " * 27
            agree = "" if c.rel_diff is None else f"  rel diff {c.rel_diff:.1e}"
            if c.top1_agreement is not None and c.dtype != "fp32":
                agree += f", top-1 agreement {100 * c.top1_agreement:.0f}%"
            tail = c.reason or c.detail
            lines.append(f"  {c.backend:12s} {c.dtype:5s} {c.status:11s} {speed}{agree}  {tail}")
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeployRecord:
        d = dict(d)
        d["candidates"] = [Candidate(**c) for c in d.get("candidates", [])]
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


class Deployed:
    """The deployed model: call it like the model (``fast(x)``); ``record`` says what runs and why."""

    def __init__(self, run: Callable[[Tensor], Tensor], record: DeployRecord, module: nn.Module | None) -> None:
        self._run = run
        self.record = record
        self.module = module  # the torch module behind a torch backend, None for onnxruntime/openvino

    def __call__(self, x: Tensor) -> Tensor:
        return self._run(x)

    def __repr__(self) -> str:
        return f"Deployed({self.record.model}, backend={self.record.backend!r}, dtype={self.record.dtype!r})"


# --- helpers -----------------------------------------------------------------------------------------------
def model_key(model: nn.Module) -> str:
    """The model's identity for the cache: variant name and args when it has them, plus its parameter shapes
    (so a fused model, another head or another width is another entry; the weights' values are not)."""
    variant = getattr(model, "variant", None)
    shapes = [(n, list(p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    digest = hashlib.sha1(json.dumps([type(model).__qualname__, shapes]).encode()).hexdigest()[:12]
    name = variant[0] if variant else type(model).__name__
    return f"{name}:{digest}"


def time_interleaved(fns: dict[str, Callable[[], object]], budget: float, min_rounds: int = 3,
                     max_rounds: int = 50, block: int = 2, gap: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each function, timed in turn in blocks of ``block`` calls (A A, B B, C C, A A, ...)
    for about ``budget`` seconds in all, after one warm-up call each.

    Each block starts after ``gap`` seconds idle and its first call is not counted: runtimes keep their worker
    threads spinning for a while after a call (OpenMP for torch, onnxruntime's and OpenVINO's own pools), so the
    first call after another runtime's competes with that runtime's spinning threads for the cores and wakes its own
    pool. Counting it would charge one runtime for another's threads."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    t_end = time.perf_counter() + budget
    for i in range(max_rounds):
        for k, fn in fns.items():
            time.sleep(gap)
            for j in range(max(block, 2)):
                t0 = time.perf_counter()
                fn()
                if j:
                    times[k].append(time.perf_counter() - t0)
        if i + 1 >= min_rounds and time.perf_counter() > t_end:
            break
    return {k: sorted(v)[(len(v) - 1) // 2] for k, v in times.items()}


def _check_args(model: nn.Module, x: Tensor, backend: str, dtype: str, candidates: tuple[str, ...] | None) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"deploy: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"deploy: example_input must be a torch.Tensor (a batch as the model takes it), got "
                        f"{type(x).__name__}")
    if x.device.type != "cpu":
        raise ArgumentError(f"deploy: example_input is on {x.device}; this path chooses among CPU backends, so pass "
                         f"a CPU tensor")
    if x.dtype != torch.float32:
        raise ArgumentError(f"deploy: example_input must be float32 (the reference precision), got {x.dtype}; "
                         f"ask for lower precision with dtype='bf16' or 'int8'")
    if dtype not in B.DTYPES:
        raise ArgumentError(f"deploy: dtype must be one of {B.DTYPES}, got {dtype!r}")
    for b in ([backend] if backend != "auto" else []) + list(candidates or ()):
        if b not in B.BACKENDS:
            close = difflib.get_close_matches(str(b), B.BACKENDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ArgumentError(f"deploy: backend must be 'auto' or one of {B.BACKENDS}, got {b!r}{hint}")


# --- deploy ------------------------------------------------------------------------------------------------
def deploy(model: nn.Module, example_input: Tensor, backend: str = "auto", dtype: str = "fp32", *,
           tol: float | None = None, budget: float = 2.0, candidates: tuple[str, ...] | None = None,
           allow_slower: bool = False, cache: bool = True, cache_dir: str | None = None) -> Deployed:
    """Run ``model`` on the fastest backend of this machine (or on ``backend``), checked against eager fp32.

    ``model`` is put in eval mode and otherwise left alone: backends that fuse, pack or compile work on a copy.

    Args:
        example_input: a batch as the model takes it (float32, CPU); its shape is the one timed and cached.
        backend: ``"auto"`` or one of ``visionzoo.runtime.backends.BACKENDS``.
        dtype: ``"fp32"`` (default; never lowered), ``"bf16"`` or ``"int8"``.
        tol: the largest relative difference to eager fp32 a candidate may have (default 1e-4 for fp32, 0.1
            for bf16, 0.25 for int8); ``max |out - eager| / max |eager|`` on the example input.
        budget: seconds of interleaved timing for all candidates together (0 skips timing: the first candidate
            that agrees is kept).
        candidates: the backends ``auto`` tries (default: all).
        allow_slower: keep bf16 even where it measures slower than fp32 (refused by default).
    """
    _check_args(model, example_input, backend, dtype, candidates)
    model.eval()
    x = example_input.detach()
    tol = TOLERANCE[dtype] if tol is None else float(tol)
    name, flags = cpu_info()
    pool = tuple(candidates or B.BACKENDS) if backend == "auto" else (backend,)
    store = JsonCache("deploy.json", cache_dir)
    ck = key(cpu=name, torch=torch.__version__, threads=torch.get_num_threads(), model=model_key(model),
             shape=list(x.shape), dtype=dtype, backend=backend, pool=sorted(pool), tol=tol)
    shared = B.Shared(model, x, cache_dir)
    try:
        with torch.inference_mode():
            ref = model(x).float()
        if cache and backend == "auto":
            hit = store.get(ck)
            if hit:
                with contextlib.suppress(BackendUnavailable, VisionZooError, RuntimeError):
                    return _from_cache(DeployRecord.from_dict(hit), shared, ref, tol)
        deployed = _choose(model, x, ref, pool, dtype, tol, budget, allow_slower, shared, backend)
        if cache and backend == "auto":
            store.put(ck, asdict(deployed.record))
        return deployed
    finally:
        shared.close()


def _from_cache(rec: DeployRecord, shared: B.Shared, ref: Tensor, tol: float) -> Deployed:
    built = B.build(rec.backend, rec.dtype, shared)
    rel, top1 = B.agreement(built.run(shared.x), ref)
    if not rel <= tol:
        raise VisionZooError(f"cached backend {rec.backend} now differs by {rel:.1e}")
    rec.cached, rec.rel_diff, rec.top1_agreement = True, rel, top1
    return Deployed(built.run, rec, built.module)


def _choose(model: nn.Module, x: Tensor, ref: Tensor, pool: tuple[str, ...], dtype: str, tol: float, budget: float,
            allow_slower: bool, shared: B.Shared, requested: str) -> Deployed:
    name, flags = cpu_info()
    if dtype == "bf16" and not B.has_bf16():  # the user asked for bf16: say why not, whatever the backend
        raise BackendUnavailable(f"deploy: {B.unavailable('eager', 'bf16')}")
    cands: list[Candidate] = []
    built: dict[str, B.Built] = {}
    for b in pool:
        why = B.unavailable(b, dtype)
        if why:
            if requested != "auto":
                raise BackendUnavailable(f"deploy: backend {b!r} cannot run {dtype} here: {why}")
            cands.append(Candidate(b, dtype, "unavailable", reason=why))
            continue
        try:
            got = B.build(b, dtype, shared)
            rel, top1 = B.agreement(got.run(x), ref)
        except Exception as e:  # noqa: BLE001  (a backend that fails is skipped, with its reason)
            if requested != "auto":
                raise
            msg = str(e).strip().splitlines()
            cands.append(Candidate(b, dtype, "failed", reason=f"{type(e).__name__}: {msg[0] if msg else ''}"[:240]))
            continue
        c = Candidate(b, dtype, "ok", detail=got.detail, build_s=got.build_s, rel_diff=rel, top1_agreement=top1)
        if not rel <= tol:
            c.status = "rejected"
            c.reason = f"relative difference {rel:.1e} to eager fp32 is over the tolerance {tol:.0e}"
            if requested != "auto":
                raise VisionZooError(f"deploy: backend {b!r} ({dtype}) differs from eager fp32 by {rel:.1e} "
                                     f"(relative), over tol={tol:.0e}; pass a larger tol to accept it")
        else:
            built[b] = got
        cands.append(c)
    if not built:
        raise BackendUnavailable("deploy: no backend could run this model here:\n" + "\n".join(
            f"  {c.backend} ({c.dtype}): {c.status}: {c.reason}" for c in cands))
    # eager fp32 is always timed: the baseline of the speed-up, and of bf16's refusal
    fns = {(b, dtype): (lambda r=g.run: r(x)) for b, g in built.items()}
    base_run = B.build("eager", "fp32", shared).run
    baselines = [("eager", "fp32")]
    if dtype != "fp32" and not B.unavailable("eager_tuned", "fp32"):
        with contextlib.suppress(Exception):
            tuned = B.build("eager_tuned", "fp32", shared).run
            fns[("eager_tuned", "fp32")] = lambda: tuned(x)
            baselines.append(("eager_tuned", "fp32"))
    fns.setdefault(("eager", "fp32"), lambda: base_run(x))
    secs = time_interleaved(fns, budget) if budget > 0 else {}
    for c in cands:
        s = secs.get((c.backend, c.dtype))
        if s:
            c.ms, c.img_s = round(1e3 * s, 3), round(x.shape[0] / s, 2)
    for b, dt in baselines:
        if (b, dt) in secs and (b, dt) not in [(c.backend, c.dtype) for c in cands]:
            cands.append(Candidate(b, dt, "baseline", detail="fp32 reference for the speed-up",
                                   ms=round(1e3 * secs[(b, dt)], 3), img_s=round(x.shape[0] / secs[(b, dt)], 2)))
    ok = [c for c in cands if c.backend in built and c.dtype == dtype]
    best = min(ok, key=lambda c: c.ms) if secs else ok[0]
    best.status = "chosen"
    eager_s = secs.get(("eager", "fp32"))
    speedup = round(eager_s / secs[(best.backend, dtype)], 3) if secs else None
    if dtype == "bf16" and secs and not allow_slower:
        fp32_best = min((secs[k], k[0]) for k in baselines if k in secs)
        ratio = fp32_best[0] / secs[(best.backend, dtype)]
        if ratio < 1.0:
            raise BackendUnavailable(
                f"deploy: bf16 refused: on {name} its fastest backend ({best.backend}, {best.img_s:.1f} img/s) "
                f"measured {ratio:.2f}x fp32 {fp32_best[1]} ({x.shape[0] / fp32_best[0]:.1f} img/s), i.e. slower; "
                f"use dtype='fp32' (or allow_slower=True to keep bf16)")
    why = _why(best, ok, requested, tol, speedup)
    rec = DeployRecord(backend=best.backend, dtype=dtype, why=why, model=model_key(model), input_shape=list(x.shape),
                       tolerance=tol, rel_diff=best.rel_diff, top1_agreement=best.top1_agreement,
                       speedup_vs_eager=speedup, candidates=cands, cpu=name, cpu_flags=flags,
                       threads=torch.get_num_threads(), torch=torch.__version__, versions=B.versions(),
                       kernels=_kernel_stamp(dtype, shared), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    chosen = built[best.backend]
    return Deployed(chosen.run, rec, chosen.module)


def _kernel_stamp(dtype: str, shared: B.Shared) -> dict[str, Any]:
    """The kernel per op that eager_tuned used in this call (or would use), and where the choice came from."""
    from visionzoo.runtime.kernels import OPS, kernel_choice

    dt = "bf16" if dtype == "bf16" else "fp32"
    out = {}
    for op in OPS:
        with contextlib.suppress(Exception):
            k = shared.kernels.get(dt, {}).get(op) or kernel_choice(op, dt, cache_dir=shared.cache_dir)
            out[op] = dict(kernel=k.kernel, speedup=k.speedup, dtype=k.dtype, source=k.source)
    if dt in shared.attention:
        a = shared.attention[dt]
        out["attention"] = dict(matmul_cores=a.explicit, sdpa_cores=a.fused, cases=a.cases, source="measured")
    return out


def _why(best: Candidate, ok: list[Candidate], requested: str, tol: float, speedup: float | None) -> str:
    agree = "" if best.rel_diff is None else f"; relative difference to eager fp32 {best.rel_diff:.1e} (tol {tol:.0e})"
    if requested != "auto":
        return f"backend {requested!r} was asked for" + agree
    if best.ms is None:
        return f"the first candidate that agreed (timing skipped: budget=0){agree}"
    others = sorted((c for c in ok if c is not best and c.ms), key=lambda c: c.ms)
    runner = f", {others[0].ms / best.ms:.2f}x the next ({others[0].backend})" if others else ""
    return (f"fastest of {len(ok)} candidate(s) that agree with eager fp32: {best.img_s:.1f} img/s"
            f"{runner}, {speedup:.2f}x eager{agree}")
