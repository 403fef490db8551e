"""Cosine learning-rate schedule with linear warm-up, stepped once per optimiser step."""
from __future__ import annotations

import math
from typing import Any

from visionzoo.errors import ArgumentError

__all__ = ["CosineWarmup"]


class CosineWarmup:
    """lr rises linearly from ``warmup_lr`` to ``base_lr`` over ``warmup_steps``, then follows a half cosine down
    to ``min_lr`` at ``total_steps``. Each param group gets ``lr * group["lr_scale"]`` (layer-wise decay).

    Its state is one integer, so a checkpoint restores it exactly.
    """

    def __init__(self, optimizer: Any, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr: float = 0.0,
                 warmup_lr: float = 0.0) -> None:
        if total_steps < 1:
            raise ArgumentError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ArgumentError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        if min_lr < 0 or min_lr > base_lr:
            raise ArgumentError(f"min_lr must be in [0, lr={base_lr}], got {min_lr}")
        self.optimizer, self.total_steps, self.warmup_steps = optimizer, total_steps, warmup_steps
        self.base_lr, self.min_lr, self.warmup_lr = base_lr, min_lr, warmup_lr
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))

    def _apply(self) -> None:
        lr = self.lr_at(self.last_step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
