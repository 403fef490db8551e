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


MAX_WIDTH = 120  # terminal columns the table may take
CONTENDED = "*"
# columns left out first when the table would be wider than MAX_WIDTH (all of them are in the CSV and JSON)
_DROP_ORDER = ("ms/step", "min-max", "kind", "p50/p90/p99 ms", "CPU", "compile s", "train MB", "peak MB", "GMACs")


def _cells(r: BenchResult, cols: list[str], contended_rows: bool) -> list[str]:
    """One row's cells for ``cols``; a contended row's img/s carries the ``*`` marker."""
    if r.status == "error":
        out = {"model": r.model, "kind": r.kind or "-", "batch": _fmt(r.infer_batch_size),
               "img/s": "[red]error[/red]"}
        return [out.get(c, "-") for c in cols]
    mark = CONTENDED if r.status == "contended" else (" " if contended_rows else "")
    lat = "-" if r.infer_latency_p50 is None else (
        f"{r.infer_latency_p50:.1f}/{r.infer_latency_p90:.1f}/{r.infer_latency_p99:.1f}")
    rng = "-" if r.infer_samples_per_sec_min is None else (
        f"{r.infer_samples_per_sec_min:.1f}-{r.infer_samples_per_sec_max:.1f}")
    timm = _fmt(r.timm_infer_samples_per_sec) if r.timm_infer_samples_per_sec is not None else (
        "n/a" if r.timm_note else "-")
    out = {"model": r.model, "kind": r.kind, "params M": _fmt(r.param_count, 2), "GMACs": _fmt(r.infer_gmacs, 2),
           "img": _fmt(r.infer_img_size), "batch": _fmt(r.infer_batch_size or r.train_batch_size),
           "img/s": _fmt(r.infer_samples_per_sec) + mark, "min-max": rng, "ms/step": _fmt(r.infer_step_time, 1),
           "p50/p90/p99 ms": lat, "peak MB": _fmt(r.infer_peak_mem_mb, 0), "MFU": _fmt(r.infer_mfu, 2),
           "compile s": _fmt(r.infer_compile_time, 1), "train img/s": _fmt(r.train_samples_per_sec),
           "train MB": _fmt(r.train_peak_mem_mb, 0), "timm img/s": timm, "ours/timm": _fmt(r.ratio_vs_timm, 2),
           "CPU": _fmt(r.infer_cpu_util if r.infer_cpu_util is not None else r.train_cpu_util, 2),
           "backend": (r.backend or "-") + (
               f" (timm {r.timm_backend})" if r.timm_backend and r.timm_backend != r.backend else "")}
    return [out[c] for c in cols]


