"""Parity fixtures for the Swin Transformer against timm 1.0.31 and the official code.

References:
- ``timm.models.swin_transformer.SwinTransformer`` (timm 1.0.31, Apache-2.0);
- ``models/swin_transformer.py`` of microsoft/Swin-Transformer (MIT) at commit
  f82860bfb5225915aca09c3227159ee9e1df874d (2024-07-15), read from a local file and never copied into this
  repository. Get it from the mirror that ``fetch github:microsoft/Swin-Transformer`` gives:
  ``git --git-dir=<mirror> show f82860bf:models/swin_transformer.py > /tmp/swin_official/swin.py``, then pass
  that path as the first argument (or in ``SWIN_OFFICIAL_FILE``). It imports timm's layers, so it runs in the
  same venv.

All three use one tiny configuration (embed_dim 6, depths 2/2/2/2, heads 1/2/4/8, mlp_ratio 2, 10 classes, built
for 64 px): stages 0 and 1 (16x16 and 8x8 maps) have a shifted block, stages 2 and 3 are one window each, and the
official checkpoint has three end-of-stage patch mergings to move. Writes to tests/fixtures/:

- ``swin_timm``: timm's model, window 4, on a 64x64 input;
- ``swin_timm_dynsize``: timm's model built for 64 px with ``dynamic_img_size=True`` and window 5, on a 96x64
  input, so the shifted stages are padded (24x16 -> 25x20, 12x8 -> 15x10) and their masks built for the padded size;
- ``swin_official``: the official model, window 4, on a 64x64 input; its state dict keeps the official layout
  (downsample at the end of each stage, ``head``, persistent ``relative_position_index`` / ``attn_mask`` buffers),
  so the test goes through ``SwinTransformer.remap``.

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_swin.py /tmp/swin_official/swin.py``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from timm.models.swin_transformer import SwinTransformer

from fixture_io import OUT, randomize_all, save_fixture, save_meta  # noqa: E402  (scripts/ is on sys.path)

OFFICIAL_COMMIT = "f82860bfb5225915aca09c3227159ee9e1df874d"
TINY = dict(embed_dim=6, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), mlp_ratio=2.0)


def write(name: str, model: torch.nn.Module, x: torch.Tensor, window_size: int, reference: str, layout: str) -> None:
    y, state = save_fixture(name, model, x)
    overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    meta = {"model": "swin_test", "overrides": {**overrides, "window_size": window_size}, "num_classes": 10,
            "img_size": 64, "reference": reference, "layout": layout}
    save_meta(name, meta, indent=2)
    sizes = [os.path.getsize(OUT / f"{name}{s}") for s in (".safetensors", ".io.safetensors")]
    print(f"{name}: input {tuple(x.shape)} output {tuple(y.shape)}, {len(state)} keys, files {sizes} bytes")


def load_official(path: str):  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("swin_official", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SwinTransformer


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SWIN_OFFICIAL_FILE")
    if not path or not Path(path).is_file():
        raise SystemExit("pass the official models/swin_transformer.py (see the docstring) as the first argument")
    OUT.mkdir(parents=True, exist_ok=True)
    timm_ref = "timm 1.0.31 timm.models.swin_transformer.SwinTransformer"

    torch.manual_seed(0)
    model = SwinTransformer(img_size=64, window_size=4, num_classes=10, drop_path_rate=0.0, **TINY)
    randomize_all(model, seed=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    write("swin_timm", model, x, 4, timm_ref, "timm")

    torch.manual_seed(0)
    model = SwinTransformer(img_size=64, window_size=5, num_classes=10, drop_path_rate=0.0, dynamic_img_size=True,
                            **TINY)
    randomize_all(model, seed=3)
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(4))
    write("swin_timm_dynsize", model, x, 5, f"{timm_ref} (dynamic_img_size=True)", "timm")

    official = load_official(path)
    torch.manual_seed(0)
    model = official(img_size=64, patch_size=4, in_chans=3, num_classes=10, window_size=4, drop_path_rate=0.0,
                     embed_dim=TINY["embed_dim"], depths=list(TINY["depths"]), num_heads=list(TINY["num_heads"]),
                     mlp_ratio=TINY["mlp_ratio"])
    randomize_all(model, seed=5)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    write("swin_official", model, x, 4,
          f"microsoft/Swin-Transformer@{OFFICIAL_COMMIT} models/swin_transformer.py SwinTransformer", "official")


if __name__ == "__main__":
    main()
