"""Bench results as a terminal table (rich), CSV (timm's column names where they overlap) and JSON.

The JSON holds ``{"environment", "config", "roofline", "interrupted", "wall_s", "results"}`` so a number can
always be traced to the machine, the threads and the OpenMP wait policy that produced it.
"""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, fields
from typing import Any

from visionzoo.bench.schema import BenchResult, BenchResults

COLUMNS = [f.name for f in fields(BenchResult)]


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def write_csv(results: list[BenchResult], path: str) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in results:
            w.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    return path


def to_dict(results: list[BenchResult]) -> dict[str, Any]:
    meta = results if isinstance(results, BenchResults) else BenchResults(results)
    return dict(environment=meta.environment, config=meta.config, roofline=meta.roofline,
                interrupted=meta.interrupted, wall_s=round(meta.wall_s, 2), results=[asdict(r) for r in results])


def write_json(results: list[BenchResult], path: str) -> str:
    with open(path, "w") as f:
        json.dump(to_dict(results), f, indent=1)
    return path


def read_json(path: str) -> BenchResults:
    with open(path) as f:
        d = json.load(f)
    out = BenchResults([BenchResult.from_dict(r) for r in d["results"]], d.get("environment"), d.get("config"),
                       d.get("roofline"))
    out.interrupted, out.wall_s = d.get("interrupted", False), d.get("wall_s", 0.0)
    return out


RESULTS_ROOT = "bench-results"


