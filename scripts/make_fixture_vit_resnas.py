"""Parity fixture for ViT-ResNAS against the official code (yilunliao/vit-search, MIT).

Reference: ``nets/vit_sr_supernet.py`` (``FlexibleDistillVisionTransformerSR``) and the modules it imports from
``nets/`` of yilunliao/vit-search at commit 303e7c30638e9c7aee2e2b329e5c71bd3e89ccb9, read from a local git directory
(the ``fetch github:yilunliao/vit-search`` mirror) given as ``--official PATH`` or ``VIT_RESNAS_OFFICIAL``, written to
a temporary package and never copied into this repository. The reduction module allocates a zero tensor with
``.cuda()``; on a CPU-only machine the script makes ``Tensor.cuda`` a no-op while building. Run in the reference
venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_vit_resnas.py --official /work/.mirror/yilunliao+vit-search/repo``.

Writes ``tests/fixtures/vit_resnas_official``: the official model (``patch_output=True``, no distillation token, as
``flexible_vit_sr_patch14_224_patch_output``) with a tiny network_def: conv stem 8 channels, widths 32/48/64, one
transformer block in stage 1 and two in stages 2-3 with varying heads and MLP widths, head dims 16/24/32, 10 classes,
at img_size 56 (4x4, 2x2, 1x1 token maps), eval mode, on a 2x3x56x56 input. Also prints the exact parameter counts
of the three searched networks (tiny, small_mac@2.9G, medium_mac@4.6G) with 1000 classes.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fixture_io import official_path, randomize_all, write  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "303e7c30638e9c7aee2e2b329e5c71bd3e89ccb9"
FILES = ("__init__.py", "vit_sr_supernet.py", "supernet_blocks.py", "masked_layer_norm.py", "channel_drop.py",
         "patch_conv.py", "drop.py")
TINY = ((5, 32, 8), (1, (32, 2, 16), (32, 64), 1), (3, 32, 48), (1, (48, 2, 24), (48, 96), 1),
        (1, (48, 3, 24), (48, 80), 1), (3, 48, 64), (1, (64, 2, 32), (64, 128), 1), (1, (64, 1, 32), (64, 96), 1),
        (2, 64, 10))


def _load(path: str):  # noqa: ANN202
    root = Path(tempfile.mkdtemp()) / "resnas_nets"
    root.mkdir()
    for f in FILES:
        text = subprocess.run(["git", "--git-dir", path, "show", f"{COMMIT}:nets/{f}"], check=True,
                              capture_output=True, text=True).stdout
        (root / f).write_text(text if f != "__init__.py" else "")
    sys.path.insert(0, str(root.parent))
    return importlib.import_module("resnas_nets.vit_sr_supernet")


def main() -> None:
    path = official_path(__doc__.splitlines()[0], "VIT_RESNAS_OFFICIAL", "git dir of yilunliao/vit-search")
    official = _load(path)
    torch.Tensor.cuda = lambda self, *a, **k: self  # the reduction's zero tensor; CPU only here
    cls = official.FlexibleDistillVisionTransformerSR
    for name, script in (("tiny", "tiny"), ("small", "small_mac@2.9G"), ("medium", "medium_mac@4.6G")):
        text = subprocess.run(["git", "--git-dir", path, "show",
                               f"{COMMIT}:scripts/vit-sr-nas/searched_net/{script}.sh"],
                              check=True, capture_output=True, text=True).stdout
        net = eval(text.split("--network-def '")[1].split("'")[0])  # noqa: S307  (a literal tuple in the script)
        model = cls(distill_token=False, patch_output=True, network_def=net)
        print(f"vit_resnas_{name}: {sum(p.numel() for p in model.parameters())} parameters")
    torch.manual_seed(0)
    # stem type 5 (conv stem with its own width) is the official way to set the stem's channels
    model = cls(img_size=56, num_classes=10, distill_token=False, patch_output=True, network_def=TINY)
    randomize_all(model, 10)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(20))
    write("vit_resnas_official", model, x,
          {"model": "vit_resnas_test", "num_classes": 10, "img_size": 56,
           "overrides": dict(dims=[32, 48, 64], num_heads=[[2], [2, 3], [2, 1]], mlp_hidden=[[64], [96, 80], [128, 96]],
                             head_dims=[16, 24, 32], stem_chans=8,
                             patch_output=True),
           "reference": f"yilunliao/vit-search@{COMMIT} nets/vit_sr_supernet.py FlexibleDistillVisionTransformerSR"})


if __name__ == "__main__":
    main()
