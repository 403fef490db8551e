"""Batch augmentation with kornia, on ``uint8`` batches from ``data.make_loaders``, and soft-target losses.

Training: random resized crop, horizontal flip, colour jitter, RandAugment or TrivialAugment, then normalise,
then mixup or cutmix, with label smoothing in the targets. Evaluation: normalise only (the resize and centre
crop follow the variant's ``crop_pct`` in ``data.EvalResize``). All randomness comes from torch's global
generator, so a seeded run is repeatable and a resumed one continues exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.errors import ArgumentError, MissingDependencyError

__all__ = ["AugConfig", "Normalize", "TrainAugment", "channel_stats", "soft_cross_entropy"]

AUTO_AUGMENT = ("none", "rand", "trivial")


@dataclass
class AugConfig:
    """Training augmentation. ``mixup`` / ``cutmix`` are the probabilities that a batch is mixed (kornia's ``p``);
    when both are set, each batch gets one of the two. ``smoothing`` is the label-smoothing factor."""

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: str = "none"
    ra_n: int = 2
    ra_m: int = 9
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.1

    def validate(self) -> AugConfig:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ArgumentError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        for k in ("hflip", "mixup", "cutmix"):
            if not 0 <= getattr(self, k) <= 1:
                raise ArgumentError(f"{k} is a probability in [0, 1], got {getattr(self, k)}")
        if not 0 <= self.smoothing < 1:
            raise ArgumentError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if self.color_jitter < 0:
            raise ArgumentError(f"color_jitter must be >= 0, got {self.color_jitter}")
        if self.auto_augment not in AUTO_AUGMENT:
            raise ArgumentError(f"auto_augment must be one of {AUTO_AUGMENT}, got {self.auto_augment!r}")
        return self


def channel_stats(mean: tuple[float, ...], std: tuple[float, ...], in_chans: int) -> tuple[list[float], list[float]]:
    """The variant's mean/std fitted to ``in_chans`` (their average for grey input, tiled otherwise)."""
    if in_chans == len(mean):
        return list(mean), list(std)
    if in_chans == 1:
        return [sum(mean) / len(mean)], [sum(std) / len(std)]
    return [mean[i % len(mean)] for i in range(in_chans)], [std[i % len(std)] for i in range(in_chans)]


class Normalize(nn.Module):
    """``uint8`` or ``[0, 1]`` float batch -> ``(x - mean) / std``."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        return (x - self.mean) / self.std


def _one_hot(y: Tensor, num_classes: int) -> Tensor:
    return F.one_hot(y.long(), num_classes).float()


class TrainAugment(nn.Module):
    """kornia geometric + photometric augmentation, normalisation, then mixup/cutmix into soft targets."""

    def __init__(self, cfg: AugConfig, size: int, mean: list[float], std: list[float], num_classes: int) -> None:
        super().__init__()
        try:
            import kornia.augmentation as K
            from kornia.augmentation import auto
        except ImportError as e:
            raise MissingDependencyError("training augmentation needs kornia: pip install 'visionzoo[train]'") from e
        cfg.validate()
        self.cfg, self.num_classes = cfg, num_classes
        ops: list[nn.Module] = [K.RandomResizedCrop((size, size), scale=cfg.scale, ratio=cfg.ratio,
                                                    resample="bicubic", align_corners=False)]
        if cfg.hflip > 0:
            ops.append(K.RandomHorizontalFlip(p=cfg.hflip))
        if cfg.color_jitter > 0:
            j = cfg.color_jitter
            ops.append(K.ColorJitter(j, j, j if len(mean) == 3 else 0.0, 0.0, p=0.8))
        self.geometric = nn.Sequential(*ops)
        self.auto = {"none": None, "rand": lambda: auto.RandAugment(n=cfg.ra_n, m=cfg.ra_m),
                     "trivial": auto.TrivialAugment}[cfg.auto_augment]
        self.auto = self.auto() if self.auto else None
        self.normalize = Normalize(mean, std)
        self.mixup = K.RandomMixUpV2(lambda_val=(0.0, 1.0), p=1.0, data_keys=["input", "class"]) \
            if cfg.mixup > 0 else None
        self.cutmix = K.RandomCutMixV2(p=1.0, data_keys=["input", "class"], use_correct_lambda=True) \
            if cfg.cutmix > 0 else None

    def mix(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mixup or cutmix (or neither) -> ``(x, targets (B, num_classes))``, before label smoothing."""
        p_mix, p_cut = self.cfg.mixup, self.cfg.cutmix
        u = float(torch.rand(()))
        if self.mixup is not None and u < p_mix * (1 if p_cut == 0 else 0.5):
            x, lab = self.mixup(x, y)
            # NOTE: kornia 0.9 mixup returns (y_a, y_b, lam) with x = (1 - lam) x_a + lam x_b
            lam = lab[:, 2:3]
            return x, (1 - lam) * _one_hot(lab[:, 0], self.num_classes) + lam * _one_hot(lab[:, 1], self.num_classes)
        if self.cutmix is not None and (1 - u) <= p_cut * (1 if p_mix == 0 else 0.5):
            x, lab = self.cutmix(x, y)
            lab = lab[-1]  # (num_mix, B, 3) -> (B, 3)
            # NOTE: kornia 0.9 cutmix (use_correct_lambda) returns lam = the area kept from x_a
            lam = lab[:, 2:3]
            return x, lam * _one_hot(lab[:, 0], self.num_classes) + (1 - lam) * _one_hot(lab[:, 1], self.num_classes)
        return x, _one_hot(y, self.num_classes)

    @torch.no_grad()
    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``uint8 (B, C, H, W)`` and labels -> normalised ``(B, C, size, size)`` and soft targets ``(B, K)``."""
        x = self.geometric(x.float().div_(255))
        if self.auto is not None:
            x = self.auto(x).clamp_(0, 1)
        x, t = self.mix(self.normalize(x), y)
        if self.cfg.smoothing > 0:
            t = t * (1 - self.cfg.smoothing) + self.cfg.smoothing / self.num_classes
        return x, t


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy against probabilities ``(B, K)`` or class indices ``(B,)``, computed in float32."""
    logits = logits.float()
    if target.ndim == 1:
        return F.cross_entropy(logits, target)
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
