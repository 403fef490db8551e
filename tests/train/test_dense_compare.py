"""``visionzoo compare --task`` and ``visionzoo bench --task``: one table per dense task."""
from __future__ import annotations

import csv

from visionzoo.cli import main


def test_compare_seg(tmp_path, capsys):
    rc = main(["compare", "--task", "seg", "--head", "fpn", "--models", "resnet_test", "vit_test", "--img-size", "64",
               "--limit-train", "8", "--limit-val", "4", "--epochs", "1", "--batch-size", "8", "--no-progress",
               "--head-dim", "16", "--budget", "0.05", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| model | kind | head | miou | pixel_acc | params (M) | GMACs | img/s | train s |" in out
    rows = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert [r["model"] for r in rows] == ["resnet_test", "vit_test"] and all(float(r["img_per_s"]) > 0 for r in rows)
    assert 0 <= float(rows[0]["miou"]) <= 1 and (tmp_path / "compare.png").stat().st_size > 0
    assert (tmp_path / "vit_test" / "predictions.png").is_file()


def test_bench_det(tmp_path, capsys):
    rc = main(["bench", "--task", "det", "resnet_test", "swin_test", "--img-size", "128", "--budget", "0.05",
               "--head-dim", "16", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "det + fcos at 128x128, batch 1" in out and "resnet_test" in out and "swin_test" in out
    rows = list(csv.DictReader(open(tmp_path / "bench_det.csv")))
    assert len(rows) == 2 and all(float(r["gmacs"]) > 0 and float(r["img_per_s"]) > 0 for r in rows)


def test_bench_task_errors(capsys):
    assert main(["bench", "--task", "seg", "--head", "fcos", "resnet_test"]) == 2
    assert "--head fcos is not a seg head" in capsys.readouterr().err
    assert main(["bench", "--task", "seg", "resnet_test", "--img-size", "200"]) == 2
    assert "multiples of 32" in capsys.readouterr().err
