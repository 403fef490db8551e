"""Speed and memory of registered models: throughput, latency, peak memory, an environment stamp, contention.

``run(patterns, BenchConfig())`` measures each model in a fresh child process by default
(``python -m visionzoo.bench.runner``). The child gives three things an in-process loop cannot: peak memory
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
import difflib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from visionzoo.bench.schema import BenchConfig, BenchResult, BenchResults
from visionzoo.bench.system import MALLOC_KEEP, environment, rss_mb
from visionzoo.bench.timing import measure_model, one_line

# ConvNets, ViTs and hybrids of one size class (about 4-5 GMACs); other families of that class join by GMACs.
DEFAULT_LINEUP = ("resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224", "deit_small_patch16_224")
LINEUP_GMACS = (3.5, 5.7)


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
    known = list_models(include_test=True)
    names, errors = [], []
    for p in patterns:
        if not any(c in p for c in "*?["):
            found = [p] if p in known else []
        else:
            found = [n for n in list_models(p) if "test" in p or not n.endswith("_test")]
        if not found:
            errors.append(BenchResult(model=p, status="error", error=no_match_hint(p, known)))
        names += [n for n in found if n not in names]
    return names, errors


def no_match_hint(pattern: str, known: list[str]) -> str:
    """Why ``pattern`` measured nothing, with the closest registered names and the command that lists models."""
    stem = pattern.strip("*?[]")
    close = difflib.get_close_matches(stem, known, n=4, cutoff=0.5)
    close += [n for n in known if stem and n.startswith(stem.split("_")[0]) and n not in close][:4 - len(close)]
    what = "no registered model matches" if any(c in pattern for c in "*?[") else "unknown model"
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (f"{what} {pattern!r}; {hint}list the registered models with `visionzoo list` "
            f"(or `visionzoo list 'PATTERN*'`)")


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
    """Run ``task`` in ``python -m visionzoo.bench.runner``; the lines it wrote and why it died, if it did."""
    with tempfile.TemporaryDirectory(prefix="visionzoo-bench-") as tmp:
        job, out = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.jsonl")
        with open(job, "w") as f:
            json.dump(dict(task=task, model=model, config=asdict(cfg)), f)
        proc = subprocess.Popen([sys.executable, "-m", "visionzoo.bench.runner", job, out], env=_child_env(cfg),
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
    cfg = copy.deepcopy(config or BenchConfig()).resolved(lineup=not patterns).validate()
    t0 = time.perf_counter()
    names, rows = resolve_models(patterns)
    results = BenchResults(rows, environment(cfg), asdict(cfg))
    if cfg.threads and not cfg.subprocess:
        torch.set_num_threads(cfg.threads)
    try:
        if cfg.roofline:
            try:
                results.roofline = measure_roofline(cfg)
            except Exception as e:  # noqa: BLE001
                results.roofline = dict(error=one_line(e))
        for i, name in enumerate(names):
            if cfg.subprocess:
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
    """MFU of each row against the fastest kernel of its dtype on this machine (int8 rows: none)."""
    from visionzoo.bench.roofline import best_peak

    roof = results.roofline or {}
    for r in results:
        if r.dtype == "int8":
            continue
        _, peak = best_peak(roof, r.dtype if r.dtype in ("fp32", "bf16") else "fp32")
        if peak and r.infer_gflop_per_sec is not None:
            r.infer_mfu = round(r.infer_gflop_per_sec / peak, 4)


def _child_main(job_path: str, out_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    cfg = BenchConfig(**{**job["config"], "batch_sizes": tuple(job["config"]["batch_sizes"]),
                         "candidates": job["config"].get("candidates") and tuple(job["config"]["candidates"])})
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

        baseline = rss_mb() if torch.device(cfg.device).type == "cpu" else None
        measure_model(job["model"], cfg, emit, baseline)
    emit(dict(done=True))
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))
