"""Every ``*_test`` variant traces and exports: torch.export with a dynamic batch, FX, compile with fullgraph, and
ONNX with a dynamic batch run by onnxruntime; each checked against eager to 1e-4, the dynamic ones at batch 2 and 3
(batch 2 is the static case). The static exports (a separate specialisation of the same graph) run in
docs/export.md (``scripts/make_export_doc.py``, every path) and under ``-m slow``.

The paths run once per model (``visionzoo.export.matrix.run_paths``, the code behind docs/export.md), and each
(model, path) pair is one test. Under pytest-xdist (the default ``-n 2``) every path of a model runs on one worker
(``xdist_group``), which computes the model's row once; without it, two spawned processes compute all rows
(``run_many``). Compile uses dynamo's eager backend here (one graph, fullgraph); inductor runs under ``-m slow``.
"""
from __future__ import annotations

import os

import pytest

from conftest import TEST_MODELS
from visionzoo.export.matrix import DYNAMIC_PATHS, run_many, run_paths

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


# the ONNX optimiser, inductor and the static exports: docs/export.md and -m slow
OPTIONS = dict(compile_backend="eager", optimize=False, paths=DYNAMIC_PATHS)
GROUPED = [pytest.param(n, marks=pytest.mark.xdist_group(n)) for n in TEST_MODELS]


class _RowPerModel(dict):
    """{name: row}, each row computed on first use in this process."""

    def __missing__(self, name: str):
        self[name] = run_paths(name, **OPTIONS)
        return self[name]


@pytest.fixture(scope="module")
def matrix(request):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return _RowPerModel()
    wanted = sorted({item.callspec.params["name"] for item in request.session.items
                     if item.module is request.module and hasattr(item, "callspec")})
    return run_many(wanted, workers=2, **OPTIONS)


@pytest.mark.parametrize("path", DYNAMIC_PATHS)
@pytest.mark.parametrize("name", GROUPED)
def test_path(name, path, matrix):
    row = matrix[name]
    assert path not in row.errors, f"{name}: {path}: {row.errors[path]}"
    assert row.diffs[path] <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", TEST_MODELS)
def test_paths_with_inductor(name):
    row = run_paths(name, compile_backend="inductor")
    assert row.ok, row.errors
