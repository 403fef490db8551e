"""``DenseModel``: any registered backbone, through ``features_only``, with a dense-prediction head.

The backbone gives NCHW maps with the strides of ``feature_info``; a hierarchical backbone's maps go to the head
as they are, a single-scale one (every map at one stride: plain ViTs) first through a ViTDet simple feature
pyramid (``pyramid.py``). Nothing here knows a family: it reads ``feature_info``, ``input_multiple`` and
``min_input_size`` only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from visionzoo.errors import ArgumentError
from visionzoo.heads.fcos import FCOSHead
from visionzoo.heads.pyramid import NECKS, SimpleFeaturePyramid, check_pyramid, is_single_scale
from visionzoo.heads.seg import FPNSegHead, SegFormerHead, UPerHead
from visionzoo.heads.sr import ESPCNHead

__all__ = ["HEADS", "TASKS", "DenseModel", "register_head"]

TASKS = ("seg", "det", "sr")
# name -> (task, class, finest stride the head accepts)
HEADS: dict[str, tuple[str, type[nn.Module], int | None]] = {
    "fpn": ("seg", FPNSegHead, 8),
    "upernet": ("seg", UPerHead, 8),
    "segformer": ("seg", SegFormerHead, 8),
    "fcos": ("det", FCOSHead, None),
    "espcn": ("sr", ESPCNHead, 8),
}


def register_head(name: str, task: str, cls: type[nn.Module], max_finest_stride: int | None = None) -> None:
    """Make ``cls(channels, strides, num_classes, dim=...)`` available as ``DenseModel(head=name)``."""
    if task not in TASKS:
        raise ArgumentError(f"register_head: task must be one of {TASKS}, got {task!r}")
    HEADS[name] = (task, cls, max_finest_stride)


class _Identity(nn.Module):
    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return feats


def _pow2(s: int) -> bool:
    return s >= 1 and not s & (s - 1)


def _auto_neck(strides: list[int], who: str, head: str, max_finest: int | None) -> tuple[str, list[int] | None]:
    """``neck="auto"``: the backbone's maps where a head can use them, else one map per distinct stride, else a
    simple feature pyramid from one power-of-two map (stride 16 preferred, as ViTDet); ``(neck, maps to keep)``."""
    if is_single_scale(strides):
        return "simple", None
    try:
        check_pyramid(strides, who, head, max_finest)
        return "backbone", None
    except ArgumentError:
        pass
    last = {s: i for i, s in enumerate(strides)}
    distinct = [last[s] for s in sorted(last)]
    try:
        check_pyramid([strides[i] for i in distinct], who, head, max_finest)
        return "backbone", distinct
    except ArgumentError:
        pass
    pow2 = [i for i, s in enumerate(strides) if _pow2(s)]
    if not pow2:
        return "backbone", None  # check_pyramid names the problem
    return "simple", [min(pow2, key=lambda i: (abs(math.log2(strides[i]) - 4), -i))]


class DenseModel(nn.Module):
    """A backbone (a registered name or a ``Backbone``) + a pyramid + a dense head.

    Args:
        backbone: a model name (built with ``features_only=True`` and ``backbone_kwargs``) or a ``Backbone``
            instance (switched to ``features_only`` with ``out_indices``).
        head: one of ``HEADS`` (``fpn``, ``upernet``, ``segformer``; ``fcos``; ``espcn``).
        task: ``seg``, ``det`` or ``sr``; defaults to the head's; given, it must match.
        num_classes: classes of a seg/det head (output channels of an SR head: the image's).
        normalize: inputs are images in [0, 1], normalised here with the backbone's ``data_config`` mean and std
            (an SR head adds its residual to the unnormalised image); ``False``: the caller normalises.
        neck: ``auto`` (the backbone's maps; one per distinct stride where strides repeat; a simple feature
            pyramid when they share one stride or the head cannot use them, built from the power-of-two map nearest
            stride 16), ``backbone`` or ``simple``. With ``out_indices`` given, ``auto`` keeps those maps.
        dim: the head's width.
        head_kwargs: extra arguments of the head (e.g. ``scale`` of ``espcn``).
    """

    def __init__(self, backbone: str | nn.Module, head: str = "upernet", task: str | None = None, *,
                 num_classes: int = 2, normalize: bool = True, neck: str = "auto",
                 out_indices: Sequence[int] | None = None, dim: int = 128,
                 head_kwargs: dict[str, Any] | None = None, **backbone_kwargs: Any) -> None:
        super().__init__()
        if head not in HEADS:
            raise ArgumentError(f"head must be one of {sorted(HEADS)}, got {head!r}")
        head_task, head_cls, max_finest = HEADS[head]
        if task is not None and task != head_task:
            ok = sorted(h for h, (t, _, _) in HEADS.items() if t == task)
            raise ArgumentError(f"head {head!r} is a {head_task} head, not a {task!r} one; {task} heads: {ok}")
        if neck not in NECKS:
            raise ArgumentError(f"neck must be one of {NECKS}, got {neck!r}")
        if num_classes < 1:
            raise ArgumentError(f"num_classes must be >= 1, got {num_classes}")
        if isinstance(backbone, str):
            from visionzoo.registry import create_model

            backbone = create_model(backbone, features_only=True, out_indices=out_indices, **backbone_kwargs)
        elif backbone_kwargs:
            raise ArgumentError(f"backbone keyword arguments {sorted(backbone_kwargs)} are only used with a model "
                                f"name; build the backbone with them instead")
        elif not hasattr(backbone, "set_features_only"):
            raise ArgumentError(f"backbone must be a model name or a visionzoo Backbone, got {type(backbone)}")
        elif backbone.out_indices is None or out_indices is not None:
            backbone.set_features_only(out_indices)
        self.backbone, self.task, self.head_name = backbone, head_task, head
        info = backbone.feature_info
        strides, channels = info.reduction(), info.channels()
        if neck == "auto" and out_indices is not None:  # the user's maps: a pyramid only from a single scale
            neck = "simple" if is_single_scale(strides) else "backbone"
        if neck == "auto":
            neck, pick = _auto_neck(strides, getattr(backbone, "name", ""), head, max_finest)
            if pick is not None:  # a subset of the maps: one per distinct stride, or the pyramid's source map
                backbone.set_features_only([backbone.out_indices[i] for i in pick])
                info = backbone.feature_info
                strides, channels = info.reduction(), info.channels()
        if neck == "simple":
            self.neck = SimpleFeaturePyramid(channels[-1], strides[-1], dim)
            strides, channels = list(self.neck.strides), list(self.neck.channels)
        else:
            self.neck = _Identity()
        check_pyramid(strides, self.name, head, max_finest)
        self.strides, self.channels = list(strides), list(channels)
        self.num_classes = num_classes
        dc = getattr(backbone, "data_config", None) or {}
        mean, std = dc.get("mean", (0.0,) * backbone.in_chans), dc.get("std", (1.0,) * backbone.in_chans)
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.head = head_cls(self.channels, self.strides, num_classes, dim=dim, **(head_kwargs or {}))

    @property
    def name(self) -> str:
        return getattr(self.backbone, "name", type(self.backbone).__name__)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    @property
    def in_chans(self) -> int:
        return self.backbone.in_chans

    @property
    def input_multiple(self) -> int:
        """Every input side must be a multiple of this: the backbone's and the pyramid's coarsest stride."""
        return math.lcm(int(getattr(self.backbone, "input_multiple", 1)), max(self.strides))

    @property
    def min_input_size(self) -> int:
        return max(int(getattr(self.backbone, "min_input_size", 1)), self.input_multiple)

    @property
    def data_config(self) -> dict[str, Any]:
        return self.backbone.data_config

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"{self.name}+{self.head_name}: expected a (B, C, H, W) batch, got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        m, lo = self.input_multiple, self.min_input_size
        if H < lo or W < lo or H % m or W % m:
            raise ValueError(f"{self.name}+{self.head_name}: input {H}x{W} must be at least {lo}x{lo} and a "
                             f"multiple of {m} on each side (the coarsest pyramid stride); resize or pad, e.g. to "
                             f"{max(lo, -(-H // m) * m)}x{max(lo, -(-W // m) * m)}")

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The pyramid the head reads: NCHW maps at ``self.strides``."""
        self.check_input(x)
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.neck(self.backbone(x))

    def forward(self, x: Tensor) -> Any:
        if getattr(self.head, "takes_image", False):
            return self.head(self.forward_features(x), x)
        return self.head(self.forward_features(x), x.shape[-2:])

    def loss(self, output: Any, target: Any) -> Tensor:
        """The task's training loss of ``self(x)`` against ``target``: seg, cross-entropy over ``(B, H, W)`` class
        indices (``ignore_index`` 255); det, the head's loss over per-image ``{"boxes", "labels"}`` dicts; sr, L1
        against the ``(B, C, H, W)`` high-resolution image."""
        if hasattr(self.head, "loss"):
            return self.head.loss(output, target)
        if self.task == "seg":
            return torch.nn.functional.cross_entropy(output, target.long(), ignore_index=255)
        return torch.nn.functional.l1_loss(output, target)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Any:
        """Seg: ``(B, H, W)`` class indices; det: per image ``{"boxes", "scores", "labels"}``; sr: the image."""
        out = self(x)
        if self.task == "seg":
            return out.argmax(1)
        if hasattr(self.head, "postprocess"):
            return self.head.postprocess(out)
        return out
