"""Datasets and loaders: scikit-learn digits, Fashion-MNIST IDX files, class folders, Hugging Face ``datasets``.

Every source becomes an ``ImageDataset`` of decoded Pillow images that yields ``(uint8 (C, S, S), label)``;
batches are augmented and normalised later, as tensors (see ``augment.py``). Images are decoded with Pillow
only. Unreadable images are skipped, counted and listed in a ``DataWarning``; a missing folder, an empty
class or train/val folders with different classes raise with a message that says what to fix.
"""
from __future__ import annotations

import gzip
import io
import os
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from visionzoo.errors import DataError, MissingDependencyError, NotFoundError

__all__ = ["DataSplits", "DataWarning", "ImageDataset", "load_data", "make_loaders", "read_idx"]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
SOURCES = ("digits", "fashion-mnist", "shapes", "folder:PATH", "hf:NAME")
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
             "box": Image.Resampling.BOX}


class DataWarning(UserWarning):
    """Images that were skipped because they could not be decoded."""


# --- datasets ------------------------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """``(image, label)`` pairs: ``samples[i]`` is decoded by ``load`` into a Pillow image, then ``transform``-ed.

    ``cache=True`` keeps the transformed tensors (in-memory sources: digits, Fashion-MNIST).
    """

    def __init__(self, samples: Sequence[Any], targets: Sequence[int], classes: Sequence[str],
                 load: Callable[[Any], Image.Image], cache: bool = False) -> None:
        self.samples, self.targets, self.classes = samples, [int(t) for t in targets], list(classes)
        self.load = load
        self.cache = cache
        self.transform: Callable[[Image.Image], Tensor] | None = None
        self._cached: dict[int, Tensor] = {}

    def set_transform(self, transform: Callable[[Image.Image], Tensor]) -> ImageDataset:
        self.transform = transform
        self._cached = {}
        return self

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self._cached.get(i)
        if x is None:
            if self.transform is None:
                raise RuntimeError("ImageDataset: call set_transform (make_loaders does) before reading items")
            x = self.transform(self.load(self.samples[i]))
            if self.cache:
                self._cached[i] = x
        return x, self.targets[i]

    def subset(self, idx: Sequence[int]) -> ImageDataset:
        samples = self.samples[np.asarray(idx, dtype=np.int64)] if isinstance(self.samples, np.ndarray) \
            else [self.samples[i] for i in idx]
        return ImageDataset(samples, [self.targets[i] for i in idx], self.classes, self.load, self.cache)


@dataclass
class DataSplits:
    """A train and a validation ``ImageDataset`` with their class names and native image size."""

    train: ImageDataset
    val: ImageDataset
    classes: list[str]
    in_chans: int
    image_size: tuple[int, int] | None  # (H, W) when every image has the same size, else None
    name: str
    skipped: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --- transforms (Pillow) -------------------------------------------------------------------------------------
def to_tensor(img: Image.Image) -> Tensor:
    """A Pillow image as a ``uint8 (C, H, W)`` tensor."""
    a = np.asarray(img, dtype=np.uint8)
    a = a[:, :, None] if a.ndim == 2 else a
    return torch.from_numpy(a.copy()).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)


def resampling(interpolation: str) -> Image.Resampling:
    if interpolation not in _RESAMPLE:
        raise DataError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
    return _RESAMPLE[interpolation]


class TrainResize:
    """Resize to ``size x size`` (random crops are taken later, on the batch)."""

    def __init__(self, size: int, interpolation: str = "bicubic") -> None:
        self.size, self.resample = size, resampling(interpolation)

    def __call__(self, img: Image.Image) -> Tensor:
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), self.resample)
        return to_tensor(img)


class EvalResize:
    """timm's evaluation transform: shorter side to ``size / crop_pct``, then a centre crop of ``size``."""

    def __init__(self, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic") -> None:
        if not 0 < crop_pct <= 1:
            raise DataError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size, self.crop_pct, self.resample = size, crop_pct, resampling(interpolation)

    def __call__(self, img: Image.Image) -> Tensor:
        w, h = img.size
        short = int(self.size / self.crop_pct)
        nw, nh = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), self.resample)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        return to_tensor(img.crop((left, top, left + self.size, top + self.size)))


