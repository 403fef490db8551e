"""A synthetic localisation set: one shape per image, with its box, on a random textured background.

The class is the object's fill pattern (horizontal stripes, vertical stripes, checkerboard, diagonal stripes, in
two shades of a random colour, 4-pixel period); its outline (square, disc, triangle, cross), colour, size,
position and the mostly grey background texture are random, so only pixels inside the object tell the class and
an explanation should point at the object. Every image
comes with its tight box ``(x0, y0, x1, y1)`` in pixels (x1, y1 exclusive), for the pointing game and for
TokenCut's CorLoc. Generated with a seeded ``torch.Generator``: the same arguments give the same images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["PATTERNS", "SHAPES", "LocalizationSet", "localization_set", "shapes_splits"]

PATTERNS = ("h-stripes", "v-stripes", "checker", "diagonal")  # the classes
SHAPES = ("square", "disc", "triangle", "cross")  # outlines, random


@dataclass
class LocalizationSet:
    """``images`` uint8 ``(N, 3, S, S)``, ``labels`` ``(N,)``, ``boxes`` ``(N, 4)`` as ``(x0, y0, x1, y1)``."""

    images: Tensor
    labels: Tensor
    boxes: Tensor
    classes: tuple[str, ...] = PATTERNS

    def masks(self) -> Tensor:
        """``(N, S, S)`` booleans: True inside each image's box."""
        N, _, S, _ = self.images.shape
        ys, xs = torch.arange(S)[None, :, None], torch.arange(S)[None, None, :]
        b = self.boxes[:, :, None, None]
        return (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])


def _texture(g: torch.Generator, ys: Tensor, xs: Tensor, noise: Tensor) -> Tensor:
    """A ``(3, S, S)`` background in [0, 1]: three random colour gratings plus the smoothed ``noise``."""
    img = torch.rand(3, 1, 1, generator=g) * 0.4 + 0.3
    for _ in range(3):
        theta = torch.rand(1, generator=g).item() * math.pi
        freq = (torch.rand(1, generator=g).item() * 0.25 + 0.08)
        phase = torch.rand(1, generator=g).item() * 2 * math.pi
        wave = torch.sin(freq * (xs * math.cos(theta) + ys * math.sin(theta)) + phase)  # (S, S)
        img = img + 0.08 * (torch.rand(3, 1, 1, generator=g) - 0.5) * 2 * wave
    img = (img + 0.1 * (noise - 0.5)).clamp(0, 1)
    return 0.75 * img.mean(0, keepdim=True) + 0.25 * img  # mostly grey: the object's colour stands out


def _shape_mask(kind: str, ys: Tensor, xs: Tensor, cx: float, cy: float, r: float) -> Tensor:
    """Boolean ``(S, S)`` mask of a shape of half-size ``r`` centred at ``(cx, cy)`` (pixel centres ``ys, xs``)."""
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    if kind == "square":
        return (dx.abs() <= r) & (dy.abs() <= r)
    if kind == "disc":
        return dx**2 + dy**2 <= r**2
    if kind == "triangle":  # apex up, base at the bottom
        t = (dy + r) / (2 * r)  # 0 at the apex row, 1 at the base
        return (dy >= -r) & (dy <= r) & (dx.abs() <= r * t)
    if kind == "cross":
        arm = r / 3
        return ((dx.abs() <= r) & (dy.abs() <= arm)) | ((dy.abs() <= r) & (dx.abs() <= arm))
    raise ValueError(f"shape must be one of {SHAPES}, got {kind!r}")


def _pattern(kind: str, ys: Tensor, xs: Tensor, period: int = 4) -> Tensor:
    """Boolean ``(S, S)``: where the fill pattern takes its second shade."""
    half = period // 2
    if kind == "h-stripes":
        return (ys.long() // half) % 2 == 1
    if kind == "v-stripes":
        return (xs.long() // half) % 2 == 1
    if kind == "checker":
        return ((ys.long() // half) + (xs.long() // half)) % 2 == 1
    return ((ys.long() + xs.long()) // half) % 2 == 1  # diagonal


def localization_set(n: int, img_size: int = 64, seed: int = 0, min_size: float = 0.3, max_size: float = 0.5
                     ) -> LocalizationSet:
    """``n`` images of ``img_size`` px, classes balanced; object sides are ``min_size..max_size`` of the image, fully
    inside it, in a random saturated colour (and that colour darkened for the pattern) that differs from the
    background around it."""
    if n < 1:
        raise ValueError(f"localization_set: n must be >= 1, got {n}")
    if img_size < 16:
        raise ValueError(f"localization_set: img_size must be >= 16, got {img_size}")
    if not 0 < min_size <= max_size < 1:
        raise ValueError(f"localization_set: need 0 < min_size <= max_size < 1, got {min_size}, {max_size}")
    g = torch.Generator().manual_seed(seed)
    S = img_size
    images = torch.empty(n, 3, S, S, dtype=torch.uint8)
    labels = torch.arange(n) % len(PATTERNS)
    labels = labels[torch.randperm(n, generator=g)]
    boxes = torch.empty(n, 4, dtype=torch.long)
    ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    noise = torch.rand(n, 3, S // 4, S // 4, generator=g)
    noise = torch.nn.functional.interpolate(noise, size=(S, S), mode="bilinear", align_corners=False)
    for i in range(n):
        img = _texture(g, ys, xs, noise[i])
        side = (min_size + (max_size - min_size) * torch.rand(1, generator=g).item()) * S
        r = side / 2
        cx = r + 1 + torch.rand(1, generator=g).item() * (S - 2 * r - 2)
        cy = r + 1 + torch.rand(1, generator=g).item() * (S - 2 * r - 2)
        mask = _shape_mask(SHAPES[torch.randint(len(SHAPES), (1,), generator=g).item()], ys, xs, cx, cy, r)
        bg = img[:, mask].mean(1)
        colour = torch.rand(3, generator=g)
        while colour.max() - colour.min() < 0.5 or (colour - bg).abs().max() < 0.35:  # saturated, and visible
            colour = torch.rand(3, generator=g)
        fill = torch.where(_pattern(PATTERNS[labels[i]], ys, xs), colour[:, None, None] * 0.45, colour[:, None, None])
        img[:, mask] = fill[:, mask]
        images[i] = (img * 255).round().to(torch.uint8)
        rows, cols = torch.nonzero(mask, as_tuple=True)
        boxes[i] = torch.stack([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    return LocalizationSet(images, labels, boxes)


def shapes_splits(n_train: int = 2000, n_val: int = 500, img_size: int = 64, seed: int = 0):  # noqa: ANN201
    """The localisation set as training ``DataSplits`` (``--data shapes``); validation images use seed + 1."""
    from visionzoo.train.data import DataSplits, ImageDataset, _array_loader

    load = _array_loader("RGB")
    parts = []
    for n, s in ((n_train, seed), (n_val, seed + 1)):
        ds = localization_set(n, img_size, s)
        arr = ds.images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, 3, S, S) -> (N, S, S, 3)
        parts.append(ImageDataset(np.asarray(arr), ds.labels.tolist(), PATTERNS, load, cache=True))
    return DataSplits(parts[0], parts[1], list(PATTERNS), 3, (img_size, img_size), "shapes")
