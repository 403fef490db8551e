"""Structured pruning counts against the Torch-Pruning README: ViT-B/16 at ratio 0.5 goes from 86.57M params and
17.59 GMACs to 22.05M and 4.61 (uniform ratio, head count kept, head dims, MLP and embedding widths halved).

Our counts are visionzoo.profile's (attention matmuls included). Also prints what our own engine (heads and MLP
widths only; the embedding width is left alone) removes from the same model, and the time each takes.

    python benchmarks/prune_reference.py
"""
from __future__ import annotations

import os
import sys
import time

import torch

import visionzoo
from visionzoo.compress.prune import prune

REFERENCE = {"params_m": (86.57, 22.05), "gmacs": (17.59, 4.61)}


def main() -> int:
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    torch.manual_seed(0)
    model = visionzoo.create_model("vit_base_patch16_224").eval()
    before = visionzoo.profile(model)
    print(f"vit_base_patch16_224: {before.params_m:.2f}M params, {before.gmacs:.2f} GMACs "
          f"(reference {REFERENCE['params_m'][0]}M / {REFERENCE['gmacs'][0]})")
    ok = True
    for engine in ("torch-pruning", "visionzoo"):
        t0 = time.time()
        try:
            pruned = prune(model, 0.5, engine=engine)
        except Exception as e:  # noqa: BLE001
            print(f"{engine}: {type(e).__name__}: {e}")
            ok = False
            continue
        after = visionzoo.profile(pruned)
        line = f"{engine}: {after.params_m:.2f}M params, {after.gmacs:.2f} GMACs ({time.time() - t0:.0f} s)"
        if engine == "torch-pruning":
            match = round(after.params_m, 2) == REFERENCE["params_m"][1] and \
                abs(after.gmacs - REFERENCE["gmacs"][1]) < 0.02  # our counter is 0.01 G below the README's
            ok &= match
            line += f"; reference {REFERENCE['params_m'][1]}M / {REFERENCE['gmacs'][1]}: {'PASS' if match else 'FAIL'}"
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