# --- helpers -------------------------------------------------------------------------------------------------
def _mode(in_chans: int) -> str:
    if in_chans not in (1, 3):
        raise DataError(f"in_chans must be 1 (grey) or 3 (RGB) for image data, got {in_chans}")
    return "L" if in_chans == 1 else "RGB"


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split of indices into (train, val); each class keeps at least one training image."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_split must be between 0 and 1 (exclusive), got {val_fraction}")
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    train, val = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        k = min(int(round(val_fraction * len(idx))), len(idx) - 1)
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(val)


def _limit(ds: ImageDataset, n: int | None, seed: int) -> ImageDataset:
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise DataError(f"limit must be >= 1, got {n}")
    idx = np.random.default_rng(seed).permutation(len(ds))[:n]
    return ds.subset(sorted(idx.tolist()))


def _array_loader(mode: str) -> Callable[[np.ndarray], Image.Image]:
    def load(a: np.ndarray) -> Image.Image:
        return Image.fromarray(a).convert(mode)
    return load


# --- sources -------------------------------------------------------------------------------------------------
def _digits(in_chans: int, val_split: float, seed: int) -> DataSplits:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MissingDependencyError("--data digits needs scikit-learn: pip install 'visionzoo[train]'") from e
    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    classes = [str(c) for c in d.target_names]
    full = ImageDataset(images, d.target, classes, _array_loader(_mode(in_chans)), cache=True)
    tr, va = stratified_split(d.target, val_split, seed)
    return DataSplits(full.subset(tr), full.subset(va), classes, in_chans, (8, 8), "digits")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format, gzipped or not) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says {dims} ({int(np.prod(dims))} bytes) but the file holds "
                        f"{body.size}; the file is truncated, download it again")
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    raise NotFoundError(f"fashion-mnist: {stem}[.gz] not found in {root}; install Debian's "
                        f"dataset-fashion-mnist package (files in {FASHION_MNIST_DIR}) or pass --data-dir "
                        f"with the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                        f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)")


