"""Attention maps from any family, through the attention seam (``layers.AttentionCore``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from visionzoo.layers import AttentionCore


@dataclass
class AttentionMap:
    """One attention call's probabilities and what maps them back to the image.

    Attributes:
        name: the module path of the ``AttentionCore`` (its parent is the attention block).
        probs: ``(B', heads, N_q, N_k)``; ``B'`` is the batch times the number of windows for windowed
            attention (and may carry more leading dims for per-query key sets).
        grid: the ``(H, W)`` layout of the non-prefix queries: the window for windowed attention, the token
            grid otherwise (inferred from the input size when the block did not say).
        prefix_tokens: class/distillation tokens ahead of the patch tokens among the queries.
    """

    name: str
    probs: Tensor
    grid: tuple[int, int] | None
    prefix_tokens: int


class AttentionRecorder:
    """Collects an ``AttentionMap`` for every attention call while active; see ``record_attention``."""

    def __init__(self, model: nn.Module, detach: bool = True) -> None:
        self.model = model
        self.detach = detach
        self.maps: list[AttentionMap] = []
        self._input_hw: tuple[int, int] | None = None
        self._cores = [(n, m) for n, m in model.named_modules() if isinstance(m, AttentionCore)]
        if not self._cores:
            name = getattr(model, "name", type(model).__name__)
            raise ValueError(f"{name} has no softmax attention (it declares has_attention=False), so there are no "
                             f"attention maps to record; use a CAM method (visionzoo.explain) for this model")
        self._handle = None

    def __enter__(self) -> AttentionRecorder:
        for name, core in self._cores:
            core.observer = self._observer(name)
        self._handle = self.model.register_forward_pre_hook(self._remember_input)
        return self

    def __exit__(self, *exc: object) -> None:
        for _, core in self._cores:
            core.observer = None
        if self._handle is not None:
            self._handle.remove()

    def clear(self) -> None:
        self.maps.clear()

    def _remember_input(self, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor) and args[0].ndim == 4:
            self._input_hw = tuple(args[0].shape[-2:])

    def _observer(self, name: str):  # noqa: ANN202
        def observe(core: AttentionCore, probs: Tensor, grid: tuple[int, int] | None) -> None:
            if grid is None:
                grid = self._infer_grid(probs.shape[-2] - core.prefix_tokens)
            self.maps.append(AttentionMap(name, probs.detach() if self.detach else probs,
                                          None if grid is None else (int(grid[0]), int(grid[1])), core.prefix_tokens))
        return observe

    def _infer_grid(self, n: int) -> tuple[int, int] | None:
        """The ``(H, W)`` token grid of ``n`` tokens covering the input image at one stride, if there is one."""
        if self._input_hw is None or n <= 0:
            return None
        H, W = self._input_hw
        stride = math.sqrt(H * W / n)
        for s in (math.floor(stride), math.ceil(stride)):
            if s > 0 and math.ceil(H / s) * math.ceil(W / s) == n:
                return math.ceil(H / s), math.ceil(W / s)
        return None


def record_attention(model: nn.Module, detach: bool = True) -> AttentionRecorder:
    """``with record_attention(model) as rec: model(x)``; then ``rec.maps`` lists an ``AttentionMap`` per call.

    Recording switches every attention to the explicit softmax path, which gives the same output as the
    fused kernel (to float rounding). ``detach=False`` keeps the maps in the autograd graph.
    """
    return AttentionRecorder(model, detach)
