"""Shape scenes, mask/COCO folders (round trip) and SR pairs."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from visionzoo.errors import DataError, NotFoundError
from visionzoo.train.dense_data import (
    DenseDataset,
    read_coco,
    read_seg_folder,
    shapes_scenes,
    sr_pairs,
    write_coco,
    write_seg_folder,
)


def test_shapes_scenes_seeded_and_consistent():
    a, b = shapes_scenes(6, 64, seed=3), shapes_scenes(6, 64, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, shapes_scenes(6, 64, seed=4).images)
    assert a.images.shape == (6, 3, 64, 64) and a.masks.shape == (6, 64, 64)
    for i in range(6):
        assert 1 <= len(a.boxes[i]) <= 3
        for box, c in zip(a.boxes[i].long().tolist(), a.labels[i].tolist()):
            x0, y0, x1, y1 = box
            inside = a.masks[i, y0:y1, x0:x1] == c + 1
            # the box is tight: the object's pixels touch all four sides
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        # non-overlapping (the easy setting): every object pixel is inside its own class's box
        classes_in_mask = set(a.masks[i].unique().tolist()) - {0}
        assert classes_in_mask == {c + 1 for c in a.labels[i].tolist()}


def test_seg_folder_round_trip(tmp_path):
    ds = shapes_scenes(3, 64, seed=0)
    write_seg_folder(ds, tmp_path)
    back = read_seg_folder(tmp_path)
    assert torch.equal(back.images, ds.images) and torch.equal(back.masks, ds.masks)
    assert back.classes == ds.classes
    small = read_seg_folder(tmp_path, img_size=32)
    assert small.images.shape == (3, 3, 32, 32) and set(small.masks.unique().tolist()) <= set(range(5))
    (tmp_path / "masks" / "00001.png").unlink()
    with pytest.raises(DataError, match="00001.png has no mask"):
        read_seg_folder(tmp_path)


def test_coco_round_trip(tmp_path):
    ds = shapes_scenes(3, 64, seed=0)
    path = write_coco(ds, tmp_path)
    coco = json.loads(path.read_text())
    assert coco["annotations"][0]["bbox"][2] == ds.boxes[0][0, 2] - ds.boxes[0][0, 0]  # (x, y, w, h)
    back = read_coco(tmp_path)
    assert back.classes == ds.classes and torch.equal(back.images, ds.images)
    for b1, b2, l1, l2 in zip(back.boxes, ds.boxes, back.labels, ds.labels):
        assert torch.equal(b1, b2) and torch.equal(l1, l2)
    half = read_coco(tmp_path, img_size=32)
    assert torch.allclose(half.boxes[0], ds.boxes[0] / 2)
    with pytest.raises(NotFoundError, match="annotations.json"):
        read_coco(tmp_path / "images")


def test_sr_pairs_from_folder(tmp_path):
    for i in range(2):
        Image.fromarray((torch.rand(80, 100, 3) * 255).byte().numpy()).save(tmp_path / f"{i}.png")
    ds = sr_pairs(tmp_path, scale=2, hr_size=64)
    assert ds.images.shape == (2, 3, 32, 32) and ds.hr.shape == (2, 3, 64, 64)
    x, hr = DenseDataset(ds, "sr")[0]
    assert x.max() <= 1 and hr.shape == (3, 64, 64)
    with pytest.raises(DataError, match="scale must be >= 2 and divide hr_size"):
        sr_pairs(tmp_path, scale=3, hr_size=64)


def test_dense_dataset_targets():
    ds = shapes_scenes(4, 64, seed=0)
    x, batch = DenseDataset.collate([DenseDataset(ds, "det")[i] for i in range(2)])
    assert x.shape == (2, 3, 64, 64) and isinstance(batch, list) and set(batch[0]) == {"boxes", "labels"}
    _, masks = DenseDataset.collate([DenseDataset(ds, "seg")[i] for i in range(2)])
    assert masks.shape == (2, 64, 64) and masks.dtype == torch.long
    with pytest.raises(DataError, match="task sr needs"):
        DenseDataset(ds, "sr")
