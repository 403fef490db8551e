"""Learning with little data (issue 18): scratch vs self-pretrained at few labels, and PEFT vs full fine-tuning.

On scikit-learn's digits (bundled, offline; 8x8 grey upscaled to 32 px), the training split's images (labels unused)
pretrain a small ViT (``vit_test``, patch 8: 16 tokens) with MAE, SiT and RotNet and a small ConvNet
(``resnet_test``) with SparK (mask cell 8 px) and RotNet. Each backbone, and a scratch model, is then fine-tuned on
a class-stratified ``--fractions`` subset of the training labels with one recipe, over ``--seeds`` seeds (the
subset and the fine-tuning seed change together; pretraining runs once, seed 0), and evaluated on the whole
validation split. Then the first ViT method's backbone is fine-tuned at the largest fraction with each PEFT method
and fully: accuracy and trainable parameters.

    python benchmarks/small_data.py                      # the default scale (about 20 min on 1 busy EPYC core)
    python benchmarks/small_data.py --pretrain-epochs 2 --epochs 3 --seeds 0   # a smoke run

Prints the CPU model, every run's top-1 and the mean +- std per setting, and writes benchmarks/results/small_data.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from visionzoo.train.augment import AugConfig  # noqa: E402
from visionzoo.train.data import DataSplits, load_data  # noqa: E402
from visionzoo.train.loop import TrainConfig, build_model, fit  # noqa: E402
from visionzoo.train.peft import apply_peft  # noqa: E402
from visionzoo.train.pretrain import pretrain  # noqa: E402
from visionzoo.weights import load_checkpoint  # noqa: E402

MODELS = {"vit": ("vit_test", ["mae", "sit", "rotnet"]), "convnet": ("resnet_test", ["spark", "rotnet"])}
PEFT = [("lora", dict(rank=2)), ("vqt", dict(prompts=2)), ("prompt", dict(prompts=5, deep=True)), ("bitfit", {}),
        ("linear", {})]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def stratified(splits: DataSplits, fraction: float, seed: int) -> DataSplits:
    """The same splits with ``ceil(fraction * n_c)`` training images of each class ``c`` (a seeded choice)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.tensor(splits.train.targets)
    keep: list[int] = []
    for c in range(splits.num_classes):
        idx = (targets == c).nonzero().flatten()
        k = max(1, math.ceil(fraction * len(idx)))
        keep += idx[torch.randperm(len(idx), generator=g)[:k]].tolist()
    return DataSplits(splits.train.subset(sorted(keep)), splits.val, splits.classes, splits.in_chans,
                      splits.image_size, splits.name)


VIT_ARCH: dict = {}  # --vit-arch: constructor overrides of the ViT (width, depth, heads)


