"""Every ``*_test`` variant traces and exports: torch.export (static and dynamic batch), FX, compile with
fullgraph, and ONNX (static and dynamic batch) run by onnxruntime; each checked against eager to 1e-4.

The paths run once per model in two worker processes (``visionzoo.export.matrix.run_many``, the code behind
docs/export.md), and each (model, path) pair is one test. Compile uses dynamo's eager backend here (one graph,
fullgraph); inductor runs under ``-m slow``.
"""
from __future__ import annotations

import pytest

from conftest import TEST_MODELS
from visionzoo.export.matrix import PATHS, run_many, run_paths

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def matrix(request):
    wanted = sorted({item.callspec.params["name"] for item in request.session.items
                     if item.module is request.module and hasattr(item, "callspec")})
    return run_many(wanted, workers=2, compile_backend="eager", optimize=False)  # the optimiser: docs/export.md


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", TEST_MODELS)
def test_path(name, path, matrix):
    row = matrix[name]
    assert path not in row.errors, f"{name}: {path}: {row.errors[path]}"
    assert row.diffs[path] <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", TEST_MODELS)
def test_paths_with_inductor(name):
    row = run_paths(name, compile_backend="inductor")
    assert row.ok, row.errors