def output_folder(out: str | None = None, root: str = RESULTS_ROOT) -> str:
    """Where a run writes: ``out`` when given, else a new ``root/<YYYYmmdd-HHMMSS>`` folder, so that no run
    overwrites an earlier one."""
    if out is not None:
        return out
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(root, stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(root, f"{stamp}-{n}")
    return path


def update_latest(folder: str, results: list[BenchResult]) -> bool:
    """Point ``<parent>/latest`` at ``folder`` when the run measured at least one model; True if it did.

    A symlink where the file system allows one, else a ``latest`` text file holding the folder name."""
    if not any(r.status != "error" for r in results):
        return False
    parent, name = os.path.split(os.path.abspath(folder))
    link = os.path.join(parent, "latest")
    if os.path.islink(link) or os.path.isfile(link):
        os.remove(link)
    elif os.path.exists(link):
        return False  # a real folder named latest: leave it alone
    try:
        os.symlink(name, link, target_is_directory=True)
    except OSError:
        with open(link, "w") as f:
            f.write(name + "\n")
    return True


def write_all(results: list[BenchResult], out_dir: str = "bench-results", name: str = "bench",
              plots: bool = True) -> dict[str, str]:
    """Write ``<name>.csv``, ``<name>.json`` and (with matplotlib) the two PNG plots; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = dict(csv=write_csv(results, os.path.join(out_dir, f"{name}.csv")),
                 json=write_json(results, os.path.join(out_dir, f"{name}.json")))
    if plots:
        from visionzoo.bench.plots import write_plots

        paths.update(write_plots(results, out_dir, name))
    return paths


def table(results: list[BenchResult], title: str = "visionzoo bench"):  # noqa: ANN201  (rich.table.Table)
    """A rich table: one line per model and batch size; errors and contended runs marked, not hidden."""
    from rich.table import Table

    rows = list(results)
    has_train = any(r.train_samples_per_sec is not None for r in rows)
    has_timm = any(r.timm_infer_samples_per_sec is not None or r.timm_note for r in rows)
    has_mfu = any(r.infer_mfu is not None for r in rows)
    has_mem = any(r.infer_peak_mem_mb is not None for r in rows)
    has_compile = any(r.infer_compile_time is not None for r in rows)
    t = Table(title=title)
    cols = ["model", "kind", "params (M)", "GMACs", "img", "batch", "img/s (min-max)", "ms/step",
            "p50/p90/p99 ms"]
    cols += ["peak MB"] * has_mem + ["MFU"] * has_mfu + ["compile s"] * has_compile
    cols += ["train img/s", "train MB"] * has_train + ["timm img/s", "ours/timm"] * has_timm + ["CPU util", "note"]
    for c in cols:
        t.add_column(c, overflow="fold", justify="left" if c in ("model", "kind", "note") else "right")
    for r in rows:
        if r.status == "error":
            where = f"batch {r.infer_batch_size}" if r.infer_batch_size else "-"
            t.add_row(r.model, r.kind or "-", *["-"] * 3, where, *["-"] * (len(cols) - 7), "[red]error (below)[/red]")
            continue
        bs = r.infer_batch_size or r.train_batch_size
        tput = "-" if r.infer_samples_per_sec is None else (
            f"{r.infer_samples_per_sec:.1f} ({r.infer_samples_per_sec_min:.1f}-{r.infer_samples_per_sec_max:.1f})")
        lat = "-" if r.infer_latency_p50 is None else (
            f"{r.infer_latency_p50:.2f}/{r.infer_latency_p90:.2f}/{r.infer_latency_p99:.2f}")
        cells = [r.model, r.kind, _fmt(r.param_count, 2), _fmt(r.infer_gmacs, 2), _fmt(r.infer_img_size),
                 _fmt(bs), tput, _fmt(r.infer_step_time, 2), lat]
        cells += [_fmt(r.infer_peak_mem_mb, 0)] * has_mem + [_fmt(r.infer_mfu, 2)] * has_mfu
        cells += [_fmt(r.infer_compile_time, 1)] * has_compile
        cells += [_fmt(r.train_samples_per_sec), _fmt(r.train_peak_mem_mb, 0)] * has_train
        if has_timm:
            cells += [_fmt(r.timm_infer_samples_per_sec), _fmt(r.ratio_vs_timm, 2)]
        note = [f"tokens {r.tokens}"] if r.tokens else []
        if r.status == "contended":
            note.append("[yellow]CONTENDED: other processes took the cores; not the model's speed[/yellow]")
        elif r.contended_runs:
            note.append(f"{r.contended_runs} contended run(s) left out")
        if r.timm_note and r.timm_infer_samples_per_sec is None:
            note.append("timm: not measured (reason below)")
        cells += [_fmt(r.infer_cpu_util if r.infer_cpu_util is not None else r.train_cpu_util, 2), "; ".join(note)]
        t.add_row(*cells)
    return t


def summary_lines(results: BenchResults) -> list[str]:
    """Error lines, the environment stamp and the roofline, for the terminal."""
    env = results.environment
    out = [f"error: {r.model}: {r.error}" for r in results if r.status == "error"]
    out += [f"torch {env.get('torch')} on {env.get('gpu') or env.get('cpu')} ({env.get('device')}), "
           f"{env.get('threads')} thread(s) of {env.get('cpus_usable')} usable CPUs, "
           f"OMP_WAIT_POLICY={env.get('omp_wait_policy')}, malloc {env.get('malloc_policy')}, "
           f"flags {' '.join(env.get('cpu_flags') or []) or '-'}"]
    roof = results.roofline
    if roof:
        if "error" in roof:
            out.append(f"roofline: {roof['error']}")
        else:
            out.append(f"roofline: matmul peak fp32 {_fmt(roof.get('fp32_gflops'))} GFLOP/s, bf16 "
                       f"{_fmt(roof.get('bf16_gflops'))} GFLOP/s; memory {_fmt(roof.get('mem_gbs'))} GB/s"
                       + (f" (CONTENDED: other processes used {roof['other_cores']:.2f} cores meanwhile, so the "
                          "peak is low and MFU high)" if (roof.get("other_cores") or 0) > 0.25 else ""))
    n_err = sum(r.status == "error" for r in results)
    n_cont = sum(r.status == "contended" for r in results)
    out.append(f"{len(results)} rows, {n_err} error(s), {n_cont} contended, {results.wall_s:.1f} s"
               + (" (interrupted: the rows measured so far are kept)" if results.interrupted else ""))
    return out
