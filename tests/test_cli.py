"""The command line: list, info, convert; and docs/models.md kept in step with the registry."""
from __future__ import annotations

from pathlib import Path

import torch

import visionzoo
from visionzoo.cli import main
from visionzoo.docs import models_markdown

DOCS = Path(__file__).parents[1] / "docs" / "models.md"


def test_list_and_pattern(capsys):
    assert main(["list", "convnext_t*"]) == 0
    out = capsys.readouterr().out
    assert "convnext_tiny" in out and "resnet50" not in out
    assert main(["list", "nothing_like_this*"]) == 1


def test_info_prints_ours_official_paper(capsys):
    assert main(["info", "convnext_tiny"]) == 0
    out = capsys.readouterr().out
    assert "28.589" in out and "ours vs official vs paper" in out and "stages.3" in out


def test_info_unknown_model_is_a_clear_error(capsys):
    assert main(["info", "convnext_tinny"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_convert(tmp_path, capsys):
    torch.manual_seed(0)
    m = visionzoo.create_model("resnet_test", num_classes=4).eval()
    torch.save({"state_dict": m.state_dict()}, tmp_path / "a.pth")
    assert main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "b.safetensors"), "--model", "resnet_test"]) == 0
    again = visionzoo.load_model(tmp_path / "b.safetensors").eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(again(x), m(x))


def test_docs_table_is_generated():
    assert DOCS.read_text() == models_markdown() + "\n", (
        "docs/models.md is stale: run `visionzoo list --markdown > docs/models.md`")
    for name in visionzoo.list_models(exclude_test=True):
        assert f"| {name} |" in models_markdown()
