"""Images for calibration and for measuring agreement/top-1: the user's data or the bundled digits.

Images are preprocessed as ``visionzoo train``/``eval`` do: resized by the variant's ``crop_pct`` and
interpolation to the model's input size, normalised with its mean and std.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from visionzoo.errors import ArgumentError

__all__ = ["calibration_batches", "labelled_images"]


def labelled_images(spec: str, model: nn.Module, *, split: str = "val", n: int | None = None, seed: int = 0,
                    data_dir: str | None = None, img_size: int | None = None) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` of ``split`` (``"train"`` or ``"val"``) of ``spec`` (``digits``, ``fashion-mnist``,
    ``folder:PATH``, ``hf:NAME``), at most ``n`` of them (a seeded subset), ready for ``model``."""
    from visionzoo.train.augment import Normalize, channel_stats
    from visionzoo.train.data import EvalResize, load_data

    if split not in ("train", "val"):
        raise ArgumentError(f"split must be 'train' or 'val', got {split!r}")
    if n is not None and n < 1:
        raise ArgumentError(f"n must be >= 1 images, got {n}")
    splits = load_data(spec, data_dir=data_dir, in_chans=getattr(model, "in_chans", 3), seed=seed,
                       **({"limit_train": n} if split == "train" else {"limit_val": n}))
    ds = splits.train if split == "train" else splits.val
    if len(ds) == 0:
        raise ArgumentError(f"{spec}: the {split} split is empty; give a dataset with images")
    dc = getattr(model, "data_config", {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic",
                                        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)})
    size = img_size or dc["input_size"][-1]
    ds.set_transform(EvalResize(size, dc["crop_pct"], dc["interpolation"]))
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    mean, std = channel_stats(dc["mean"], dc["std"], getattr(model, "in_chans", 3))
    x = Normalize(mean, std)(torch.stack(xs))
    return x, torch.tensor(ys)


def calibration_batches(data: str | Tensor, model: nn.Module, n: int = 32, batch_size: int = 16, seed: int = 0,
                        data_dir: str | None = None, img_size: int | None = None) -> list[Tensor]:
    """``n`` calibration images from the training split of ``data`` (a dataset name, see ``labelled_images``) or
    the first ``n`` of a ``(N, C, H, W)`` tensor, in batches of ``batch_size``."""
    if n < 1:
        raise ArgumentError(f"calibration needs at least 1 image, got n={n}")
    if isinstance(data, Tensor):
        x = data[:n]
    else:
        x, _ = labelled_images(data, model, split="train", n=n, seed=seed, data_dir=data_dir, img_size=img_size)
    if x.shape[0] == 0:
        raise ArgumentError("the calibration set is empty; give at least one image")
    return list(x.split(batch_size))
