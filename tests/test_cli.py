"""The command line: list, info, convert; and docs/models.md kept in step with the registry."""
from __future__ import annotations

from pathlib import Path

import pytest
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


# --- the first five minutes (issue 12) ------------------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"visionzoo {visionzoo.__version__}")


def test_list_command_and_list_models_agree():
    from visionzoo.docs import model_rows

    assert [r[0] for r in model_rows("*")] == visionzoo.list_models()
    assert not [n for n in visionzoo.list_models() if n.endswith("_test")]
    assert [r[0] for r in model_rows("*", include_test=True)] == visionzoo.list_models(include_test=True)
    assert [r[0] for r in model_rows("*_test")] == visionzoo.list_models("*_test") != []
    assert "convnext_test" in visionzoo.list_models("convnext_*", include_test=True)
    assert "convnext_test" not in visionzoo.list_models("convnext_*")


def test_weights_command(capsys):
    assert main(["weights", "convnext_t*", "crossformer_t*"]) == 0
    out = capsys.readouterr().out
    assert "convnext_tiny" in out and "fb_in1k" in out and "hf:timm" in out and "apache-2.0" in out
    assert "82.07 @224" in out and "crossformer_tiny" in out and "--none" in out
    assert main(["weights", "hornet_tiny_gf"]) == 0  # one exact name: URL and cache path
    out = capsys.readouterr().out
    assert "https://cloud.tsinghua.edu.cn/f/460e759c82324ea6bfa3/?dl=1" in out and "hornet_tiny_gf.official_in1k" in out
    assert main(["weights", "--none", "rmt_*"]) == 0
    assert "Baidu" in capsys.readouterr().out
    assert main(["weights", "nothing_like_this*"]) == 2


def test_main_prints_library_errors_and_lets_bugs_through(monkeypatch, capsys):
    from visionzoo import cli
    from visionzoo.errors import ArgumentError

    def user_error(args):
        raise ArgumentError("--x must be positive, got -1")

    def bug(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(cli, "cmd_info", user_error)
    assert main(["info", "convnext_tiny"]) == 2
    assert capsys.readouterr().err == "visionzoo info: error: --x must be positive, got -1\n"
    monkeypatch.setattr(cli, "cmd_info", bug)
    with pytest.raises(TypeError):  # a bug keeps its traceback
        main(["info", "convnext_tiny"])


def test_create_model_refuses_a_bad_img_size_at_creation():
    with torch.device("meta"):
        with pytest.raises(ValueError, match=r"convnext_tiny: input 225x225 must be at least 32x32 and a multiple of "
                                             r"32.*e\.g\. to 256x256"):
            visionzoo.create_model("convnext_tiny", img_size=225)
        visionzoo.create_model("convnext_tiny", img_size=256)


def test_constructor_errors_name_the_model():
    from visionzoo.errors import ArgumentError, UnknownArgumentError

    with pytest.raises(UnknownArgumentError, match="convnext_test: unknown argument"):
        visionzoo.create_model("convnext_test", pretrainedd=True)
    with torch.device("meta"), pytest.raises(ArgumentError, match="^convnext_test: convnext: kernel_size must be odd"):
        visionzoo.create_model("convnext_test", kernel_size=4)


def test_eval_writes_next_to_the_checkpoint(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from visionzoo.train.loop import train_metadata

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            Image.new("RGB", (32, 32), (200 * (c == "a"), 0, 0)).save(tmp_path / "data" / split / c / "0.png")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    m = visionzoo.create_model("convnext_test", num_classes=2, img_size=32)
    ckpt = visionzoo.save(m, tmp_path / "run" / "model.safetensors", extra=train_metadata(["a", "b"], 32))
    assert main(["eval", "--checkpoint", str(ckpt), "--data", f"folder:{tmp_path / 'data'}"]) == 0
    assert (tmp_path / "run" / "model_eval" / "metrics.json").is_file()
    assert not (tmp_path / "runs").exists()
    assert "model_eval" in capsys.readouterr().out
