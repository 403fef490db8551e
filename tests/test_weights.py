"""Checkpoint formats, layout detection, head/in_chans adaptation, errors, atomic writes."""
from __future__ import annotations

import os
import pickle
import stat

import pytest
import torch

import visionzoo
from visionzoo import weights
from visionzoo.weights import CheckpointError

NAME = "convnext_test"


@pytest.fixture
def model():
    torch.manual_seed(0)
    return visionzoo.create_model(NAME, num_classes=10).eval()


def _x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_torch_pickle_and_containers(model, tmp_path):
    sd = model.state_dict()
    ref = model(_x())
    for i, obj in enumerate([sd, {"state_dict": sd}, {"model": sd, "epoch": 3},
                             {"module." + k: v for k, v in sd.items()}]):
        path = tmp_path / f"c{i}.pth"
        torch.save(obj, path)
        m = visionzoo.create_model(NAME, num_classes=10, checkpoint_path=str(path)).eval()
        torch.testing.assert_close(m(_x()), ref, atol=0, rtol=0)


def test_pt_format_rebuilds(model, tmp_path):
    path = visionzoo.save(model, tmp_path / "m.pt")
    again = visionzoo.load_model(path).eval()
    assert torch.equal(again(_x()), model(_x()))


class _Evil:
    def __reduce__(self):
        return (print, ("this checkpoint ran code",))


def test_pickled_code_is_refused(tmp_path, model):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": model.state_dict(), "x": _Evil()}, f)
    with pytest.raises(CheckpointError) as e:
        visionzoo.create_model(NAME, checkpoint_path=str(path))
    msg = str(e.value)
    # one line of ours: names the file and the fix, and never suggests weights_only=False
    assert "\n" not in msg and "evil.pth" in msg and "could run code" in msg and "state_dict()" in msg
    torch.save({"state_dict": model.state_dict(), "x": _Evil()}, path)  # torch's own format names the object
    with pytest.raises(CheckpointError, match=r"holds pickled Python objects \(print\) that would run code"):
        visionzoo.create_model(NAME, checkpoint_path=str(path))
    assert "weights_only" not in msg and len(msg) < 300


def _corrupt(tmp_path, model, suffix: str) -> dict[str, object]:
    good = visionzoo.save(model, tmp_path / f"good{suffix}").read_bytes()
    files = {"empty": b"", "garbage": b"this is not a checkpoint at all, " * 8, "truncated": good[: len(good) // 2]}
    out = {}
    for kind, data in files.items():
        path = tmp_path / f"{kind}{suffix}"
        path.write_bytes(data)
        out[kind] = path
    return out


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_corrupt_files_are_our_error_naming_file_and_problem(tmp_path, model, suffix):
    want = {"empty": "is empty (0 bytes)", "garbage": "not a", "truncated": "truncated"}
    for kind, path in _corrupt(tmp_path, model, suffix).items():
        for load in (lambda p: visionzoo.create_model(NAME, num_classes=10, checkpoint_path=str(p)),
                     visionzoo.load_model, lambda p: weights.convert(p, tmp_path / "out.safetensors", NAME)):
            with pytest.raises(CheckpointError) as e:
                load(path)
            msg = str(e.value)
            assert path.name in msg and want[kind] in msg, (kind, msg)
            assert "()" not in msg and "re-save it as a plain state_dict" not in msg, msg
            assert "again" in msg, msg  # the fix: download or save it again


def test_torch_file_named_safetensors(tmp_path, model):
    path = tmp_path / "m.safetensors"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="is a torch pickle.*rename it to .pth"):
        visionzoo.create_model(NAME, num_classes=10, checkpoint_path=str(path))


def test_wrong_model_checkpoint_names_what_the_file_is(tmp_path):
    torch.manual_seed(0)
    other = visionzoo.create_model("swin_test", num_classes=10)
    path = visionzoo.save(other, tmp_path / "swin.safetensors")
    with pytest.raises(CheckpointError, match="this checkpoint is swin_test, not convnext_test") as e:
        visionzoo.create_model(NAME, num_classes=10, checkpoint_path=str(path))
    assert "load_model" in str(e.value) and str(e.value).count("\n") == 0


def test_state_key_picks_the_ema_weights(tmp_path, model):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "train.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema, "epoch": 3}, path)
    m = visionzoo.create_model(NAME, num_classes=10)
    weights.load_checkpoint(m, path, state_key="model_ema")
    assert torch.equal(m.state_dict()["stem.0.weight"], ema["stem.0.weight"])
    weights.load_checkpoint(m, path)  # without a key: the first container, as before
    assert torch.equal(m.state_dict()["stem.0.weight"], model.state_dict()["stem.0.weight"])


def test_saved_files_follow_the_umask(tmp_path, model):
    old = os.umask(0o022)
    try:
        for name in ("m.safetensors", "m.pt"):
            path = visionzoo.save(model, tmp_path / name)
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, oct(path.stat().st_mode)
    finally:
        os.umask(old)


def test_mismatch_lists_keys(model, tmp_path):
    sd = model.state_dict()
    sd.pop("stem.0.weight")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing \(1\): \[stem.0.weight\]; unexpected \(1\): \[extra.weight\]"):
        visionzoo.create_model(NAME, num_classes=10, checkpoint_path=str(path))


def test_shape_mismatch_is_an_error(model, tmp_path):
    path = visionzoo.save(model, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        visionzoo.create_model(NAME, num_classes=10, dims=(16, 32, 48, 80), checkpoint_path=str(path))


def test_other_class_count_reinitialises_head(model, tmp_path):
    path = visionzoo.save(model, tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="10 classes, the model 3"):
        m = visionzoo.create_model(NAME, num_classes=3, checkpoint_path=str(path))
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.fc")}
    for k, v in body.items():
        assert torch.equal(m.state_dict()[k], v), k


def test_in_chans_adapted(model, tmp_path):
    path = visionzoo.save(model, tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="adapting the first conv"):
        m = visionzoo.create_model(NAME, num_classes=10, in_chans=1, checkpoint_path=str(path)).eval()
    gray = torch.randn(2, 1, 64, 64)
    # a gray image repeated to RGB through the original model equals the summed-kernel model
    torch.testing.assert_close(m(gray), model(gray.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-4)


def test_atomic_save_keeps_old_file(model, tmp_path, monkeypatch):
    path = visionzoo.save(model, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def broken(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        visionzoo.save(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_missing_file_and_foreign_file(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        visionzoo.create_model(NAME, checkpoint_path=str(tmp_path / "nope.pth"))
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="not in visionzoo format"):
        visionzoo.load_model(path)


def test_convert_infers_classes(model, tmp_path):
    src = tmp_path / "plain.pth"
    torch.save(model.state_dict(), src)
    dst = weights.convert(src, tmp_path / "out.safetensors", NAME)
    again = visionzoo.load_model(dst).eval()
    assert again.num_classes == 10 and torch.equal(again(_x()), model(_x()))


def test_training_checkpoints_with_plain_data_load(tmp_path, model):
    """Official training scripts store their argparse arguments and numpy scalars next to the weights."""
    import argparse

    import numpy as np

    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.1), "best_acc": np.float64(82.1),
                "epoch": np.int64(299)}, path)
    m = visionzoo.create_model(NAME, num_classes=10, checkpoint_path=str(path)).eval()
    assert torch.equal(m(_x()), model(_x()))
