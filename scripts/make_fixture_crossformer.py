"""Parity fixtures for CrossFormer against the official v1 code.

References, both from cheerss/CrossFormer (MIT), read from local files and never copied into this repository:

- ``models/crossformer.py`` at commit f20000d81e762a7226ad372e6ed2f850b3ddf603 (2021-08-01, "add code for
  classification"; the v1 classifier; the repository's HEAD is CrossFormer++);
- ``models/crossformer_backbone.py`` at commit 6fae159 ("add code for segmentation"), the official detection /
  segmentation backbone of v1, which pads groups for arbitrary input sizes and returns the four stage maps.

Get them from the mirror that ``fetch github:cheerss/CrossFormer`` gives:
``git --git-dir=<mirror> show f20000d:models/crossformer.py > /tmp/crossformer/crossformer.py`` and
``git --git-dir=<mirror> show 6fae159:models/crossformer_backbone.py > /tmp/crossformer/crossformer_backbone.py``,
then pass the folder as the first argument (or in ``CROSSFORMER_OFFICIAL_DIR``). The backbone file imports mmdet /
mmcv only for checkpoint loading; the script stubs those two names.

Both use one tiny three-stage configuration (embed_dim 16, depths 2/2/1, heads 1/2/4, mlp_ratio 1, patch kernels
4/8/16/32, merge kernels 2/4 then 2, 10 classes) so the files stay under 300 KB. Writes to tests/fixtures/:

- ``crossformer_official``: the v1 classifier built for 64 px with group sizes 4/4/2 (stage maps 16, 8, 4: SDA
  and LDA with intervals 4 and 2 in stages 0-1, SDA in 2x2 groups in stage 2), on a 64x64 input; its state dict
  keeps the persistent DPB tables, so the test goes through ``CrossFormer.remap``;
- ``crossformer_det_padded`` (no .json, used by tests/models/test_crossformer.py): the detection backbone with group
  size 7 and intervals 3/2/1 (what our model computes for img_size 64) on a 96x64 input, whose stage maps (24x16,
  12x8, 6x4) need padding in every stage; the outputs are the three stage maps.

Run with the reference venv, never in CI:
``/work/refenv/bin/python scripts/make_fixture_crossformer.py /tmp/crossformer``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

from fixture_io import OUT, randomize_all, save_fixture, save_meta  # noqa: E402  (scripts/ is on sys.path)

V1_COMMIT = "f20000d81e762a7226ad372e6ed2f850b3ddf603"
BACKBONE_COMMIT = "6fae159"
TINY = dict(embed_dim=16, depths=(2, 2, 1), num_heads=(1, 2, 4), mlp_ratio=1.0, patch_size=(4, 8, 16, 32),
            merge_size=((2, 4), (2,)))


def load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def stub_mm() -> None:
    """The backbone file imports ``get_root_logger`` and ``load_checkpoint`` from mmdet / mmcv; neither is used here."""
    for name, attr in (("mmdet", None), ("mmdet.utils", "get_root_logger"), ("mmcv", None),
                       ("mmcv.runner", "load_checkpoint")):
        mod = types.ModuleType(name)
        if attr:
            setattr(mod, attr, lambda *a, **k: None)
        sys.modules[name] = mod


def official_args(group_size: tuple[int, ...]) -> dict:
    return dict(patch_size=list(TINY["patch_size"]), in_chans=3, num_classes=10, embed_dim=TINY["embed_dim"],
                depths=list(TINY["depths"]), num_heads=list(TINY["num_heads"]), group_size=list(group_size),
                mlp_ratio=TINY["mlp_ratio"], drop_path_rate=0.0, merge_size=[list(m) for m in TINY["merge_size"]])


def overrides(group_size: tuple[int, ...]) -> dict:
    out = {k: [list(m) for m in v] if k == "merge_size" else list(v) if isinstance(v, tuple) else v
           for k, v in TINY.items()}
    return {**out, "group_size": list(group_size)}


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CROSSFORMER_OFFICIAL_DIR", ""))
    if not (folder / "crossformer.py").is_file() or not (folder / "crossformer_backbone.py").is_file():
        raise SystemExit("pass the folder holding the official crossformer.py and crossformer_backbone.py "
                         "(see the docstring) as the first argument")
    OUT.mkdir(parents=True, exist_ok=True)

    v1 = load(folder / "crossformer.py", "crossformer_v1")
    torch.manual_seed(0)
    model = v1.CrossFormer(img_size=64, **official_args((4, 4, 2)))
    randomize_all(model, seed=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    name = "crossformer_official"
    y, state = save_fixture(name, model, x)
    save_meta(name, {"model": "crossformer_test", "overrides": overrides((4, 4, 2)), "num_classes": 10,
                     "img_size": 64, "reference": f"cheerss/CrossFormer@{V1_COMMIT} models/crossformer.py CrossFormer",
                     "layout": "official"}, indent=2)
    sizes = [os.path.getsize(OUT / f"{name}{s}") for s in (".safetensors", ".io.safetensors")]
    print(f"{name}: input {tuple(x.shape)} output {tuple(y.shape)}, {len(state)} keys, files {sizes} bytes")

    stub_mm()
    backbone = load(folder / "crossformer_backbone.py", "crossformer_backbone")
    torch.manual_seed(0)
    model = backbone.CrossFormer(img_size=64, crs_interval=[3, 2, 1], **official_args((7, 7, 7))).eval()
    randomize_all(model, seed=3)
    x = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        feats = model(x)
    name = "crossformer_det_padded"
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(OUT / f"{name}.safetensors"))
    save_file({"input": x, **{f"stage{i}": f.contiguous() for i, f in enumerate(feats)}},
              str(OUT / f"{name}.io.safetensors"))
    sizes = [os.path.getsize(OUT / f"{name}{s}") for s in (".safetensors", ".io.safetensors")]
    print(f"{name}: input {tuple(x.shape)} maps {[tuple(f.shape) for f in feats]}, {len(state)} keys, "
          f"files {sizes} bytes (reference cheerss/CrossFormer@{BACKBONE_COMMIT} models/crossformer_backbone.py)")


if __name__ == "__main__":
    main()