def _width(t) -> int:  # noqa: ANN001
    from rich.console import Console

    con = Console(width=1000, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    con.print(t)
    return max((len(line.rstrip()) for line in con.export_text().splitlines()), default=0)


def table(results: list[BenchResult], title: str = "visionzoo bench", max_width: int = MAX_WIDTH):  # noqa: ANN201
    """A rich table within ``max_width`` columns: one line per model and batch size.

    Contended runs carry a ``*`` after their img/s and one footnote (the table's caption) says what it means;
    errors say ``error`` (the reason is printed below the table). Columns that do not fit are left out, least
    important first, and the footnote names them (every column is in the CSV and JSON).
    """
    from rich import box
    from rich.table import Table

    rows = list(results)
    ok = [r for r in rows if r.status != "error"]
    sizes = {r.infer_img_size for r in ok}
    has_backend = len({r.backend for r in ok}) > 1 or any(r.backend == "auto" or r.timm_backend for r in rows)
    cols = ["model", "kind"] + ["backend"] * has_backend  # one backend for all rows: the summary line says which
    cols += ["params M", "GMACs"] + ["img"] * (len(sizes) > 1) + ["batch", "img/s", "min-max",
                                                                                     "ms/step", "p50/p90/p99 ms"]
    cols += ["peak MB"] * any(r.infer_peak_mem_mb is not None for r in rows)
    cols += ["MFU"] * any(r.infer_mfu is not None for r in rows)
    cols += ["compile s"] * any(r.infer_compile_time is not None for r in rows)
    cols += ["train img/s", "train MB"] * any(r.train_samples_per_sec is not None for r in rows)
    cols += ["timm img/s", "ours/timm"] * any(r.timm_infer_samples_per_sec is not None or r.timm_note for r in rows)
    cols += ["CPU"]
    if len(sizes) == 1 and None not in sizes:
        title = f"{title} ({next(iter(sizes))} px)"
    contended = sum(r.status == "contended" for r in rows)
    dropped: list[str] = []

    def build() -> Table:
        notes = []
        if contended:
            notes.append(f"{CONTENDED} contended: other processes took the cores; not the model's speed")
        if dropped:
            notes.append(f"left out to fit {max_width} columns: {', '.join(dropped)} (in the CSV)")
        t = Table(title=title, caption="; ".join(notes) or None, caption_justify="left", box=box.SIMPLE_HEAD,
                  padding=(0, 1), pad_edge=False, collapse_padding=True)
        for c in cols:
            t.add_column(c, no_wrap=True, justify="left" if c in ("model", "kind") else "right")
        for r in rows:
            t.add_row(*_cells(r, cols, bool(contended)))
        return t

    t = build()
    for c in _DROP_ORDER:
        if _width(t) <= max_width:
            break
        if c in cols:
            cols.remove(c)
            dropped.append(c)
            t = build()
    return t


BACKEND_NOTES = {
    "eager": "torch eager, the model as given",
    "eager_tuned": "torch eager after fuse(), every Linear/Conv2d and attention on the kernel measured fastest on this "
                   "CPU",
    "inductor": "torch.compile with freezing",
    "torchscript": "TorchScript trace + freeze with oneDNN Graph fusion, checked per input shape",
    "onnxruntime": "onnxruntime CPU on the exported ONNX",
    "openvino": "OpenVINO CPU on the exported ONNX",
}


def backend_lines(results: list[BenchResult]) -> list[str]:
    """Which backend ran the inference rows: one for all (the fair comparison) or, with auto, one per row."""
    cfg = getattr(results, "config", {}) or {}
    rows = [r for r in results if r.status != "error" and r.infer_samples_per_sec is not None]
    used = sorted({r.backend for r in rows if r.backend})
    asked = cfg.get("backend")
    if not used:
        return []
    dtype = ", ".join(sorted({r.dtype for r in rows})) or "fp32"
    if asked == "auto":
        return [f"backend auto (visionzoo.deploy's measured choice per model and batch size; {dtype}): "
                + ", ".join(f"{b} x{sum(r.backend == b for r in rows)}" for b in used)
                + ". Rows on different backends compare deployments, not architectures"]
    if len(used) == 1:
        b = used[0]
        detail = next((r.backend_detail for r in rows if r.backend_detail), "")
        kernel = f" ({detail.split('; ', 1)[-1]})" if b == "eager_tuned" and detail else ""
        return [f"every architecture on one backend: {b}, {dtype} ({BACKEND_NOTES.get(b, b)}){kernel}"]
    return [f"backends: {', '.join(used)}"]


def summary_lines(results: BenchResults) -> list[str]:
    """Error lines, the environment stamp and the roofline, for the terminal."""
    env = results.environment
    out = [f"error: {r.model}: {r.error}" for r in results if r.status == "error"]
    out += [f"torch {env.get('torch')} on {env.get('gpu') or env.get('cpu')} ({env.get('device')}), "
           f"{env.get('threads')} thread(s) of {env.get('cpus_usable')} usable CPUs, "
           f"OMP_WAIT_POLICY={env.get('omp_wait_policy')}, malloc {env.get('malloc_policy')}, "
           f"flags {' '.join(env.get('cpu_flags') or []) or '-'}"]
    out += backend_lines(results)
    roof = results.roofline
    if roof:
        if "error" in roof:
            out.append(f"roofline: {roof['error']}")
        else:
            kernels = roof.get("kernels") or {}
            per_kernel = ", ".join(f"{k} {v:.0f}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]))
            best = "; MFU against the best kernel of each dtype" + (
                f" (fp32: {roof['fp32_best_kernel']})" if roof.get("fp32_best_kernel") else "")
            out.append(f"roofline: matmul peak fp32 {_fmt(roof.get('fp32_gflops'))} GFLOP/s, bf16 "
                       f"{_fmt(roof.get('bf16_gflops'))} GFLOP/s (torch's default kernel)"
                       + (f"; per kernel GFLOP/s: {per_kernel}{best}" if kernels else "")
                       + f"; memory {_fmt(roof.get('mem_gbs'))} GB/s"
                       + (f" (CONTENDED: other processes used {roof['other_cores']:.2f} cores meanwhile, so the "
                          "peak is low and MFU high)" if (roof.get("other_cores") or 0) > 0.25 else ""))
    n_err = sum(r.status == "error" for r in results)
    n_cont = sum(r.status == "contended" for r in results)
    rows = "1 row" if len(results) == 1 else f"{len(results)} rows"
    out.append(f"{rows}, {n_err} error(s), {n_cont} contended, {results.wall_s:.1f} s"
               + (" (interrupted: the rows measured so far are kept)" if results.interrupted else ""))
    return out
