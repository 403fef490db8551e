"""Every trace and export path on a set of models, for ``docs/export.md`` (``scripts/make_export_doc.py``)."""
from __future__ import annotations

import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import torch

PATHS = ("torch.export", "torch.export dynamic batch", "fx.symbolic_trace", "compile fullgraph", "ONNX",
         "ONNX dynamic batch")
# the test suite's set: each dynamic-batch path is checked at batch 2 (the static case) and 3; the static exports
# run in docs/export.md and under -m slow
DYNAMIC_PATHS = ("torch.export dynamic batch", "fx.symbolic_trace", "compile fullgraph", "ONNX dynamic batch")


@dataclass
class MatrixRow:
    """One model's result per path: the max |diff| against eager, or the error's first line."""

    model: str
    family: str
    diffs: dict[str, float] = field(default_factory=dict)
    paths: tuple[str, ...] = PATHS
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors and len(self.diffs) == len(self.paths)


def _check(fn, x, ref) -> float:  # noqa: ANN001
    with torch.no_grad():
        return (fn(x) - ref).abs().max().item()


def run_paths(name: str, tol: float = 1e-4, compile_backend: str = "inductor", optimize: bool = True,
              paths: tuple[str, ...] = PATHS) -> MatrixRow:
    """Build ``name`` (random weights, BatchNorm statistics randomised, eval), run each of ``paths`` (``PATHS`` by
    default) and check it against eager. ``compile_backend="eager"`` checks only that dynamo captures one graph
    (fast). The ONNX dynamic-batch export converts the dynamic ``torch.export`` program (not exported twice)."""
    import visionzoo
    from visionzoo.export.onnx import onnx
    from visionzoo.export.pt2 import export_program
    from visionzoo.export.verify import example_inputs

    t0 = time.perf_counter()
    row = MatrixRow(name, visionzoo.get_variant(name).family, paths=tuple(paths))
    try:
        torch.manual_seed(0)
        model = visionzoo.create_model(name).eval()
        _randomize_norm_stats(model)
        x2, x3 = example_inputs(model, None, (2, 3))
        with torch.no_grad():
            ref2 = model(x2)
    except Exception as e:  # noqa: BLE001  (a model that does not even run fails every path)
        row.errors = {p: f"eager: {type(e).__name__}: {str(e).splitlines()[0][:140]}" for p in paths}
        return row

    def attempt(path: str, fn) -> None:  # noqa: ANN001
        try:
            d = fn()
            if d > tol:
                row.errors[path] = f"max |diff| {d:.1e} > {tol:.0e}"
            row.diffs[path] = d
        except Exception as e:  # noqa: BLE001
            lines = [ln for ln in traceback.format_exception_only(type(e), e)[-1].splitlines() if ln.strip()]
            row.errors[path] = lines[0][:160] if lines else type(e).__name__

    def export_static() -> float:
        return _check(torch.export.export(model, (x2,)).module(), x2, ref2)

    programs: dict[str, tuple] = {}

    def export_dynamic() -> float:
        programs["dynamic"] = export_program(model, None, "dynamic")
        ep, inputs = programs["dynamic"]
        with torch.no_grad():
            return max(_check(ep.module(), x, model(x)) for x in inputs)

    def fx() -> float:
        return _check(torch.fx.symbolic_trace(model), x2, ref2)

    def compiled() -> float:
        torch._dynamo.reset()
        return _check(torch.compile(model, fullgraph=True, backend=compile_backend), x2, ref2)

    with tempfile.TemporaryDirectory() as tmp:
        def onnx_path(batch):  # noqa: ANN001, ANN202
            def go() -> float:
                path = os.path.join(tmp, "m.onnx")
                return onnx(model, path, batch=batch, optimize=optimize, time_budget=0,
                            program=programs.get(batch) if batch == "dynamic" else None).max_abs_diff
            return go

        for path, fn in zip(PATHS, (export_static, export_dynamic, fx, compiled, onnx_path(2),
                                    onnx_path("dynamic"))):
            if path in paths:
                attempt(path, fn)
    row.seconds = time.perf_counter() - t0
    return row


def _randomize_norm_stats(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics, so that a path that mishandles them cannot match eager by chance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def run_many(names: list[str], workers: int = 2, **kwargs) -> dict[str, MatrixRow]:  # noqa: ANN003
    """``run_paths`` for each name, in ``workers`` fresh processes (each one thread), as {name: row}."""
    import concurrent.futures as cf
    import multiprocessing as mp

    if workers <= 1 or len(names) <= 1:
        return {n: run_paths(n, **kwargs) for n in names}
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {n: pool.submit(run_paths, n, **kwargs) for n in names}
        return {n: f.result() for n, f in futures.items()}


def markdown(rows: list[MatrixRow], header: str) -> str:
    """The table of ``docs/export.md``: one row per model, a cell per path (ok with the max |diff|, or why not)."""
    out = [header, "", "| family | model | " + " | ".join(PATHS) + " |", "|---|---|" + "---|" * len(PATHS)]
    for r in rows:
        cells = [f"✗ {r.errors[p]}" if p in r.errors else f"✓ {r.diffs[p]:.0e}" for p in PATHS]
        out.append(f"| {r.family} | `{r.model}` | " + " | ".join(cells) + " |")
    n_ok = sum(r.ok for r in rows)
    out += ["", f"{n_ok} of {len(rows)} models pass every path."]
    return "\n".join(out) + "\n"
