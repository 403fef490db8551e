"""Two CPU processes under torchrun (gloo): sharded data, reduced metrics, rank 0 writes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from visionzoo.train.data import load_data
from visionzoo.train.evaluate import eval_checkpoint, load_trained
from visionzoo.train.loop import load_train_state


def test_two_process_ddp(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "visionzoo",
           "train", "--model", "resnet_test", "--img-size", "32", "--epochs", "2", "--limit-train", "64",
           "--limit-val", "30", "--batch-size", "16", "--no-progress", "--threads", "1", "--hflip", "0",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("epoch 2/2") == 1  # only rank 0 reports
    state = load_train_state(out / "latest.pt")
    assert len(state["rng"]) == 2  # both ranks' RNG states, for an exact resume
    assert state["step"] == 4  # 64 images / 2 ranks / batch 16 = 2 steps per epoch
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "latest.pt", "metrics.csv", "model.safetensors"]
    # the validation metrics reduced over the two shards equal one process's metrics on the whole split
    model, meta = load_trained(out / "model.safetensors")
    m = eval_checkpoint(model, load_data("digits", limit_train=64, limit_val=30), meta)
    assert m.count == 30
    assert m.top1 == pytest.approx(state["history"][-1]["val_top1"])
    assert m.loss == pytest.approx(state["history"][-1]["val_loss"], rel=1e-5)
