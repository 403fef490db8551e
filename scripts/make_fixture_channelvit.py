"""Parity fixtures for ChannelViT against the official code, and the official parameter / MAC counts.

Reference: ``channelvit/backbone/hcs_channel_vit.py`` (with ``channelvit/backbone/vit.py`` and, for the non-HCS
layout, ``channel_vit.py``) of insitro/ChannelViT (Apache-2.0) at commit 1077a103e30c, read from the mirror that
``fetch github:insitro/ChannelViT`` gives and never copied into this repository: the script extracts the three files
into a temporary package (``channelvit.utils`` replaced by a stub giving ``trunc_normal_``) and imports them.

One tiny configuration (embed_dim 32, depth 2, heads 2, patch 16, 4 input channels, 10 classes, 64 px), the
classifier the official Lightning module puts on the backbone's class token as ``head``; in eval mode (HCS off):

- ``channelvit_official``: the HCS model (the released supervised layout), all 4 channels;
- ``channelvit_official_nonhcs``: the non-HCS file (channel table ``(1, D, C, 1, 1)``), all 4 channels.

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_channelvit.py --official /work/.mirror/insitro+ChannelViT/repo``.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fixture_io import official_path, randomize_all, write  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "1077a103e30c"
FILES = ("channelvit/backbone/vit.py", "channelvit/backbone/hcs_channel_vit.py", "channelvit/backbone/channel_vit.py")
TINY = dict(embed_dim=32, depth=2, num_heads=2)


def import_package(git_dir: str):
    root = Path(tempfile.mkdtemp())
    for f in FILES:
        text = subprocess.run(["git", "--git-dir", git_dir, "show", f"{COMMIT}:{f}"], check=True,
                              capture_output=True, text=True).stdout
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text(text)
    for pkg in ("channelvit", "channelvit/backbone"):
        (root / pkg / "__init__.py").write_text("")
    (root / "channelvit/utils").mkdir()
    (root / "channelvit/utils/__init__.py").write_text("from torch.nn.init import trunc_normal_  # noqa: F401\n")
    sys.path.insert(0, str(root))
    import channelvit.backbone.channel_vit as plain
    import channelvit.backbone.hcs_channel_vit as hcs
    return hcs, plain


class WithHead(nn.Module):
    """The official backbone (class token out) followed by a Linear classifier, all channels given."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim or backbone.embed_dim, num_classes)

    def forward(self, x):
        channels = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        return self.head(self.backbone(x, {"channels": channels}))


def main() -> None:
    hcs, plain = import_package(official_path(__doc__, "CHANNELVIT_OFFICIAL", "the ChannelViT git dir"))
    for size in ("tiny", "small", "base"):
        m = WithHead(getattr(hcs, f"hcs_channelvit_{size}")(patch_size=16, in_chans=3), 0, 1000).eval()
        n = sum(p.numel() for p in m.parameters())
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(torch.randn(1, 3, 224, 224))
        print(f"channelvit_{size}_patch16: params {n / 1e6:.6f} M, GMACs {fc.get_total_flops() / 2e9:.3f}")
    common = dict(img_size=[64], patch_size=16, in_chans=4, mlp_ratio=4, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6), **TINY)
    for name, module, ctor, seed in (("channelvit_official", hcs, "ChannelVisionTransformer", 1),
                                     ("channelvit_official_nonhcs", plain, "ChannelVisionTransformer", 3)):
        torch.manual_seed(0)
        model = WithHead(getattr(module, ctor)(**common), TINY["embed_dim"], 10)
        randomize_all(model, seed)
        x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(seed + 1))
        meta = {"model": "channelvit_test", "overrides": {**TINY, "in_chans": 4}, "num_classes": 10, "img_size": 64,
                "reference": f"insitro/ChannelViT@{COMMIT} {FILES[1 if module is hcs else 2]}"}
        write(name, model, x, meta)


if __name__ == "__main__":
    main()
