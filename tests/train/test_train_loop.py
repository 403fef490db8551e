"""The training loop: loss falls on a fixed batch, exact resume, atomic checkpoints, options, bad arguments."""
from __future__ import annotations

import math

import pytest
import torch

import visionzoo
from visionzoo.train.augment import AugConfig, soft_cross_entropy
from visionzoo.train.loop import TrainConfig, build_model, fit, load_train_state
from visionzoo.train.optim import create_optimizer


def quick_config(**kw) -> TrainConfig:
    """A few steps of a full recipe: batch 32 (3 steps per epoch of digits_small), no progress bars."""
    aug = kw.pop("aug", AugConfig(hflip=0.0))
    base = dict(epochs=2, batch_size=32, lr=2e-3, warmup_epochs=0.5, progress=False, aug=aug)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("name", ["convnext_test", "vit_test"])
def test_loss_falls_on_a_fixed_batch(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_chans=1, img_size=32, patch_size=4)
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8) % 10
    opt = create_optimizer(model, "adamw", lr=3e-3, weight_decay=0.05)
    losses = []
    for _ in range(8):
        loss = soft_cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0] and losses[-1] == min(losses), losses


def _run(splits, out, resume=None, **kw):
    torch.manual_seed(0)
    model = build_model("resnet_test", splits.num_classes, splits.in_chans, img_size=32)
    return fit(model, splits, quick_config(**kw), out, resume=resume, log=None)


def _numbers(history):
    return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in history]


def test_resume_continues_exactly(digits_small, tmp_path):
    """4 epochs in one go == 2 epochs, stop, resume, 2 more: same losses (bit for bit), same weights."""
    aug = AugConfig(hflip=0.5, mixup=0.5, cutmix=0.5, color_jitter=0.2)
    kw = dict(epochs=4, ema=True, aug=aug, sam=False)
    full = _run(digits_small, tmp_path / "full", **kw)
    part = _run(digits_small, tmp_path / "part", stop_after=2, **kw)
    assert len(part.history) == 2 and not (tmp_path / "part" / "model.safetensors").exists()
    rest = _run(digits_small, tmp_path / "part", resume="auto", **kw)
    assert _numbers(rest.history) == _numbers(full.history)
    a, b = load_train_state(tmp_path / "full" / "latest.pt"), load_train_state(tmp_path / "part" / "latest.pt")
    assert a["step"] == b["step"] == 12 and a["epoch"] == b["epoch"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["module"]:
        assert torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]), k
    assert (tmp_path / "part" / "metrics.csv").read_text().count("\n") == 5


def test_latest_checkpoint_survives_a_failed_write(digits_small, tmp_path, monkeypatch):
    _run(digits_small, tmp_path, epochs=2, stop_after=1)
    before = (tmp_path / "latest.pt").read_bytes()

    def dying_save(obj, f, *a, **k):  # writes half a file, then the process "dies"
        with open(f, "wb") as fh:
            fh.write(before[: len(before) // 2])
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _run(digits_small, tmp_path, epochs=2, resume="auto")
    monkeypatch.undo()
    assert (tmp_path / "latest.pt").read_bytes() == before
    assert load_train_state(tmp_path / "latest.pt")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_options_run_together(digits_small, tmp_path):
    """SGD + SAM + clipping + bf16 autocast + grad checkpointing + layer decay + EMA, and accumulation + fp16."""
    res = _run(digits_small, tmp_path / "a", epochs=1, opt="sgd", lr=0.05, sam=True, clip_grad=1.0, amp="bf16",
               grad_checkpointing=True, layer_decay=0.8, ema=True,
               aug=AugConfig(auto_augment="trivial", hflip=0.0, mixup=1.0))
    assert math.isfinite(res.history[-1]["train_loss"]) and res.ema_metrics is not None
    assert {"curves", "model", "model_ema"} <= set(res.files)
    res = _run(digits_small, tmp_path / "b", epochs=1, accum_steps=2, amp="fp16", clip_grad=1.0,
               aug=AugConfig(auto_augment="rand", hflip=0.0, cutmix=1.0))
    assert res.history[-1]["step"] == 2  # 3 batches, accumulated by 2 -> 2 optimiser steps
    loaded = visionzoo.load_model(res.files["model"])
    assert loaded.num_classes == 10 and loaded.in_chans == 1


@pytest.mark.parametrize("kw, match", [
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(sam=True, accum_steps=2), "accum_steps=1"),
    (dict(sam=True, amp="fp16"), "sam with amp='fp16'"),
    (dict(amp="fp8"), "amp must be one of"),
    (dict(warmup_epochs=5, epochs=2), "warmup_epochs"),
    (dict(clip_grad=0), "clip_grad"),
    (dict(aug=AugConfig(scale=(0.9, 0.5))), "scale"),
    (dict(aug=AugConfig(auto_augment="auto")), "auto_augment"),
])
def test_bad_config_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw).validate()


def test_model_and_data_mismatch_is_refused(digits_small, tmp_path):
    with pytest.raises(ValueError, match="in_chans=1"):
        fit(build_model("resnet_test", 10, 3, img_size=32), digits_small, quick_config(), tmp_path, log=None)
    with pytest.raises(ValueError, match="num_classes=10"):
        fit(build_model("resnet_test", 5, 1, img_size=32), digits_small, quick_config(), tmp_path, log=None)
    with pytest.raises(ValueError, match="must be at least 32x32"):  # refused when the model is built
        build_model("resnet_test", 10, 1, img_size=24)
    fit(build_model("resnet_test", 10, 1, img_size=32), digits_small, quick_config(epochs=1), tmp_path, log=None)
    with pytest.raises(ValueError, match="checkpoint is for 'resnet_test'"):
        fit(build_model("convnext_test", 10, 1, img_size=32), digits_small, quick_config(), tmp_path,
            resume=tmp_path / "latest.pt", log=None)
