"""Every ``*_test`` variant traces and exports: FX, torch.export (static and dynamic batch), compile with
fullgraph, and ONNX (static and dynamic batch) run by onnxruntime; each checked against eager."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import TEST_MODELS, make_input, randomize_bn

pytestmark = pytest.mark.parametrize("name", TEST_MODELS)
ATOL = 1e-4


def _model(tiny_model, name):
    model = tiny_model(name)
    randomize_bn(model)
    return model


def test_fx_symbolic_trace(name, tiny_model):
    model = _model(tiny_model, name)
    x = make_input(model)
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=ATOL, rtol=1e-4)


def test_compile_fullgraph(name, tiny_model):
    model = _model(tiny_model, name)
    x = make_input(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic_batch"])
def test_export_and_onnx(name, dynamic, tiny_model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _model(tiny_model, name)
    x = make_input(model)
    shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
    ep = torch.export.export(model, (x,), dynamic_shapes=shapes)
    runs = [x, make_input(model, batch=3, seed=1)] if dynamic else [x]
    with torch.no_grad():
        refs = [model(t) for t in runs]
        for t, ref in zip(runs, refs):
            torch.testing.assert_close(ep.module()(t), ref, atol=ATOL, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onx = torch.onnx.export(ep, dynamo=True, optimize=False, verbose=False)
    path = tmp_path / f"{name}.onnx"
    onx.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for t, ref in zip(runs, refs):
        (out,) = sess.run(None, {sess.get_inputs()[0].name: t.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), ref, atol=ATOL, rtol=1e-4)
