"""Parity fixtures for T2T-ViT against the official yitu-opensource/T2T-ViT at 0f63dc9 (``models/t2t_vit.py`` with
``token_performer.py``, ``token_transformer.py``, ``transformer_block.py``; timm in the reference venv for its
imports).

Writes ``t2t_vit_official_performer`` and ``t2t_vit_official_transformer``: a tiny T2T-ViT (64 px: 16^2 -> 8^2 -> 4^2
tokens; token_dim 16, width 64, depth 2, 2 heads) of each T2T layer type, with N(0, 1/fan_in) Linear weights,
LayerNorms spread around (1, 0), the official random Performer features and the official sinusoidal table kept.

Run with the reference venv, never in CI, given the repository's bare git dir (read at the commit) or a checkout:
``PYTHONPATH=src /work/refenv/bin/python scripts/make_fixture_t2t_vit.py --official PATH``
(here PATH = ``/work/.mirror/yitu-opensource+T2T-ViT/repo``).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fixture_io import official_path, randomize_fan_in, write  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "0f63dc9558f4"
FILES = ("t2t_vit", "token_performer", "token_transformer", "transformer_block")
TINY = dict(img_size=64, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16, num_classes=10)


def import_package(path: str):  # noqa: ANN201
    """The official ``models`` files as a package (they import each other relatively)."""
    src = Path(path)
    root = Path(tempfile.mkdtemp())
    pkg = root / "t2t_official"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for f in FILES:
        if src.is_dir() and not (src / "models").is_dir():
            text = subprocess.run(["git", "--git-dir", str(src), "show", f"{COMMIT}:models/{f}.py"], check=True,
                                  capture_output=True, text=True).stdout
        else:
            text = (src / "models" / f"{f}.py").read_text()
        (pkg / f"{f}.py").write_text(text)
    import timm.models.registry

    timm.models.registry.register_model = lambda fn: fn
    sys.path.insert(0, str(root))
    from t2t_official import t2t_vit

    return t2t_vit


def main() -> None:
    official = import_package(official_path(__doc__, "T2T_VIT_OFFICIAL", "yitu-opensource/T2T-ViT git dir or checkout"))
    for seed, tokens_type in enumerate(("performer", "transformer"), start=1):
        torch.manual_seed(0)
        model = official.T2T_ViT(tokens_type=tokens_type, **TINY)
        randomize_fan_in(model, seed)
        g = torch.Generator().manual_seed(10 + seed)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            model.cls_token.copy_(torch.randn(model.cls_token.shape, generator=g))
        x = torch.randn(2, 3, 64, 64, generator=g)
        ours = {k: v for k, v in TINY.items() if k not in ("img_size", "num_classes")}
        write(f"t2t_vit_official_{tokens_type}", model, x,
              {"model": "t2t_vit_test", "overrides": {**ours, "tokens_type": tokens_type}, "num_classes": 10,
               "img_size": 64, "reference": f"yitu-opensource/T2T-ViT@{COMMIT} models/t2t_vit.py"})


if __name__ == "__main__":
    main()
