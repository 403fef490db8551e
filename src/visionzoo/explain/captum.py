"""captum adapters (optional: ``pip install 'visionzoo[captum]'``): captum's layer methods on any stage of any
family, on the NCHW map, without a reshape function.

    from captum.attr import LayerGradCam
    with captum_layer(model, x, stage=-2) as layer:  # an nn.Identity the stage's NCHW map flows through
        attr = LayerGradCam(model, layer).attribute(x, target=3)  # (B, 1, h, w)

The layer is ``StageTap.nchw`` (see ``cam.py``): while the context is open, the stage's output is rebuilt from its
NCHW view after that identity, so captum sees and differentiates an ordinary ``(B, C, h, w)`` layer output.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from visionzoo.errors import VisionZooError

from .cam import StageTap, default_stage

__all__ = ["captum_layer"]


class MissingCaptum(VisionZooError, ImportError):
    """captum is not installed."""


@contextmanager
def captum_layer(model: nn.Module, x: Tensor, stage: int | None = None) -> Iterator[nn.Module]:
    """Yield the ``nn.Identity`` on stage ``stage``'s NCHW map (default: ``cam.default_stage``) for captum."""
    try:
        import captum  # noqa: F401
    except ImportError as e:
        raise MissingCaptum("the captum adapters need captum: pip install 'visionzoo[captum]'") from e
    tap = StageTap(model, default_stage(model) if stage is None else stage).prepare(x)
    with tap:
        yield tap.nchw
