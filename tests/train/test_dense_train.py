"""Dense training: exact resume, pictures, the CLI per task, and DDP (slow)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from visionzoo.cli import main
from visionzoo.errors import ArgumentError
from visionzoo.heads import DenseModel
from visionzoo.train.augment import AugConfig
from visionzoo.train.dense import fit_dense, load_dense_state
from visionzoo.train.dense_data import shapes_scenes
from visionzoo.train.loop import TrainConfig


def _cfg(**kw):
    return TrainConfig(epochs=2, batch_size=4, lr=2e-3, warmup_epochs=0.5, progress=False,
                       aug=AugConfig(hflip=0.5), **kw)


@pytest.mark.parametrize("task,head", [("seg", "fpn"), ("det", "fcos")])
def test_exact_resume(tmp_path, task, head):
    train, val = shapes_scenes(8, 64, seed=0), shapes_scenes(2, 64, seed=1)
    n = 5 if task == "seg" else 4

    def run(out, **kw):
        torch.manual_seed(0)
        model = DenseModel("resnet_test", head, num_classes=n, dim=16)
        return model, fit_dense(model, train, val, task, _cfg(**kw.pop("cfg", {})), out, log=None, **kw)

    full, r_full = run(tmp_path / "full")
    _, r_half = run(tmp_path / "cut", cfg={"stop_after": 1})
    assert len(r_half.history) == 1 and not r_half.files
    resumed, r_res = run(tmp_path / "cut", resume="auto")
    assert [h["train_loss"] for h in r_res.history] == [h["train_loss"] for h in r_full.history]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert (tmp_path / "full" / "predictions.png").stat().st_size > 0
    st = load_dense_state(tmp_path / "full" / "latest.pt")
    assert (st["task"], st["head"], st["variant"], st["epoch"]) == (task, head, "resnet_test", 2)


def test_resume_refuses_another_head(tmp_path):
    train, val = shapes_scenes(8, 64, seed=0), shapes_scenes(4, 64, seed=1)
    fit_dense(DenseModel("resnet_test", "fpn", num_classes=5, dim=16), train, val, "seg",
              _cfg(stop_after=1), tmp_path, log=None)
    with pytest.raises(ArgumentError, match=r"resume: the checkpoint is resnet_test \+ fpn"):
        fit_dense(DenseModel("resnet_test", "upernet", num_classes=5, dim=16), train, val, "seg", _cfg(), tmp_path,
                  resume="auto", log=None)
    with pytest.raises(ArgumentError, match="head is for task 'seg', not 'det'"):
        fit_dense(DenseModel("resnet_test", "fpn", num_classes=5, dim=16), train, val, "det", _cfg(), log=None)


def test_cli_train_seg(tmp_path, capsys):
    rc = main(["train", "--task", "seg", "--head", "segformer", "--model", "resnet_test", "--img-size", "64",
               "--limit-train", "16", "--limit-val", "8", "--epochs", "1", "--batch-size", "8", "--no-progress",
               "--warmup-epochs", "0", "--head-dim", "16", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "resnet_test + segformer (seg): val_loss" in out and "miou" in out and "pixel_acc" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "metrics.csv", "predictions.png"]


def test_cli_bad_head(capsys):
    assert main(["train", "--task", "det", "--head", "fpn", "--model", "resnet_test"]) == 2
    assert "--head fpn is not a det head; choose one of ['fcos']" in capsys.readouterr().err
    assert main(["train", "--task", "seg", "--model", "resnet_test"]) == 2
    assert "--task seg needs --head" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("task,head,metric", [("det", "fcos", "map50"), ("sr", "espcn", "psnr")])
def test_cli_train_det_sr(tmp_path, capsys, task, head, metric):
    rc = main(["train", "--task", task, "--head", head, "--model", "convnext_test", "--img-size", "64",
               "--limit-train", "16", "--limit-val", "8", "--epochs", "1", "--batch-size", "8", "--no-progress",
               "--head-dim", "16", "--out", str(tmp_path)])
    assert rc == 0 and metric in capsys.readouterr().out


@pytest.mark.slow
def test_two_process_ddp_dense(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "visionzoo",
           "train", "--task", "seg", "--head", "fpn", "--model", "resnet_test", "--img-size", "64", "--epochs", "2",
           "--limit-train", "32", "--limit-val", "10", "--batch-size", "8", "--no-progress", "--threads", "1",
           "--head-dim", "16", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("epoch 2/2") == 1
    st = load_dense_state(out / "latest.pt")
    assert len(st["rng"]) == 2 and st["step"] == 4  # 32 images / 2 ranks / batch 8 = 2 steps per epoch
