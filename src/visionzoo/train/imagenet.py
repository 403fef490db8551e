"""ImageNet-1k validation folders, read with the class index that pretrained weights use.

The standard layout (``val/n01440764/ILSVRC2012_val_00000293.JPEG``, one folder per synset) names classes by
WordNet synset id. Pretrained classifiers number the 1000 classes in the order of the sorted synset ids
(``visionzoo/data/imagenet_synsets.txt``, the same list timm ships), so a folder maps to its synset's position in
that list, not to its position among the folders present: a subset of the classes still scores correctly.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from visionzoo.backbone import require_logits
from visionzoo.errors import DataError, NotFoundError
from visionzoo.train.data import EvalResize, ImageDataset, _decode, _folder_items, _limit, _mode
from visionzoo.train.metrics import EvalMetrics

__all__ = ["SYNSETS_FILE", "evaluate_imagenet", "imagenet_synsets", "load_imagenet_folder"]

SYNSETS_FILE = Path(__file__).parents[1] / "data" / "imagenet_synsets.txt"


@functools.lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synset ids in class-index order (index 0 is ``n01440764``, tench)."""
    synsets = tuple(SYNSETS_FILE.read_text().split())
    assert len(synsets) == 1000 and list(synsets) == sorted(synsets), "imagenet_synsets.txt is damaged"
    return synsets


def load_imagenet_folder(path: str | Path, in_chans: int = 3, limit: int | None = None, seed: int = 0
                         ) -> ImageDataset:
    """Every image under ``path/<synset>/``, labelled with its synset's ImageNet-1k class index.

    Images are decoded when read (a 50,000-image folder is not scanned up front); an unreadable one stops the
    evaluation with its path. ``limit`` keeps a seeded random subset.
    """
    root = Path(path).expanduser()
    what = f"folder:{path}"
    if not root.is_dir():
        raise NotFoundError(f"{what}: folder {str(root)!r} does not exist; pass the ImageNet validation folder, "
                            f"with one sub-folder per class named by its synset id (n01440764, ...)")
    dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise DataError(f"{what}: {str(root)!r} has no class sub-folders; ImageNet validation images go in "
                        f"{root}/<synset id>/ (e.g. {root}/n01440764/)")
    index = {s: i for i, s in enumerate(imagenet_synsets())}
    unknown = [d for d in dirs if d not in index]
    if unknown:
        hint = f"; did you mean {root / 'val'}?" if (root / "val").is_dir() else ""
        raise DataError(f"{what}: {len(unknown)} of {len(dirs)} class folders are not ImageNet-1k synset ids (e.g. "
                        f"{unknown[:3]}); pretrained weights predict the 1000 ImageNet-1k classes, so the folders "
                        f"must be named by synset, like n01440764{hint}")
    paths, local = _folder_items(root, dirs)
    if not paths:
        raise DataError(f"{what}: the class folders hold no images ({', '.join(dirs[:3])}, ...)")
    targets = [index[dirs[t]] for t in local]
    mode = _mode(in_chans)

    def load(p: str):  # noqa: ANN202
        try:
            return _decode(p, mode)
        except Exception as e:  # noqa: BLE001  (Pillow raises many types for a broken file)
            raise DataError(f"{what}: cannot decode {p} ({type(e).__name__}: {e}); remove or replace it") from None

    ds = ImageDataset(paths, targets, list(imagenet_synsets()), load)
    return _limit(ds, limit, seed)


@torch.no_grad()
def evaluate_imagenet(model: nn.Module, ds: ImageDataset, *, img_size: int, crop_pct: float, interpolation: str,
                      mean: tuple[float, ...], std: tuple[float, ...], batch_size: int = 64, device: str = "cpu",
                      workers: int = 0) -> EvalMetrics:
    """Top-1/top-5/loss of a 1000-class ``model`` on ``ds``, resized as timm evaluates (short side to
    ``img_size / crop_pct``, centre crop)."""
    require_logits(model, "evaluate_imagenet")
    from visionzoo.train.augment import channel_stats
    from visionzoo.train.loop import evaluate

    if getattr(model, "num_classes", 1000) != 1000:
        raise DataError(f"the model has {model.num_classes} classes; ImageNet-1k evaluation needs 1000")
    ds.set_transform(EvalResize(img_size, crop_pct, interpolation))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    m, s = channel_stats(mean, std, model.in_chans)
    return evaluate(model.to(device), loader, 1000, mean=m, std=s, device=device, classes=list(imagenet_synsets()))