def _fashion_mnist(data_dir: str | None, in_chans: int) -> DataSplits:
    root = Path(data_dir or FASHION_MNIST_DIR)
    if not root.is_dir():
        raise NotFoundError(f"fashion-mnist: folder {str(root)!r} does not exist; install Debian's "
                            f"dataset-fashion-mnist package or pass --data-dir")
    parts = []
    for split in ("train", "t10k"):
        x = read_idx(_find_idx(root, f"{split}-images-idx3-ubyte"))
        y = read_idx(_find_idx(root, f"{split}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"fashion-mnist: {split} images {x.shape} and labels {y.shape} do not match")
        parts.append((x, y))
    n_cls = int(max(parts[0][1].max(), parts[1][1].max())) + 1
    classes = list(FASHION_MNIST_CLASSES) if n_cls <= 10 else [str(i) for i in range(n_cls)]
    load = _array_loader(_mode(in_chans))
    (xt, yt), (xv, yv) = parts
    return DataSplits(ImageDataset(xt, yt, classes, load, cache=True), ImageDataset(xv, yv, classes, load, cache=True),
                      classes, in_chans, tuple(xt.shape[1:]), "fashion-mnist")


def _decode(src: Any, mode: str) -> Image.Image:
    """Open a path or bytes with Pillow and fully decode it (truncated files raise here, not mid-training)."""
    f = io.BytesIO(src) if isinstance(src, bytes) else src
    with Image.open(f) as img:
        img.load()
        return img.convert(mode)


def _scan(samples: list[Any], targets: list[int], mode: str, label: Callable[[Any], str]
          ) -> tuple[list[Any], list[int], list[str], set[tuple[int, int]]]:
    """Decode every sample once; keep the readable ones and return the names of the others and the sizes seen."""
    keep, keep_t, bad, sizes = [], [], [], set()
    for s, t in zip(samples, targets):
        try:
            sizes.add(_decode(s, mode).size[::-1])
        except Exception as e:  # noqa: BLE001  (Pillow raises many types for a broken file)
            bad.append(f"{label(s)} ({type(e).__name__})")
            continue
        keep.append(s)
        keep_t.append(t)
    return keep, keep_t, bad, sizes


def _class_dirs(root: Path, what: str) -> list[str]:
    if not root.is_dir():
        raise NotFoundError(f"{what}: folder {str(root)!r} does not exist; --data folder:PATH needs PATH with "
                            f"one sub-folder per class (or train/ and val/ sub-folders, each with class folders)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{what}: {str(root)!r} has no class sub-folders; put each class's images in "
                        f"{root}/<class name>/")
    return classes


def _folder_items(root: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    paths, targets = [], []
    for i, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / c)):
            for name in sorted(files):
                if name.lower().endswith(IMG_EXTENSIONS) and not name.startswith("."):
                    paths.append(os.path.join(dirpath, name))
                    targets.append(i)
    return paths, targets


def _check_classes(what: str, classes: list[str], *splits: tuple[str, list[int]]) -> None:
    for split, targets in splits:
        counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(classes))
        empty = [classes[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            raise DataError(f"{what}: class(es) {empty} have no readable images in the {split} split; add images "
                            f"or remove those folders")


def _finish(name: str, classes: list[str], in_chans: int, load: Callable[[Any], Image.Image], label: Callable,
            train: tuple[list, list[int]], val: tuple[list, list[int]] | None, val_split: float, seed: int
            ) -> DataSplits:
    """Scan (decode once), warn about skipped images, check classes, split when there is no val set."""
    mode = _mode(in_chans)
    tr_s, tr_t, bad, sizes = _scan(*train, mode, label)
    if val is not None:
        va_s, va_t, bad_v, sizes_v = _scan(*val, mode, label)
        bad, sizes = bad + bad_v, sizes | sizes_v
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        warnings.warn(f"{name}: skipped {len(bad)} unreadable image(s):\n  {shown}", DataWarning, stacklevel=3)
    if val is not None:
        _check_classes(name, classes, ("train", tr_t), ("val", va_t))
    else:
        _check_classes(name, classes, ("train", tr_t))
        tr, va = stratified_split(tr_t, val_split, seed)
        va_s, va_t = [tr_s[i] for i in va], [tr_t[i] for i in va]
        tr_s, tr_t = [tr_s[i] for i in tr], [tr_t[i] for i in tr]
    return DataSplits(ImageDataset(tr_s, tr_t, classes, load), ImageDataset(va_s, va_t, classes, load), classes,
                      in_chans, next(iter(sizes)) if len(sizes) == 1 else None, name, bad)


def _folder(path: str, in_chans: int, val_split: float, seed: int) -> DataSplits:
    root = Path(path).expanduser()
    mode = _mode(in_chans)
    what = f"folder:{path}"
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes = _class_dirs(root / "train", what)
        val_classes = _class_dirs(root / "val", what)
        if classes != val_classes:
            only_t, only_v = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
            raise DataError(f"{what}: train/ and val/ have different class folders (only in train: {only_t}, only "
                            f"in val: {only_v}); give both the same class sub-folders")
        train, val = _folder_items(root / "train", classes), _folder_items(root / "val", classes)
    else:
        classes = _class_dirs(root, what)
        train, val = _folder_items(root, classes), None
    return _finish(what, classes, in_chans, lambda p: _decode(p, mode), str, train, val, val_split, seed)


def _hf(name: str, data_dir: str | None, in_chans: int, val_split: float, seed: int) -> DataSplits:
    try:
        import datasets
    except ImportError as e:
        raise MissingDependencyError(f"--data hf:{name} needs Hugging Face datasets: "
                                     f"pip install 'visionzoo[hf]'") from e
    ds = datasets.load_dataset(name, data_dir=data_dir)
    if not isinstance(ds, datasets.DatasetDict) or "train" not in ds:
        raise DataError(f"hf:{name}: expected a dataset with a 'train' split, got {list(ds)}")
    feats = ds["train"].features
    img_col = next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
    lab_col = next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    if img_col is None or lab_col is None:
        raise DataError(f"hf:{name}: needs an Image column and a ClassLabel column, got features {dict(feats)}")
    classes = list(feats[lab_col].names)
    mode = _mode(in_chans)

    def items(split: str) -> tuple[list, list[int]]:
        d = ds[split].cast_column(img_col, datasets.Image(decode=False))  # we decode with Pillow, and skip bad ones
        return [r["bytes"] or r["path"] for r in d[img_col]], list(d[lab_col])

    val_name = next((s for s in ("validation", "val", "test") if s in ds), None)
    val = items(val_name) if val_name else None
    return _finish(f"hf:{name}", classes, in_chans, lambda s: _decode(s, mode),
                   lambda s: s if isinstance(s, str) else f"<{len(s)} bytes>", items("train"), val, val_split, seed)


def load_data(spec: str = "digits", data_dir: str | None = None, in_chans: int | None = None, val_split: float = 0.2,
              seed: int = 0, limit_train: int | None = None, limit_val: int | None = None) -> DataSplits:
    """Load ``spec`` (``digits``, ``fashion-mnist``, ``shapes``, ``folder:PATH`` or ``hf:NAME``) as train/val splits.

    ``in_chans`` defaults to 1 for the grey sources and 3 otherwise. Sources without a validation set are split
    per class with ``val_split`` and ``seed``. ``limit_*`` keep a seeded random subset (quick runs).
    """
    if spec == "digits":
        splits = _digits(in_chans or 1, val_split, seed)
    elif spec == "fashion-mnist":
        splits = _fashion_mnist(data_dir, in_chans or 1)
    elif spec == "shapes":  # the synthetic localisation set (train/synthetic.py), 64 px RGB
        from visionzoo.train.synthetic import shapes_splits

        if in_chans not in (None, 3):
            raise ValueError(f"--data shapes is RGB; in_chans must be 3, got {in_chans}")
        splits = shapes_splits(limit_train or 2000, limit_val or 500, seed=seed)  # generate only what is used
    elif spec.startswith("folder:") and len(spec) > 7:
        splits = _folder(spec[7:], in_chans or 3, val_split, seed)
    elif spec.startswith("hf:") and len(spec) > 3:
        splits = _hf(spec[3:], data_dir, in_chans or 3, val_split, seed)
    else:
        raise DataError(f"--data must be one of {', '.join(SOURCES)}, got {spec!r}")
    splits.train, splits.val = _limit(splits.train, limit_train, seed), _limit(splits.val, limit_val, seed + 1)
    return splits


# --- loaders -------------------------------------------------------------------------------------------------
class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order, without padding, so reduced metrics count each image once."""

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):  # noqa: ANN204
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def make_loaders(splits: DataSplits, img_size: int, batch_size: int, *, eval_batch_size: int | None = None,
                 crop_pct: float = 0.875, interpolation: str = "bicubic", workers: int = 0, seed: int = 0,
                 rank: int = 0, world: int = 1) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders of ``uint8 (B, C, img_size, img_size)`` batches.

    The training set is resized to ``img_size`` and shuffled by a ``DistributedSampler`` (one replica when
    ``world == 1``; call ``loader.sampler.set_epoch(epoch)``); the validation set follows the variant's
    ``crop_pct`` and ``interpolation`` and is sharded without padding.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    splits.train.set_transform(TrainResize(img_size, interpolation))
    splits.val.set_transform(EvalResize(img_size, crop_pct, interpolation))
    per_rank = len(splits.train) // world
    if per_rank < 1:
        raise DataError(f"the training set has {len(splits.train)} images, fewer than the {world} processes")
    sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(splits.train, batch_size=batch_size, sampler=sampler, num_workers=workers,
                       drop_last=per_rank > batch_size, generator=g, persistent_workers=workers > 0)
    val = DataLoader(splits.val, batch_size=eval_batch_size or batch_size,
                     sampler=ShardSampler(len(splits.val), rank, world), num_workers=workers)
    return train, val