def model_for(name: str, splits: DataSplits, size: int, patch: int) -> torch.nn.Module:
    extra = VIT_ARCH if name == MODELS["vit"][0] else {}
    return build_model(name, splits.num_classes, splits.in_chans, size, patch_size=patch, **extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8, help="the ViT's patch (8: a 4x4 token grid at 32 px)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (more, up to 3x, for tiny subsets)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--no-finetune", action="store_true", help="skip scratch vs pretrained (PEFT only)")
    p.add_argument("--peft-init", default=None, help="the ViT pretraining method PEFT starts from (default: the first)")
    p.add_argument("--lora-rank", type=int, default=2)
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA's alpha (default: the rank, scaling 1)")
    p.add_argument("--peft-positions", action="store_true",
                   help="PEFT also trains the position table (apply_peft positions=True, LoRAT's pos_embed_trainable)")
    p.add_argument("--peft-methods", nargs="+", default=[m for m, _ in PEFT], choices=[m for m, _ in PEFT],
                   help="the PEFT methods to compare with full fine-tuning")
    p.add_argument("--vit-arch", default="", help="ViT overrides, e.g. embed_dim=192,depth=4,num_heads=3 (the "
                   "default is vit_test's own: width 64, depth 2)")
    p.add_argument("--peft-lr", type=float, default=3e-3)
    p.add_argument("--reuse", action="store_true", help="reuse backbones a previous run left in runs/bench_small_data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/small_data.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()} ({args.threads} thread(s); load average {os.getloadavg()[0]:.1f})", flush=True)
    splits = load_data("digits")
    print(f"digits: {len(splits.train)} training images (pretraining, labels unused), {len(splits.val)} validation; "
          f"{args.img_size} px", flush=True)
    aug = AugConfig(scale=(0.6, 1.0), hflip=0.0, smoothing=0.1)
    pre_cfg = TrainConfig(epochs=args.pretrain_epochs, batch_size=64, lr=1.5e-3, weight_decay=0.05, warmup_epochs=1,
                          progress=False, aug=AugConfig(scale=(0.6, 1.0), hflip=0.0, smoothing=0.0))
    work = Path("runs/bench_small_data")
    PEFT[0] = ("lora", dict(rank=args.lora_rank, **({} if args.lora_alpha is None else {"alpha": args.lora_alpha})))
    VIT_ARCH.update({k: int(v) for k, v in (kv.split("=") for kv in args.vit_arch.split(",") if kv)})
    work = work / ("vit_" + args.vit_arch.replace(",", "_").replace("=", "") if VIT_ARCH else "")
    results: dict = {"cpu": cpu_model(), "config": vars(args), "pretrain": {}, "finetune": [], "peft": []}
    backbones: dict[tuple[str, str], Path] = {}
    t0 = time.perf_counter()
    for kind in args.models:
        name, methods = MODELS[kind]
        if args.no_finetune:  # PEFT only: just the backbone it starts from
            methods = [args.peft_init or methods[0]] if kind == "vit" and not args.no_peft else []
        for method in methods:
            torch.manual_seed(0)
            out = work / f"{name}_{method}"
            if args.reuse and (out / "backbone.safetensors").is_file():
                backbones[(kind, method)] = out / "backbone.safetensors"
                print(f"reusing {out / 'backbone.safetensors'}", flush=True)
                continue
            opts = {"mask_stride": 8} if method == "spark" else {}
            model = model_for(name, splits, args.img_size, args.patch_size)
            r = pretrain(model, splits, method, pre_cfg, out, log=None, **opts)
            backbones[(kind, method)] = out / "backbone.safetensors"
            results["pretrain"][f"{name}+{method}"] = dict(val_loss=r.metrics.loss, time_s=r.train_time_s)
            print(f"pretrained {name} with {method}: val pretext loss {r.metrics.loss:.4f} ({r.train_time_s:.0f} s)",
                  flush=True)

    def finetune(kind: str, init: str, fraction: float, seed: int, peft: tuple[str, dict] | None = None) -> dict:
        name = MODELS[kind][0]
        sub = stratified(splits, fraction, seed)
        torch.manual_seed(seed)
        model = model_for(name, splits, args.img_size, args.patch_size)
        if init != "scratch":
            load_checkpoint(model, backbones[(kind, init)], strict=False)
        trainable = sum(p.numel() for p in model.parameters())
        total = trainable
        lr = 1e-3
        if peft is not None:
            h = apply_peft(model, peft[0], **peft[1], positions=args.peft_positions)
            trainable, total = h.trainable_params, h.total_params
            lr = args.peft_lr
        epochs = min(3 * args.epochs, max(args.epochs, math.ceil(args.epochs * 150 / max(1, len(sub.train)))))
        cfg = TrainConfig(epochs=epochs, batch_size=32, lr=lr, weight_decay=0.05,
                          warmup_epochs=1, progress=False, seed=seed, aug=aug)
        r = fit(model, sub, cfg, None, log=None)
        return dict(model=name, init=init, fraction=fraction, seed=seed, labels=len(sub.train), top1=r.metrics.top1,
                    trainable=trainable, total=total, peft=peft[0] if peft else None, time_s=r.train_time_s)

    for kind in [] if args.no_finetune else args.models:
        for fraction in args.fractions:
            for init in ["scratch", *MODELS[kind][1]]:
                accs = []
                for seed in args.seeds:
                    row = finetune(kind, init, fraction, seed)
                    results["finetune"].append(row)
                    accs.append(row["top1"])
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                print(f"{MODELS[kind][0]:12s} {fraction:>5.0%} labels ({row['labels']:4d} images)  {init:8s}  top-1 "
                      f"{statistics.mean(accs):6.2f} +- {sd:5.2f}  ({', '.join(f'{a:.1f}' for a in accs)})",
                      flush=True)
    if not args.no_peft and "vit" in args.models:
        fraction, init = max(args.fractions), args.peft_init or MODELS["vit"][1][0]
        for peft in [None, *(m for m in PEFT if m[0] in args.peft_methods)]:
            accs, row = [], {}
            for seed in args.seeds:
                row = finetune("vit", init, fraction, seed, peft)
                results["peft"].append(row)
                accs.append(row["top1"])
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            label = "full" if peft is None else f"{peft[0]} {peft[1] or ''}{' +pos' * args.peft_positions}"
            print(f"PEFT vit_test+{init} {fraction:.0%} labels  {label:28s} top-1 {statistics.mean(accs):6.2f} +- "
                  f"{sd:5.2f}  trainable {row['trainable']:,}/{row['total']:,} "
                  f"({100 * row['trainable'] / row['total']:.1f}%)", flush=True)
    results["total_time_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"total {results['total_time_s'] / 60:.1f} min; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
