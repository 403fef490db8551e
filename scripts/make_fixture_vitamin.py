"""Parity fixtures for ViTamin against timm 1.0.31.

Reference: ``timm.models.vitamin`` (timm 1.0.31): timm's ``VisionTransformer`` with the ViTamin MBConv stages as a
``HybridEmbed`` and GeGLU MLPs, built through ``_create_vitamin`` with the tiny configuration of ``vitamin_test``
(MBConv widths 16/32, depths 1/1, stem 16, dim 64, depth 2, 2 heads, 64 px, 10 classes), random weights
(fan-in scaled Linear/Conv, LayerNorms away from 1/0, a non-trivial position table). Writes to tests/fixtures/:

- ``vitamin_timm``: with the learned position table (ViTamin-S/B/L);
- ``vitamin_timm_nopos``: without one (``pos_embed='none'``, as ViTamin-XL).

Run with the reference venv, never in CI: ``PYTHONPATH=src /work/refenv/bin/python scripts/make_fixture_vitamin.py``.
"""
from __future__ import annotations

import torch
from timm.models.vitamin import GeGluMlp, VitCfg, VitConvCfg, _create_vitamin

from fixture_io import OUT, randomize_fan_in, write  # noqa: E402  (scripts/ is on sys.path)


def build(pos_embed: str) -> torch.nn.Module:
    cfg = VitCfg(embed_dim=(16, 32, 64), depths=(1, 1, 1), stem_width=16,
                 conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6), head_type="1d")
    return _create_vitamin("vitamin_small_224", embed_cfg=cfg, embed_dim=64, depth=2, num_heads=2,
                           mlp_layer=GeGluMlp, mlp_ratio=2.0, class_token=False, global_pool="avg",
                           pos_embed=pos_embed, img_size=64, num_classes=10)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, pos, overrides, seed in (("vitamin_timm", "learn", {}, 1),
                                       ("vitamin_timm_nopos", "none", {"pos_embed": False}, 4)):
        torch.manual_seed(0)
        model = build(pos)
        randomize_fan_in(model, seed)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:  # LayerNorm / LayerNorm2d weights and biases
                    p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            if pos == "learn":
                model.pos_embed.copy_(0.5 * torch.randn(model.pos_embed.shape, generator=g))
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed + 2))
        meta = {"model": "vitamin_test", "overrides": overrides, "num_classes": 10, "img_size": 64,
                "layout": "timm", "reference": "timm 1.0.31 timm.models.vitamin (_create_vitamin, VisionTransformer)"}
        write(name, model, x, meta)


if __name__ == "__main__":
    main()
