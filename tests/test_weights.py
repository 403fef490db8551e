"""Checkpoint formats, layout detection, head/in_chans adaptation, errors, atomic writes."""
from __future__ import annotations

import pickle

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
    with pytest.raises(CheckpointError, match="weights_only"):
        visionzoo.create_model(NAME, checkpoint_path=str(path))


def test_mismatch_lists_keys(model, tmp_path):
    sd = model.state_dict()
    sd.pop("stem.0.weight")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing \(1\): \['stem.0.weight'\][\s\S]*unexpected \(1\)"):
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
