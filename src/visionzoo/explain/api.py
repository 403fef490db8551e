"""One entry point for every saliency method: ``explain(model, x, method)`` -> maps at the input's size."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from visionzoo.errors import ArgumentError

from .attention import attention_maps, upsample
from .cam import CAM_METHODS, cam, require_logits, resolve_targets
from .rollout import attention_rollout

__all__ = ["ATTENTION_METHODS", "METHODS", "Explanation", "applicable_methods", "explain"]

ATTENTION_METHODS = ("rollout", "attention")
METHODS = CAM_METHODS + ATTENTION_METHODS


@dataclass
class Explanation:
    """``maps`` ``(B, H, W)`` in [0, 1] at the input's size; ``targets`` the explained classes (the prediction for
    the class-agnostic attention methods); ``grid`` the map's native size; ``detail`` what was used."""

    method: str
    maps: Tensor
    targets: Tensor
    grid: tuple[int, int]
    detail: str


def applicable_methods(model: nn.Module) -> tuple[str, ...]:
    """The CAMs for every model; rollout and attention maps for models with softmax attention."""
    if getattr(model, "output", "logits") != "logits":
        return ()  # an image-to-image model has no class logit to explain
    return METHODS if getattr(model, "has_attention", False) else CAM_METHODS


def _normalize(m: Tensor) -> Tensor:
    lo = m.flatten(1).amin(1)[:, None, None]
    hi = m.flatten(1).amax(1)[:, None, None]
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def explain(model: nn.Module, x: Tensor, method: str = "gradcam", target: int | Sequence[int] | Tensor | None = None,
            stage: int | None = None, head_fusion: str = "mean", discard_ratio: float = 0.0) -> Explanation:
    """A saliency map per image of ``x`` (normalised input) by ``method`` (one of ``METHODS``).

    ``stage``: the stage of a CAM (default: the last one the target's gradient reaches). ``head_fusion`` and
    ``discard_ratio``: rollout's. ``"attention"`` is the last attention call's map (the class token's attention,
    or the attention each token receives), averaged over its heads.
    """
    if method not in METHODS:
        raise ArgumentError(f"explain: method must be one of {METHODS}, got {method!r}")
    require_logits(model, "explain")
    if method in ATTENTION_METHODS and method not in applicable_methods(model):
        raise ArgumentError(f"{getattr(model, 'name', type(model).__name__)} has no softmax attention "
                         f"(has_attention=False), so {method!r} does not apply; use one of {CAM_METHODS}")
    if method in CAM_METHODS:
        r = cam(model, x, method, stage, target)
        where = f"stage {r.stage} ({model.stage_info[r.stage].module}), {r.where}"
        return Explanation(method, r.maps, r.targets, r.grid, where)
    with torch.no_grad():
        targets = resolve_targets(model, model(x), target).cpu()
    size = tuple(x.shape[-2:])
    if method == "rollout":
        r = attention_rollout(model, x, head_fusion, discard_ratio)
        detail = f"{len(r.blocks)} attention calls ({r.blocks[0]} .. {r.blocks[-1]}), {head_fusion} fusion"
        return Explanation(method, _normalize(upsample(r.maps, size)), targets, r.grid, detail)
    last = attention_maps(model, x)[-1]
    m = last.maps.mean(1)  # (B, heads, h, w) -> (B, h, w)
    return Explanation(method, _normalize(upsample(m, size)), targets, tuple(m.shape[-2:]),
                       f"{last.name} ({last.kind}, mean of {last.maps.shape[1]} heads)")
