"""Parity fixtures for ViT and DeiT against timm 1.0.31.

Reference: ``timm.models.vision_transformer.VisionTransformer`` and ``timm.models.deit.VisionTransformerDistilled``
(timm 1.0.31). The official DeiT repository builds its models from timm's VisionTransformer, so the timm layout is
also the official one. Writes three fixtures to tests/fixtures/:

- ``vit_tiny``: a tiny ViT (patch 8, dim 32, depth 2, 2 heads, 32 px) on a 32 px input;
- ``vit_tiny_dynsize``: the same model built with ``dynamic_img_size=True``, run on a 48x40 input, so the
  position table is resampled (bicubic, antialiased) from 4x4 to 6x5;
- ``deit_tiny_distilled``: the distilled DeiT of the same size (class + distillation tokens, two heads).

Run with the reference venv, never in CI: ``/work/refenv/bin/python scripts/make_fixture_vit.py``.
"""
from __future__ import annotations

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from fixture_io import OUT, save_fixture, save_meta  # noqa: E402  (scripts/ is on sys.path)

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
OVERRIDES = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter, norms included (the default init leaves LN at 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def write(name: str, model: torch.nn.Module, x: torch.Tensor, our_model: str, overrides: dict) -> None:
    y, state = save_fixture(name, model, x)
    meta = {"model": our_model, "overrides": overrides, "num_classes": TINY["num_classes"],
            "img_size": TINY["img_size"], "reference": f"timm 1.0.31 {type(model).__module__}.{type(model).__name__}",
            "layout": "timm"}
    save_meta(name, meta, indent=1)
    print(name, tuple(x.shape), "->", tuple(y.shape), f"{sum(v.numel() for v in state.values())} values")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vit = VisionTransformer(**TINY)
    randomize(vit, 1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    write("vit_tiny", vit, x, "vit_test", OVERRIDES)

    dyn = VisionTransformer(**TINY, dynamic_img_size=True)
    dyn.load_state_dict(vit.state_dict())
    x = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(3))
    write("vit_tiny_dynsize", dyn, x, "vit_test", OVERRIDES)

    torch.manual_seed(0)
    deit = VisionTransformerDistilled(**TINY)
    randomize(deit, 4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    write("deit_tiny_distilled", deit, x, "deit_test", OVERRIDES)


if __name__ == "__main__":
    main()
