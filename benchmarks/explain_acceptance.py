"""Acceptance for visionzoo.explain (issue 15): explanations and robustness of a small ConvNet and a small ViT.

1. Train ``convnext_test`` and ``vit_test`` (patch 8: an 8x8 token grid at 64 px), about 0.1 M parameters each,
   with one recipe on the synthetic localisation set (``--data shapes``: four shapes with known boxes on a random
   textured background), through ``visionzoo.train.fit``.
2. On held-out images with their boxes: pointing-game accuracy of Grad-CAM (both models) and of attention
   rollout (the ViT) against the random baseline (the mean box-area fraction: a uniformly random point's hit
   rate); deletion and insertion AUC of every method against a random ranking of the pixels.
3. The robustness table of both models: shift consistency, corruption accuracy per severity, FGSM/PGD accuracy,
   random and adversarial 16x16 patches.

    PYTHONPATH=src python benchmarks/explain_acceptance.py [--out runs/explain_acceptance] [--epochs 40]

Runs on one thread (a shared 2-core machine): about 10 minutes of training, then a few minutes of evaluation;
``--skip-train`` reuses the trained weights in ``--out``. Prints the tables and the CPU model.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

MODELS = (("convnext_test", None), ("vit_test", 8))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def train(out: Path, epochs: int, n_train: int, n_val: int, only: str | None = None) -> None:
    from visionzoo.train.augment import AugConfig
    from visionzoo.train.loop import TrainConfig, build_model, fit, seed_everything
    from visionzoo.train.synthetic import shapes_splits

    splits = shapes_splits(n_train, n_val, 64, seed=0)
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, weight_decay=0.05, warmup_epochs=2, seed=0,
                      crop_pct=1.0, progress=False, aug=AugConfig(scale=(1.0, 1.0), hflip=0.5, smoothing=0.0))
    for name, patch in MODELS:
        if only and name != only:
            continue
        seed_everything(0)
        model = build_model(name, splits.num_classes, 3, 64, patch)
        t = time.perf_counter()
        res = fit(model, splits, cfg, out / name, log=lambda s, n=name: print(n, s, flush=True))
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M params, val top-1 "
              f"{res.metrics.top1:.1f}% after {epochs} epochs ({time.perf_counter() - t:.0f} s)", flush=True)


def _md(rows: list[dict], title: str) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join([f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                      *["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows], ""])


def evaluate(out: Path, args: argparse.Namespace) -> None:
    from visionzoo.explain import (
        applicable_methods,
        deletion_insertion,
        explain,
        head_importance,
        pointing_game,
        random_maps,
        random_pointing_baseline,
        robustness,
        tokencut,
    )
    from visionzoo.explain.attention import attention_maps
    from visionzoo.explain.plots import plot_grid
    from visionzoo.explain.robust import markdown, write_report
    from visionzoo.explain.tokencut import box_iou
    from visionzoo.train.evaluate import load_trained
    from visionzoo.train.synthetic import localization_set

    data = localization_set(args.n_eval, 64, seed=1234)  # held out: training used seeds 0 and 1
    x01 = data.images.float() / 255
    y = data.labels
    n_f = min(args.n_faith, len(y))
    rand_pg = random_pointing_baseline(data.boxes, (64, 64))
    rand_pg4 = random_pointing_baseline(data.boxes, (64, 64), tolerance=4)  # Zhang et al.'s 15 px at 224, scaled
    expl_rows, robust_reports, notes = [], [], []
    for name, _ in MODELS:
        ckpt = out / name / "model.safetensors"
        model, _meta = load_trained(ckpt if ckpt.is_file() else out / name / "latest.pt")
        model.eval()
        mean = torch.tensor(model.data_config["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(model.data_config["std"]).view(1, -1, 1, 1)
        x = (x01 - mean) / std
        with torch.no_grad():
            logits = torch.cat([model(x[i:i + 100]) for i in range(0, len(x), 100)])
        acc = 100.0 * (logits.argmax(1) == y).float().mean().item()
        print(f"{name}: top-1 {acc:.1f}% on {len(y)} held-out images", flush=True)
        runs = [(m, None) for m in applicable_methods(model)]
        if model.kind == "convnet":  # the stride-16 and stride-8 stages (the ViT's token grid is stride 8)
            runs += [("gradcam", 2), ("gradcam", 1), ("layercam", 1)]
        else:  # the residual stream before the last block: what the default used to be (no better than random)
            runs += [("gradcam", len(model.stage_info) - 2)]
        maps = {}
        t0 = time.perf_counter()
        for method, stage in runs:
            label = method if stage is None else f"{method} @stage {stage}"
            e = explain(model, x, method, target=y, stage=stage)
            maps[label] = e.maps
            pg = pointing_game(e.maps, data.boxes).float().mean().item()
            pg4 = pointing_game(e.maps, data.boxes, tolerance=4).float().mean().item()
            auc = deletion_insertion(model, x[:n_f], e.maps[:n_f], y[:n_f], steps=args.steps)
            expl_rows.append(dict(model=name, method=label, grid=f"{e.grid[0]}x{e.grid[1]}", pointing=100 * pg,
                                  pointing_random=100 * rand_pg, pointing_4px=100 * pg4,
                                  pointing_4px_random=100 * rand_pg4, deletion_auc=auc.deletion.mean().item(),
                                  insertion_auc=auc.insertion.mean().item()))
            print(f"  {label:22s} pointing {100 * pg:5.1f}% (random {100 * rand_pg:.1f}%), deletion AUC "
                  f"{expl_rows[-1]['deletion_auc']:.3f}, insertion AUC {expl_rows[-1]['insertion_auc']:.3f} "
                  f"({e.detail}; {time.perf_counter() - t0:.0f} s)", flush=True)
        auc = deletion_insertion(model, x[:n_f], random_maps((n_f, 64, 64), seed=0), y[:n_f], steps=args.steps)
        expl_rows.append(dict(model=name, method="random ranking", grid="-", pointing=100 * rand_pg,
                              pointing_random=100 * rand_pg, pointing_4px=100 * rand_pg4,
                              pointing_4px_random=100 * rand_pg4, deletion_auc=auc.deletion.mean().item(),
                              insertion_auc=auc.insertion.mean().item()))
        print(f"  random ranking: deletion AUC {auc.deletion.mean():.3f}, insertion AUC {auc.insertion.mean():.3f}",
              flush=True)
        for stage in range(len(model.stage_info)):  # keys where a stage attends globally, and the stage's map
            done = set()
            for features in ("auto", "stage"):
                tc = tokencut(model, x, stage=stage, features=features)
                if tc.features in done:
                    continue
                done.add(tc.features)
                corloc = 100 * (box_iou(tc.boxes, data.boxes) >= 0.5).float().mean().item()
                what = "keys of the last attention" if tc.features == "keys" else "map"
                notes.append(f"{name}: TokenCut CorLoc (IoU >= 0.5) {corloc:.1f}% on the {what} of stage {stage} "
                             f"({model.stage_info[stage].module})")
                print("  " + notes[-1], flush=True)
        for i in range(2):
            plot_grid(x01[i], {k: v[i] for k, v in maps.items()}, out / f"{name}_methods_{i}.png",
                      f"{name}: class {data.classes[y[i]]}", box=data.boxes[i].tolist())
        if model.has_attention:
            imp = head_importance(model, x[:100], target=y[:100], labels=y[:100])
            top = sorted(imp.rows, key=lambda r: -r["logit_drop"])
            notes.append(f"{name}: head importance (target logit drop / accuracy drop when masked, 100 images): "
                         + ", ".join(f"{r['core'].replace('.attn.core', '')}#{r['head']} {r['logit_drop']:.2f} / "
                                     f"{r['acc_drop']:.1f}%" for r in top))
            print("  " + notes[-1], flush=True)
            last = attention_maps(model, x[:1])
            heads = {f"{a.name.split('.attn')[0]} h{h}": a.maps[0, h] for a in last for h in range(a.maps.shape[1])}
            plot_grid(x01[0], heads, out / f"{name}_heads.png", f"{name}: class-token attention per block and head",
                      box=data.boxes[0].tolist())
        t0 = time.perf_counter()
        robust_reports.append(robustness(model, x01[:args.n_robust], y[:args.n_robust], seed=0))
        print(f"  robustness probes on {args.n_robust} images: {time.perf_counter() - t0:.0f} s", flush=True)
    text = (f"CPU: {cpu_model()}, torch {torch.__version__}, {args.threads} thread(s); {len(y)} held-out images "
            f"(deletion/insertion on {n_f}, {args.steps} steps)\n\n" + _md(expl_rows, "explanations") + "\n"
            + "\n".join(f"- {n}" for n in notes) + "\n\n" + markdown(robust_reports))
    write_report(robust_reports, out)
    (out / "acceptance.md").write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/explain_acceptance")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--only", default=None, help="train only this model")
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-val", type=int, default=600)
    p.add_argument("--n-eval", type=int, default=200, help="held-out images for the explanation metrics")
    p.add_argument("--n-faith", type=int, default=100, help="images for deletion/insertion")
    p.add_argument("--n-robust", type=int, default=200, help="images for the robustness probes")
    p.add_argument("--steps", type=int, default=32, help="deletion/insertion steps")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    print(f"CPU: {cpu_model()}, torch {torch.__version__}, {args.threads} thread(s)", flush=True)
    if not args.skip_train:
        train(out, args.epochs, args.n_train, args.n_val, args.only)
    evaluate(out, args)


if __name__ == "__main__":
    main()
