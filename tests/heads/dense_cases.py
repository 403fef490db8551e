"""Shared cases of the dense-head shape tests: which backbones a head takes, at which input sides."""
from __future__ import annotations

import visionzoo
from visionzoo.errors import ArgumentError
from visionzoo.heads import DenseModel


def usable(name: str, head: str, **kw):  # noqa: ANN202
    """The DenseModel, or None after checking the clear refusal for a backbone with no power-of-two stride."""
    strides = visionzoo.create_model(name, features_only=True).feature_info.reduction()
    try:
        return DenseModel(name, head, **kw).eval()
    except ArgumentError as e:  # only for a backbone with no power-of-two stride (CrossViT's 18, ViT-ResNAS's 14)
        assert not any(s & (s - 1) == 0 for s in strides) and "power" in str(e), str(e)
        return None


def input_sides(model) -> tuple[int, ...]:  # noqa: ANN001
    """Two input sides, or the one a fixed-size backbone (NiNformer) takes."""
    if getattr(model.backbone, "fixed_input_size", False):
        return (model.backbone.data_config["input_size"][-1],)
    return (max(64, model.min_input_size), max(64, model.min_input_size) + model.input_multiple)
