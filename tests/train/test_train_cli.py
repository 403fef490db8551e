"""`visionzoo train | eval | compare`: a round trip on tiny models, and bad arguments."""
from __future__ import annotations

import json

import pytest

from visionzoo.cli import main

SMALL = ["--limit-train", "64", "--limit-val", "30", "--batch-size", "32", "--no-progress", "--hflip", "0"]


def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "resnet_test", "--img-size", "32", "--epochs", "2", "--ema", "--out", str(out),
                 *SMALL]) == 0
    text = capsys.readouterr().out
    assert "resnet_test: val top-1" in text and "model_ema.safetensors" in text
    top1 = float(text.split("val top-1 ")[1].split("%")[0])
    for ckpt in ("model.safetensors", "latest.pt"):
        assert main(["eval", "--checkpoint", str(out / ckpt), "--out", str(tmp_path / ckpt), *SMALL[:4]]) == 0
        m = json.loads((tmp_path / ckpt / "metrics.json").read_text())
        assert m["top1"] == pytest.approx(top1, abs=0.01) and m["count"] == 30 and len(m["per_class"]) == 10
        assert (tmp_path / ckpt / "confusion.png").is_file() and (tmp_path / ckpt / "per_class.csv").is_file()
    assert main(["eval", "--checkpoint", str(out / "latest.pt"), "--ema", "--out", str(tmp_path / "e"),
                 *SMALL[:4]]) == 0
    # resuming a finished run trains nothing more and reports the stored model
    assert main(["train", "--model", "resnet_test", "--img-size", "32", "--epochs", "2", "--ema", "--resume", "auto",
                 "--out", str(out), *SMALL]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_compare_writes_one_table_and_one_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--models", "resnet_test", "vit_test", "--img-size", "32", "--patch-size", "4",
                 "--epochs", "1", "--budget", "0.1", "--out", str(out), *SMALL]) == 0
    table = (out / "compare.md").read_text()
    assert "| resnet_test | convnet |" in table and "| vit_test | vit |" in table
    header = (out / "compare.csv").read_text().splitlines()[0].split(",")
    assert {"model", "top1", "params_m", "gmacs", "img_per_s", "train_time_s"} <= set(header)
    assert (out / "compare.png").is_file() and (out / "vit_test" / "metrics.csv").is_file()


@pytest.mark.parametrize("argv, match", [
    (["train", "--model", "resnet_tset"], "did you mean resnet_test"),
    (["train", "--model", "resnet_test", "--data", "mnist"], "--data must be one of"),
    (["train", "--model", "resnet_test", "--img-size", "native"], "use img_size=32"),
    (["train", "--model", "resnet_test", "--img-size", "32", "--lr", "-1"], "lr must be > 0"),
    (["train", "--model", "resnet_test", "--img-size", "32", "--sam", "--accum-steps", "2"], "accum_steps=1"),
    (["train", "--model", "resnet_test", "--data", "folder:/nonexistent/x"], "does not exist"),
    (["train", "--model", "resnet_test", "--model-arg", "depth"], "KEY=VALUE"),
    (["train", "--model", "resnet_test", "--resume", "/nonexistent/latest.pt", "--img-size", "32"], "does not exist"),
    (["eval", "--checkpoint", "/nonexistent.pt"], "does not exist"),
    (["compare", "--models", "resnet_test", "nope_model"], "unknown model 'nope_model'"),
])
def test_bad_arguments_end_with_one_line(argv, match, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path), *(SMALL if argv[0] != "eval" else SMALL[:4])]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_bad_img_size_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "resnet_test", "--img-size", "big"])
    assert e.value.code == 2 and "integer or 'native'" in capsys.readouterr().err
