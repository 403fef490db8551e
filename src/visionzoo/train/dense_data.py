"""Offline data for dense tasks: procedural shape scenes, mask/box folders, super-resolution pairs.

- ``shapes_scenes``: seeded images of 1..``max_objects`` shapes (square, disc, triangle, cross: the classes) on the
  random grey textures of ``synthetic.py``, each in a random saturated colour, with a class mask (0 = background,
  ``k + 1`` = class ``k``) and a tight box per object. Objects do not overlap (``overlap=False``, the easy
  setting) or may (later ones paint over earlier ones; boxes follow the visible pixels).
- Folders: ``images/`` + ``masks/`` (PNG, one class index per pixel, 255 = ignore; ``classes.txt`` optional) for
  segmentation; ``images/`` + ``annotations.json`` (COCO: ``images``, ``annotations`` with ``bbox`` = x, y, w, h,
  ``categories``) for detection; ``write_*`` make both from a ``DenseSet``. Images are resized to ``img_size``
  (masks with nearest neighbour, boxes scaled).
- ``sr_pairs``: high-resolution centre crops of any image folder and their bicubic ``scale``-times downscales.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from visionzoo.errors import DataError, NotFoundError
from visionzoo.train.data import IMG_EXTENSIONS
from visionzoo.train.synthetic import SHAPES, _shape_mask, _texture

__all__ = ["DenseDataset", "DenseSet", "load_dense_data", "read_coco", "read_seg_folder", "shapes_scenes", "sr_pairs",
           "write_coco", "write_seg_folder"]


@dataclass
class DenseSet:
    """``images`` uint8 ``(N, 3, S, S)``; ``masks`` uint8 ``(N, S, S)`` or None; per image ``boxes (M, 4)`` float
    ``(x0, y0, x1, y1)`` and ``labels (M,)`` (0-based classes); ``classes`` names (no background)."""

    images: Tensor
    masks: Tensor | None
    boxes: list[Tensor]
    labels: list[Tensor]
    classes: tuple[str, ...]
    hr: Tensor | None = field(default=None, repr=False)  # SR targets (N, 3, rS, rS) uint8

    def __len__(self) -> int:
        return len(self.images)


def shapes_scenes(n: int, img_size: int = 128, seed: int = 0, max_objects: int = 3, min_size: float = 0.15,
                  max_size: float = 0.35, overlap: bool = False) -> DenseSet:
    """``n`` seeded scenes (see the module docstring); object sides are ``min_size..max_size`` of the image."""
    if n < 1 or max_objects < 1:
        raise DataError(f"shapes_scenes: n and max_objects must be >= 1, got {n}, {max_objects}")
    if img_size < 32:
        raise DataError(f"shapes_scenes: img_size must be >= 32, got {img_size}")
    if not 0 < min_size <= max_size < 1:
        raise DataError(f"shapes_scenes: need 0 < min_size <= max_size < 1, got {min_size}, {max_size}")
    g = torch.Generator().manual_seed(seed)
    S = img_size
    ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    noise = torch.nn.functional.interpolate(torch.rand(n, 3, S // 4, S // 4, generator=g), size=(S, S),
                                            mode="bilinear", align_corners=False)
    images = torch.empty(n, 3, S, S, dtype=torch.uint8)
    masks = torch.zeros(n, S, S, dtype=torch.uint8)
    all_boxes, all_labels = [], []
    for i in range(n):
        img = _texture(g, ys, xs, noise[i])
        k = int(torch.randint(1, max_objects + 1, (1,), generator=g))
        placed: list[tuple[float, float, float, float]] = []
        obj_masks, obj_labels = [], []
        for _ in range(k):
            for _try in range(30):
                r = (min_size + (max_size - min_size) * torch.rand(1, generator=g).item()) * S / 2
                cx = r + 1 + torch.rand(1, generator=g).item() * (S - 2 * r - 2)
                cy = r + 1 + torch.rand(1, generator=g).item() * (S - 2 * r - 2)
                box = (cx - r, cy - r, cx + r, cy + r)
                if overlap or all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]
                                  for b in placed):
                    break
            else:
                continue  # no room left for another object
            placed.append(box)
            c = int(torch.randint(len(SHAPES), (1,), generator=g))
            m = _shape_mask(SHAPES[c], ys, xs, cx, cy, r)
            bg = img[:, m].mean(1)
            colour = torch.rand(3, generator=g)
            while colour.max() - colour.min() < 0.5 or (colour - bg).abs().max() < 0.35:
                colour = torch.rand(3, generator=g)
            img[:, m] = colour[:, None]
            masks[i][m] = c + 1
            obj_masks.append(m)
            obj_labels.append(c)
        boxes, labels = [], []
        for j, (m, c) in enumerate(zip(obj_masks, obj_labels)):
            visible = m & (masks[i] == c + 1)
            for later in obj_masks[j + 1:]:
                visible &= ~later
            if visible.any():
                rows, cols = torch.nonzero(visible, as_tuple=True)
                boxes.append([cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1])
                labels.append(c)
        images[i] = (img * 255).round().to(torch.uint8)
        all_boxes.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        all_labels.append(torch.tensor(labels, dtype=torch.long))
    return DenseSet(images, masks, all_boxes, all_labels, SHAPES)


# --- folders -------------------------------------------------------------------------------------------------
def _images(root: Path) -> list[Path]:
    if not root.is_dir():
        raise NotFoundError(f"folder {str(root)!r} does not exist")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
    return files


def _load_rgb(path: Path, size: int | None) -> tuple[Tensor, tuple[int, int]]:
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1), (w, h)  # (H, W, 3) -> (3, H, W)


def write_seg_folder(ds: DenseSet, root: str | os.PathLike) -> Path:
    """``root/images/00000.png``, ``root/masks/00000.png`` (class index per pixel) and ``root/classes.txt``."""
    if ds.masks is None:
        raise DataError("write_seg_folder: the set has no masks")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(len(ds)):
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(root / "images" / f"{i:05d}.png")
        Image.fromarray(ds.masks[i].numpy(), mode="L").save(root / "masks" / f"{i:05d}.png")
    (root / "classes.txt").write_text("\n".join(ds.classes) + "\n")
    return root


def read_seg_folder(root: str | os.PathLike, img_size: int | None = None) -> DenseSet:
    """A folder of ``images/`` and same-named PNG ``masks/`` (0 = background, k = class k - 1, 255 = ignore)."""
    root = Path(root)
    files = _images(root / "images")
    images, masks = [], []
    for f in files:
        mpath = root / "masks" / (f.stem + ".png")
        if not mpath.is_file():
            raise DataError(f"{root}: image {f.name} has no mask masks/{f.stem}.png; give every image a PNG mask")
        img, _ = _load_rgb(f, img_size)
        with Image.open(mpath) as m:
            if m.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"{mpath}: masks must be single-channel PNGs of class indices, got mode {m.mode}")
            if img_size is not None and m.size != (img_size, img_size):
                m = m.resize((img_size, img_size), Image.Resampling.NEAREST)
            masks.append(torch.from_numpy(np.asarray(m, dtype=np.uint8).copy()))
        images.append(img)
    if len({tuple(i.shape) for i in images}) > 1:
        raise DataError(f"{root}: images have different sizes; pass img_size to resize them")
    mk = torch.stack(masks)
    names = root / "classes.txt"
    if names.is_file():
        classes = tuple(line.strip() for line in names.read_text().splitlines() if line.strip())
    else:
        classes = tuple(str(c) for c in range(int(mk[mk != 255].max()) if (mk != 255).any() else 1))
    if (mk != 255).any() and int(mk[mk != 255].max()) > len(classes):
        raise DataError(f"{root}: masks hold class {int(mk[mk != 255].max())} but classes.txt names "
                        f"{len(classes)} classes (mask values are 0 = background, 1..{len(classes)}, 255 = ignore)")
    empty = [torch.zeros(0, 4)] * len(images)
    return DenseSet(torch.stack(images), mk, empty, [torch.zeros(0, dtype=torch.long)] * len(images), classes)


def write_coco(ds: DenseSet, root: str | os.PathLike) -> Path:
    """``root/images/*.png`` and ``root/annotations.json`` (COCO boxes ``[x, y, w, h]``, category ids from 1)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(len(ds)):
        name = f"{i:05d}.png"
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(root / "images" / name)
        images.append(dict(id=i + 1, file_name=name, width=ds.images.shape[-1], height=ds.images.shape[-2]))
        for b, c in zip(ds.boxes[i].tolist(), ds.labels[i].tolist()):
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=c + 1, iscrowd=0,
                             bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]], area=(b[2] - b[0]) * (b[3] - b[1])))
    cats = [dict(id=k + 1, name=n) for k, n in enumerate(ds.classes)]
    path = root / "annotations.json"
    path.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return path


def read_coco(root: str | os.PathLike, img_size: int | None = None, ann_file: str = "annotations.json") -> DenseSet:
    """Images and COCO-style boxes (crowd boxes dropped); categories are renumbered 0..K-1 in id order."""
    root = Path(root)
    path = root / ann_file
    if not path.is_file():
        raise NotFoundError(f"{root}: no {ann_file}; a detection folder needs images/ and a COCO-style {ann_file}")
    try:
        coco = json.loads(path.read_text())
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        entries = coco["images"]
        anns = coco.get("annotations", [])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a COCO annotation file ({e}); it needs 'images', 'annotations' and "
                        f"'categories'") from None
    cat_index = {c["id"]: k for k, c in enumerate(cats)}
    per_image: dict[int, list[dict]] = {}
    for a in anns:
        if not a.get("iscrowd", 0):
            if a["category_id"] not in cat_index:
                raise DataError(f"{path}: annotation {a.get('id')} has category_id {a['category_id']}, which is "
                                f"not in 'categories'")
            per_image.setdefault(a["image_id"], []).append(a)
    images, boxes, labels = [], [], []
    for e in entries:
        f = root / "images" / e["file_name"]
        if not f.is_file():
            raise NotFoundError(f"{path}: image {e['file_name']} is not in {root / 'images'}")
        img, (w, h) = _load_rgb(f, img_size)
        sx, sy = (img_size / w, img_size / h) if img_size else (1.0, 1.0)
        b = [[x * sx, y * sy, (x + bw) * sx, (y + bh) * sy] for x, y, bw, bh in (a["bbox"] for a in
                                                                               per_image.get(e["id"], []))]
        images.append(img)
        boxes.append(torch.tensor(b, dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.tensor([cat_index[a["category_id"]] for a in per_image.get(e["id"], [])],
                                   dtype=torch.long))
    if not images:
        raise DataError(f"{path}: lists no images")
    if len({tuple(i.shape) for i in images}) > 1:
        raise DataError(f"{root}: images have different sizes; pass img_size to resize them")
    return DenseSet(torch.stack(images), None, boxes, labels, tuple(c["name"] for c in cats))


def sr_pairs(source: str | os.PathLike | Tensor, scale: int = 2, hr_size: int = 128) -> DenseSet:
    """Low/high-resolution pairs: a centre ``hr_size`` crop of each image (an image folder, or a uint8
    ``(N, 3, H, W)`` tensor) and its bicubic (antialiased, Pillow) downscale by ``scale``."""
    if scale < 2 or hr_size % scale:
        raise DataError(f"sr_pairs: scale must be >= 2 and divide hr_size, got scale={scale}, hr_size={hr_size}")
    if isinstance(source, Tensor):
        pils = [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in source]
    else:
        pils = []
        for f in _images(Path(source)):
            with Image.open(f) as im:
                pils.append(im.convert("RGB"))
    lr, hr = [], []
    for im in pils:
        w, h = im.size
        if min(w, h) < hr_size:
            im = im.resize((max(hr_size, w * hr_size // min(w, h)), max(hr_size, h * hr_size // min(w, h))),
                           Image.Resampling.BICUBIC)
            w, h = im.size
        left, top = (w - hr_size) // 2, (h - hr_size) // 2
        crop = im.crop((left, top, left + hr_size, top + hr_size))
        small = crop.resize((hr_size // scale, hr_size // scale), Image.Resampling.BICUBIC)
        hr.append(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1))
        lr.append(torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1))
    n = len(lr)
    return DenseSet(torch.stack(lr), None, [torch.zeros(0, 4)] * n, [torch.zeros(0, dtype=torch.long)] * n, (),
                    hr=torch.stack(hr))


class DenseDataset(Dataset):
    """``(image float (3, S, S) in [0, 1], target)`` for ``task``: seg, a ``(S, S)`` long mask of classes 0..K
    (0 = background, 255 = ignore); det, ``{"boxes", "labels"}``; sr, the high-resolution image in [0, 1]."""

    def __init__(self, ds: DenseSet, task: str) -> None:
        if task == "seg" and ds.masks is None:
            raise DataError("task seg needs masks; this set has boxes only (a COCO folder or an SR set)")
        if task == "sr" and ds.hr is None:
            raise DataError("task sr needs high-resolution targets; build the set with sr_pairs")
        if task not in ("seg", "det", "sr"):
            raise DataError(f"task must be one of ('seg', 'det', 'sr'), got {task!r}")
        self.ds, self.task = ds, task

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Tensor, object]:
        x = self.ds.images[i].float() / 255
        if self.task == "seg":
            return x, self.ds.masks[i].long()
        if self.task == "sr":
            return x, self.ds.hr[i].float() / 255
        return x, {"boxes": self.ds.boxes[i], "labels": self.ds.labels[i]}

    @staticmethod
    def collate(batch: list[tuple[Tensor, object]]) -> tuple[Tensor, object]:
        xs, ts = zip(*batch)
        return torch.stack(xs), (list(ts) if isinstance(ts[0], dict) else torch.stack(ts))


DENSE_SOURCES = ("shapes", "folder:PATH")


def load_dense_data(spec: str, task: str, img_size: int | None = None, seed: int = 0, limit_train: int | None = None,
                    limit_val: int | None = None, val_split: float = 0.2, sr_scale: int = 2
                    ) -> tuple[DenseSet, DenseSet]:
    """Train and validation ``DenseSet`` for ``task`` from ``spec``.

    ``shapes``: ``shape_scenes`` at ``img_size`` (default 128), ``limit_train`` (2000) and ``limit_val`` (500)
    images, validation seeded ``seed + 1``; for sr, their images as ``sr_pairs`` (the input is ``img_size /
    sr_scale``). ``folder:PATH``: ``PATH`` (or ``PATH/train`` and ``PATH/val``) as a mask folder (seg), a COCO folder
    (det) or any image folder (sr); without a ``val`` folder, a seeded ``val_split`` of the images.
    """
    size = img_size or 128
    if spec == "shapes":
        tr = shapes_scenes(limit_train or 2000, size, seed)
        va = shapes_scenes(limit_val or 500, size, seed + 1)
        if task == "sr":
            return sr_pairs(tr.images, sr_scale, size), sr_pairs(va.images, sr_scale, size)
        return tr, va
    if not spec.startswith("folder:") or len(spec) <= 7:
        raise DataError(f"--data for --task {task} must be one of {', '.join(DENSE_SOURCES)}, got {spec!r}")
    root = Path(spec[7:]).expanduser()
    if not root.is_dir():
        raise NotFoundError(f"--data {spec}: folder {str(root)!r} does not exist")

    def read(r: Path) -> DenseSet:
        if task == "seg":
            return read_seg_folder(r, img_size)
        if task == "det":
            return read_coco(r, img_size)
        return sr_pairs(r / "images" if (r / "images").is_dir() else r, sr_scale, size)

    if (root / "train").is_dir() and (root / "val").is_dir():
        tr, va = read(root / "train"), read(root / "val")
    else:
        full = read(root)
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
        k = max(1, round(val_split * len(full)))
        if len(full) - k < 1:
            raise DataError(f"--data {spec}: {len(full)} image(s) cannot be split into train and val; add images or "
                            f"give train/ and val/ folders")
        tr, va = _subset(full, sorted(perm[k:])), _subset(full, sorted(perm[:k]))
    return _limit(tr, limit_train, seed), _limit(va, limit_val, seed + 1)


def _subset(ds: DenseSet, idx: list[int]) -> DenseSet:
    return DenseSet(ds.images[idx], None if ds.masks is None else ds.masks[idx], [ds.boxes[i] for i in idx],
                    [ds.labels[i] for i in idx], ds.classes, None if ds.hr is None else ds.hr[idx])


def _limit(ds: DenseSet, n: int | None, seed: int) -> DenseSet:
    if n is None or n >= len(ds):
        return ds
    return _subset(ds, sorted(torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()))
