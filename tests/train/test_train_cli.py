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
    (["train", "--model", "resnet_test", "--img-size", "native"], "input 8x8 must be at least 32x32"),
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


def test_ctrl_c_in_train_is_one_line_and_names_the_checkpoint(tmp_path, capsys, monkeypatch):
    from visionzoo.train import loop

    real = loop._Trainer.train_epoch

    def interrupt_in_epoch_2(self, progress):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return real(self, progress)

    monkeypatch.setattr(loop._Trainer, "train_epoch", interrupt_in_epoch_2)
    out = tmp_path / "run"
    tiny = ["--limit-train", "32", "--limit-val", "10", "--batch-size", "32", "--no-progress", "--hflip", "0"]
    argv = ["train", "--model", "convnext_test", "--img-size", "32", "--epochs", "3", "--out", str(out), *tiny]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "interrupted in epoch 2; the last complete checkpoint is epoch 1" in err and "--resume auto" in err
    assert str(out / "latest.pt") in err and loop.load_train_state(out / "latest.pt")["epoch"] == 1


def test_train_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    for arg, default in (("--epochs", "10"), ("--lr", "0.002"), ("--batch-size", "64"), ("--opt", "adamw"),
                         ("--weight-decay", "0.05"), ("--smoothing", "0.1"), ("--out", "runs/train")):
        assert f"(default: {default})" in out.split(arg, 1)[1].split(" --", 1)[0], arg


def test_one_epoch_is_singular(tmp_path):
    from visionzoo.train.compare import CompareRow, markdown
    from visionzoo.train.loop import TrainConfig

    rows = [CompareRow("a_test", "convnet", 90.0, 99.0, None, 1.0, 0.1, 100.0, 1.0, 1.0, False, [])]
    assert "1 epoch," in markdown(rows, TrainConfig(epochs=1), "digits", 32)
    assert "2 epochs," in markdown(rows, TrainConfig(epochs=2), "digits", 32)


def test_compare_plot_keeps_one_colour_per_model_and_labels_inside(tmp_path, monkeypatch):
    from matplotlib.colors import to_hex

    from visionzoo.train import compare

    seen = {}

    def keep(plt, fig, path):
        seen["fig"] = fig
        return path

    monkeypatch.setattr(compare, "_save", keep)
    hist = [dict(epoch=1, val_top1=50.0), dict(epoch=2, val_top1=80.0)]
    rows = [compare.CompareRow(n, k, t, 99.0, None, p, 0.1, s, 1.0, 1.0, False, hist)
            for n, k, t, p, s in (("convnext_atto", "convnet", 97.8, 3.4, 1822.0), ("resnet18", "convnet", 98.9, 11.2,
                                  1908.0), ("deit_tiny_patch16_224", "vit", 94.7, 5.4, 1104.0))]
    compare.plot(rows, tmp_path / "c.png", "digits, 1 epoch")
    fig = seen["fig"]
    ax_c, ax_s = fig.axes
    lines = [to_hex(line.get_color()) for line in ax_c.get_lines()]
    dots = [to_hex(c.get_facecolor()[0][:3]) for c in ax_s.collections]
    assert lines == dots and len(set(lines)) == 3
    assert "orange" not in ax_s.get_title() and "blue" not in ax_s.get_title()
    renderer = fig.canvas.get_renderer()
    box = ax_s.get_window_extent(renderer)
    for t in ax_s.texts:
        bb = t.get_window_extent(renderer)
        assert box.x0 <= bb.x0 and bb.x1 <= box.x1 and box.y0 <= bb.y0 and bb.y1 <= box.y1, t.get_text()
    import matplotlib.pyplot as plt

    plt.close(fig)
