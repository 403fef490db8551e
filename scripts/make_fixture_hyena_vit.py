"""Parity fixture for Hyena-ViT against the official code (Itamarzimm/HyenaND).

Reference: the repository's vendored timm (``pytorch-image-models/timm``, whose ``models/vision_transformer.py``
builds DeiT with ``--method`` token mixers and ``models/layers/hyena2d.py`` holds ``HyenaOperator2d``) at commit
e8b875ea852b8b255211f9562ddc242fe2f73ab1, extracted from a local git directory (the ``fetch github:Itamarzimm/HyenaND``
mirror) given as ``--official PATH`` or ``HYENA_OFFICIAL`` into a temporary directory, imported as ``timm`` (ahead
of the reference venv's own timm), never copied into this repository. Run in the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_hyena_vit.py --official /work/.mirror/Itamarzimm+HyenaND/repo``.

Writes ``tests/fixtures/hyena_vit_official``: the official ``VisionTransformer`` as ``main.py --method hyena2dattn
--directional_mode seq --hyena2d_filter`` (no class token) with img_size 64, patch 16 (a 4x4 grid), width 32, depth
3 (blocks 0-1 Hyena N-D, block 0 flipped; block 2 attention), 2 heads, filter MLP width 16, 10 classes, eval mode,
on a 2x3x64x64 input. Also prints the official parameter counts of the registered full variants (1000 classes).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_io import official_path, randomize_all, write  # noqa: E402

COMMIT = "e8b875ea852b8b255211f9562ddc242fe2f73ab1"


def _import(path: str):  # noqa: ANN202
    root = Path(tempfile.mkdtemp())
    tar = subprocess.run(["git", "--git-dir", path, "archive", COMMIT, "pytorch-image-models/timm"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=tar, check=True)
    sys.path.insert(0, str(root / "pytorch-image-models"))
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        del sys.modules[name]
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer


def build(cls, method: str, embed_dim: int, depth: int, heads: int, filter_order: int, img_size: int,  # noqa: ANN001
          num_classes: int) -> torch.nn.Module:
    args = argparse.Namespace(method=method, use_cls_token=False, hyena_filter_order=filter_order, hyena_order=2,
                              hyena2d_filter=True, hyena2d_sqrt_decay=False, directional_mode="seq",
                              direct_paramtrization=False, window_mode="standard", patch_size=16, grad_cp=False)
    with contextlib.redirect_stdout(io.StringIO()):  # the official constructors print their settings
        return cls(img_size=img_size, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=4,
                   qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=num_classes,
                   args=args)


def main() -> None:
    path = official_path(__doc__.splitlines()[0], "HYENA_OFFICIAL", "git dir of Itamarzimm/HyenaND")
    cls = _import(path)
    for name, dim, heads, method in (("tiny", 192, 3, "hyena2d"), ("tiny_hybrid", 192, 3, "hyena2dattn"),
                                     ("small", 384, 6, "hyena2d"), ("small_hybrid", 384, 6, "hyena2dattn")):
        model = build(cls, method, dim, 12, heads, 64, 224, 1000)
        print(f"hyena_vit_{name}: {sum(p.numel() for p in model.parameters())} parameters")
    torch.manual_seed(0)
    model = build(cls, "hyena2dattn", 32, 3, 2, 16, 64, 10)
    randomize_all(model, 10)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(20))
    write("hyena_vit_official", model, x,
          {"model": "hyena_vit_test", "num_classes": 10, "img_size": 64,
           "overrides": dict(embed_dim=32, depth=3, num_heads=2, method="hyena2dattn", filter_order=16),
           "reference": f"Itamarzimm/HyenaND@{COMMIT} pytorch-image-models/timm/models/vision_transformer.py "
                        "VisionTransformer (--method hyena2dattn --directional_mode seq --hyena2d_filter)"})


if __name__ == "__main__":
    main()
