"""Parity fixtures for SN-Net v2 against the official code, and the official parameter count of the S + L pair.

Reference: ``classification/snnet.py`` (SNNetv2) and ``classification/models_v2.py`` (the DeiT III anchors,
``vit_models`` with layer scale) of ziplab/SN-Netv2 (Apache-2.0) at commit dd17607f350c, read from the mirror that
``fetch github:ziplab/SN-Netv2`` gives and never copied into this repository: the script writes the two files to a
temporary directory (with a stub ``utils`` module giving ``get_root_logger``) and imports them.

The official anchors are DeiT III models: layer scale in every block and a position table without a class-token
row; ``SNNet.remap`` folds the layer scales (randomised here, not 1) into ``attn.proj`` / ``mlp.fc2`` and adds a
zero class row, so ``snnet_test`` (anchors: ``vit_test`` at width 16 and 32, depth 4) matches them exactly. LoRA
stitching layers (rank 4) are saved unmerged (the official ``eval()`` merges them into the weight in place).
Two fixtures, routes with both stitch directions: ``snnet_official_lsl`` (stitch 10), ``snnet_official_sls`` (13).

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_snnet.py --official /work/.mirror/ziplab+SN-Netv2/repo``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from fixture_io import OUT, official_path, randomize_all, save_meta  # noqa: E402  (scripts/ is on sys.path)

COMMIT = "dd17607f350c"
STUB = "import logging\n\n\ndef get_root_logger(*args, **kwargs):\n    return logging.getLogger('snnet')\n"


def import_official(git_dir: str):
    root = Path(tempfile.mkdtemp())
    for f in ("snnet.py", "models_v2.py"):
        text = subprocess.run(["git", "--git-dir", git_dir, "show", f"{COMMIT}:classification/{f}"], check=True,
                              capture_output=True, text=True).stdout
        (root / f).write_text(text)
    (root / "utils.py").write_text(STUB)
    sys.path.insert(0, str(root))
    import models_v2
    import snnet
    return snnet, models_v2


def tiny_anchor(models_v2, dim: int):
    from functools import partial

    return models_v2.vit_models(img_size=64, patch_size=16, embed_dim=dim, depth=4, num_heads=2, mlp_ratio=4,
                                qkv_bias=True, num_classes=10, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                block_layers=models_v2.Layer_scale_init_Block)


def main() -> None:
    snnet, models_v2 = import_official(official_path(__doc__, "SNNET_OFFICIAL", "the SN-Netv2 git dir"))
    big = snnet.SNNetv2([models_v2.deit_small_patch16_LS(), models_v2.deit_large_patch16_LS()], lora_r=64)
    print(f"official SNNetv2 DeiT3-S + DeiT3-L, lora_r=64: {sum(p.numel() for p in big.parameters()) / 1e6:.6f} M, "
          f"{len(big.stitch_configs)} configs, {len(big.all_cfgs)} sampled")
    del big
    torch.manual_seed(0)
    model = snnet.SNNetv2([tiny_anchor(models_v2, 16), tiny_anchor(models_v2, 32)], lora_r=4)
    randomize_all(model, 1)
    model.train()  # LoRA unmerged: the state dict holds the weight and the low-rank factors apart
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    model.eval()
    configs = [dict(comb=list(c["comb_id"]), route=c.get("route"), layers=c.get("stitch_layer_ids"))
               for c in model.stitch_configs.values()]
    for suffix, stitch in (("lsl", 10), ("sls", 13)):
        name = f"snnet_official_{suffix}"
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(stitch))
        model.reset_stitch_id(stitch)
        with torch.no_grad():
            y = model(x)
        save_file(state, str(OUT / f"{name}.safetensors"))
        save_file({"input": x, "output": y.contiguous()}, str(OUT / f"{name}.io.safetensors"))
        save_meta(name, {"model": "snnet_test", "overrides": {"stitch": stitch}, "num_classes": 10, "img_size": 64,
                         "layout": "official", "official_route": model.stitch_configs[stitch].get("route"),
                         "reference": f"ziplab/SN-Netv2@{COMMIT} classification/snnet.py SNNetv2"})
        print(name, tuple(y.shape), [os.path.getsize(OUT / f"{name}{s}") for s in (".safetensors", ".io.safetensors")])
    (OUT.parent / "models" / "snnet_official_configs.json").write_text(
        __import__("json").dumps({"depths": [4, 4], "configs": configs}) + "\n")


if __name__ == "__main__":
    main()
