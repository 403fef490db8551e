"""Data sources: digits split, IDX reader, class folders (corrupt images, class errors), hf imagefolder."""
from __future__ import annotations

import gzip
import struct
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from visionzoo.train.data import DataWarning, EvalResize, TrainResize, load_data, make_loaders, read_idx


def test_digits_split_is_stratified_and_seeded():
    a, b = load_data("digits", seed=0), load_data("digits", seed=0)
    assert a.num_classes == 10 and a.in_chans == 1 and a.image_size == (8, 8)
    assert len(a.train) + len(a.val) == 1797 and 340 < len(a.val) < 380
    assert a.val.targets == b.val.targets and np.array_equal(a.val.samples, b.val.samples)
    counts = np.bincount(a.val.targets, minlength=10)
    assert counts.min() >= 30  # every class is in the validation split
    assert not np.array_equal(load_data("digits", seed=1).val.samples, a.val.samples)


def test_loaders_give_uint8_batches_at_the_size_asked(digits_small):
    train, val = make_loaders(digits_small, 32, batch_size=16, crop_pct=0.875)
    x, y = next(iter(train))
    assert x.dtype == torch.uint8 and x.shape == (16, 1, 32, 32) and y.shape == (16,)
    x, _ = next(iter(val))
    assert x.shape[1:] == (1, 32, 32)
    assert sum(len(b[1]) for b in val) == len(digits_small.val)


def test_eval_resize_follows_crop_pct_and_interpolation():
    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    x = EvalResize(32, crop_pct=0.875, interpolation="bilinear")(img)
    assert x.shape == (1, 32, 32)
    # shorter side to int(32 / 0.875) = 36, then a centre crop of 32: the crop starts 2 px in
    full = np.asarray(img.resize((36, 36), Image.Resampling.BILINEAR))
    assert np.array_equal(x[0].numpy(), full[2:34, 2:34])
    assert torch.equal(TrainResize(8)(img)[0], torch.from_numpy(np.array(img)))
    with pytest.raises(ValueError, match="crop_pct"):
        EvalResize(32, crop_pct=1.5)
    with pytest.raises(ValueError, match="interpolation"):
        EvalResize(32, interpolation="cubic-ish")


def _write_idx(path, arr: np.ndarray, compress: bool) -> None:
    data = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    sfx = ".gz" if compress else ""
    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte{sfx}", rng.integers(0, 255, (n, 28, 28)), compress)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte{sfx}", np.arange(n) % 10, compress)
    s = load_data("fashion-mnist", data_dir=str(tmp_path))
    assert (len(s.train), len(s.val), s.num_classes, s.image_size) == (20, 10, 10, (28, 28))
    assert s.classes[0] == "T-shirt/top" and s.train.targets[:3] == [0, 1, 2]
    assert read_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}").tolist() == list(range(10))


def test_idx_errors_say_what_is_wrong(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01abcd")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", np.zeros((4, 3, 3)), False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_data("fashion-mnist", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_data("fashion-mnist", data_dir=str(tmp_path / "nowhere"))


def _image_folder(root, classes=("cat", "dog"), n=4, size=(12, 10)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_folder_skips_corrupt_images_and_warns(tmp_path):
    root = _image_folder(tmp_path / "data")
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    good = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    with pytest.warns(DataWarning, match=r"skipped 2 unreadable image\(s\)") as rec:
        s = load_data(f"folder:{root}", val_split=0.25, seed=0)
    msg = str(rec[0].message)
    assert "broken.png" in msg and "truncated.png" in msg
    assert len(s.skipped) == 2 and s.classes == ["cat", "dog"] and s.in_chans == 3
    assert len(s.train) + len(s.val) == 8 and len(s.val) == 2
    assert s.image_size == (12, 10)
    x, _ = make_loaders(s, 32, batch_size=2)[0].dataset[0]
    assert x.shape == (3, 32, 32)


def test_folder_with_train_and_val(tmp_path):
    _image_folder(tmp_path / "train")
    _image_folder(tmp_path / "val", n=2)
    s = load_data(f"folder:{tmp_path}", in_chans=1)
    assert (len(s.train), len(s.val), s.in_chans) == (8, 4, 1)


def test_folder_errors_say_what_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "noclasses").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_data(f"folder:{tmp_path / 'noclasses'}")
    root = _image_folder(tmp_path / "empty")
    (root / "bird").mkdir()
    (root / "bird" / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.warns(DataWarning), pytest.raises(ValueError, match=r"\['bird'\] have no readable images"):
        load_data(f"folder:{root}")
    _image_folder(tmp_path / "mm" / "train", classes=("a", "b"))
    _image_folder(tmp_path / "mm" / "val", classes=("a", "c"))
    with pytest.raises(ValueError, match=r"only in train: \['b'\], only in val: \['c'\]"):
        load_data(f"folder:{tmp_path / 'mm'}")


def test_bad_source_and_arguments():
    with pytest.raises(ValueError, match="--data must be one of"):
        load_data("imagenet")
    with pytest.raises(ValueError, match="val_split"):
        load_data("digits", val_split=1.5)
    with pytest.raises(ValueError, match="in_chans"):
        load_data("digits", in_chans=2)


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"visionzoo\[hf\]"):
        load_data("hf:imagefolder")


def test_hf_imagefolder_offline(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    root = _image_folder(tmp_path / "imgs", n=3)
    (root / "dog" / "broken.png").write_bytes(b"oops")
    with pytest.warns(DataWarning, match="skipped 1"):
        s = load_data("hf:imagefolder", data_dir=str(root), val_split=0.34)
    assert s.classes == ["cat", "dog"] and len(s.train) + len(s.val) == 6
    x, _ = make_loaders(s, 16, batch_size=2)[1].dataset[0]
    assert x.shape == (3, 16, 16)
