"""``visionzoo export`` and ``visionzoo.export``: files written and checked, clear errors, the generated table."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import visionzoo
from visionzoo.cli import main
from visionzoo.errors import ExportError
from visionzoo.export.verify import explain_failure

DOC = Path(__file__).parents[2] / "docs" / "export.md"


def test_cli_exports_onnx_with_a_dynamic_batch(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    assert main(["export", "convnext_test", "--out", str(out), "--time", "0.05"]) == 0
    text = capsys.readouterr().out
    assert out.exists() and "max |diff| vs eager" in text and "batches [2, 3]" in text and "img/s" in text


def test_pt2_at_a_fixed_batch_reloads_and_matches(tmp_path):
    model = visionzoo.create_model("convnext_test", num_classes=4)
    report = visionzoo.export.pt2(model, tmp_path / "m.pt2", batch=3, time_budget=0)
    assert report.checked_batches == (3,) and report.max_abs_diff < 1e-5
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_bad_batch_and_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "convnext_test", "--batch", "lots", "--out", str(tmp_path / "m.onnx")])
    assert "must be 'dynamic' or a positive integer" in capsys.readouterr().err
    rc = main(["export", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "m.onnx")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # a branch on the data: torch.export cannot trace it


def test_failure_names_the_model_and_the_op(tmp_path):
    with pytest.raises(ExportError, match=r"_DataDependent .*cannot be exported to torch.export"):
        visionzoo.export.pt2(_DataDependent(), tmp_path / "m.pt2", img_size=8, time_budget=0)
    err = explain_failure(RuntimeError("Unsupported FX nodes: {'call_function': ['aten.fft_r2c.default']}"),
                          "hornet_tiny_gf", "hornet", "ONNX")
    assert "hornet_tiny_gf (family hornet)" in str(err) and "aten.fft_r2c.default" in str(err)


def test_export_doc_lists_every_family_all_green():
    text = DOC.read_text()
    for fam in visionzoo.list_families():
        test_name = next(n for n in fam.variants if n.endswith("_test"))
        rows = [ln for ln in text.splitlines() if f"`{test_name}`" in ln]
        assert rows, f"docs/export.md has no row for {test_name}; run python scripts/make_export_doc.py"
        assert "✗" not in rows[0], f"docs/export.md: {rows[0]}"
