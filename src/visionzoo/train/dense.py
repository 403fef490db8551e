"""``fit_dense``: the training loop for dense tasks (seg, det, sr) on a ``heads.DenseModel``.

The same recipe (``TrainConfig``), optimiser, warm-up cosine schedule, EMA, gradient clipping, autocast, DDP
(``DistributedSampler`` + ``DistributedDataParallel``, metrics reduced across ranks) and exact resume as ``fit``:
``latest.pt`` holds model, optimiser, scheduler, EMA, every rank's RNG states, epoch, step and history, and each
epoch's shuffle and flips come from seeds and those RNG states, so a resumed run repeats the uninterrupted one.
Augmentation: random horizontal flips (``cfg.aug.hflip``), applied to masks, boxes and SR targets alike.
Metrics: seg mIoU and pixel accuracy, det mAP@[.5:.95] / @0.5 (``heads.metrics``), sr PSNR and SSIM.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from visionzoo.errors import ArgumentError, NotFoundError, TrainingDivergedError
from visionzoo.heads.metrics import DetectionEvaluator, SegMetrics
from visionzoo.heads.sr import psnr, ssim
from visionzoo.train.data import ShardSampler
from visionzoo.train.dense_data import DenseDataset, DenseSet
from visionzoo.train.dist import DistInfo, all_gather_objects, barrier
from visionzoo.train.loop import (
    AMP,
    ModelEma,
    TrainConfig,
    TrainingInterrupted,
    _progress,
    _save_train_state,
    rng_state,
    seed_everything,
    set_rng_state,
)
from visionzoo.train.metrics import write_csv
from visionzoo.train.optim import create_optimizer
from visionzoo.train.sched import CosineWarmup

__all__ = ["DENSE_FORMAT", "DenseFitResult", "draw_predictions", "evaluate_dense", "fit_dense", "load_dense_state"]

DENSE_FORMAT = "visionzoo-train-dense"
MAIN_METRIC = {"seg": "miou", "det": "map50", "sr": "psnr"}


@dataclass
class DenseFitResult:
    history: list[dict[str, Any]]
    metrics: dict[str, float]
    out_dir: Path | None
    train_time_s: float
    files: dict[str, str] = field(default_factory=dict)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _to(t: Any, device: torch.device) -> Any:
    if isinstance(t, list):
        return [{k: v.to(device) for k, v in d.items()} for d in t]
    return t.to(device)


def _hflip(x: Tensor, t: Any, task: str, flip: Tensor) -> tuple[Tensor, Any]:
    """Flip the images (and their targets) where ``flip`` is True."""
    if not flip.any():
        return x, t
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if task == "seg":
        return x, torch.where(flip[:, None, None], t.flip(-1), t)
    if task == "sr":
        return x, torch.where(flip[:, None, None, None], t.flip(-1), t)
    W = x.shape[-1]
    out = []
    for d, f in zip(t, flip.tolist()):
        b = d["boxes"]
        out.append(dict(d, boxes=torch.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], 1)) if f else d)
    return x, out


@torch.no_grad()
def evaluate_dense(model: nn.Module, loader: DataLoader, task: str, num_classes: int, *,
                   device: str | torch.device = "cpu", amp: str = "none") -> dict[str, float]:
    """The task's metrics over ``loader`` (reduced across DDP ranks) and the mean loss."""
    model = _unwrap(model)
    was = model.training
    model.eval()
    dev = torch.device(device)
    seg = SegMetrics(num_classes, device=dev) if task == "seg" else None  # classes incl. background
    preds, gts, sums = [], [], torch.zeros(4, dtype=torch.float64, device=dev)  # loss*n, psnr, ssim, n
    try:
        for x, t in loader:
            x, t = x.to(dev), _to(t, dev)
            with torch.autocast(dev.type, dtype=AMP[amp] or torch.float32, enabled=AMP[amp] is not None):
                out = model(x)
            out = {k: v.float() for k, v in out.items()} if isinstance(out, dict) else out.float()
            n = x.shape[0]
            sums[0] += float(model.loss(out, t)) * n
            sums[3] += n
            if task == "seg":
                seg.update(out, t)
            elif task == "det":
                preds += [{k: v.cpu() for k, v in d.items()} for d in model.head.postprocess(out)]
                gts += [{k: v.cpu() for k, v in d.items()} for d in t]
            else:
                pred = out.clamp(0, 1)
                sums[1] += psnr(pred, t).clamp(max=100).sum()
                sums[2] += ssim(pred, t).sum()
    finally:
        model.train(was)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    n = max(float(sums[3]), 1.0)
    res = {"val_loss": float(sums[0]) / n}
    if task == "seg":
        r = seg.reduce().compute()
        res.update(miou=r["miou"], pixel_acc=r["pixel_acc"])
    elif task == "det":
        ev = DetectionEvaluator(num_classes)
        for p, g in zip(sum(all_gather_objects(preds), []), sum(all_gather_objects(gts), [])):
            ev.update([p], [g])
        r = ev.compute()
        res.update(map=r["map"], map50=r["map50"])
    else:
        res.update(psnr=float(sums[1]) / n, ssim=float(sums[2]) / n)
    return res


def load_dense_state(path: str | Path) -> dict[str, Any]:
    """Read a ``latest.pt`` written by ``fit_dense`` (``weights_only=True``)."""
    from visionzoo.weights import _torch_load

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = _torch_load(path)
    if not isinstance(state, dict) or state.get("format") != DENSE_FORMAT:
        raise ArgumentError(f"{str(path)!r} is not a dense training checkpoint written by visionzoo train --task")
    return state


def fit_dense(model: nn.Module, train: DenseSet, val: DenseSet, task: str, cfg: TrainConfig | None = None,
              out_dir: str | Path | None = None, *, resume: str | Path | None = None,
              dist_info: DistInfo | None = None, log: Callable[[str], None] | None = print) -> DenseFitResult:
    """Train the ``DenseModel`` ``model`` on ``train`` for ``task``; evaluate on ``val`` after each epoch; write
    ``metrics.csv`` and ``latest.pt`` every epoch and ``predictions.png`` and ``model.pt`` at the end (rank 0)."""
    cfg = (cfg or TrainConfig()).validate()
    if getattr(model, "task", None) != task:
        raise ArgumentError(f"the model's head is for task {getattr(model, 'task', None)!r}, not {task!r}")
    d = dist_info or DistInfo()
    out = Path(out_dir) if out_dir is not None else None
    say = (log or (lambda s: None)) if d.is_main else (lambda s: None)
    device = torch.device(d.device)
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if cfg.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # upsampling backward has no deterministic kernel
    running, saved = 0, None
    try:
        seed_everything(cfg.seed + d.rank)
        base = model.to(device)
        train_ds, val_ds = DenseDataset(train, task), DenseDataset(val, task)
        per_rank = len(train_ds) // d.world
        if per_rank < 1:
            raise ArgumentError(f"the training set has {len(train_ds)} images, fewer than the {d.world} processes")
        sampler = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        train_loader = DataLoader(train_ds, cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                                  drop_last=per_rank > cfg.batch_size, generator=gen,
                                  collate_fn=DenseDataset.collate)
        val_loader = DataLoader(val_ds, cfg.eval_batch_size or cfg.batch_size,
                                sampler=ShardSampler(len(val_ds), d.rank, d.world), num_workers=cfg.workers,
                                collate_fn=DenseDataset.collate)
        if cfg.grad_checkpointing:
            base.backbone.set_grad_checkpointing(True)
        ema = ModelEma(base, cfg.ema_decay) if cfg.ema else None
        net = (nn.parallel.DistributedDataParallel(base, device_ids=[device.index] if device.type == "cuda" else None)
               if d.enabled else base)
        opt = create_optimizer(base, cfg.opt, cfg.lr, cfg.weight_decay, cfg.momentum, layer_decay=cfg.layer_decay)
        steps = math.ceil(len(train_loader) / cfg.accum_steps)
        sched = CosineWarmup(opt, cfg.epochs * steps, cfg.lr, round(cfg.warmup_epochs * steps), min(cfg.min_lr, cfg.lr))
        history: list[dict[str, Any]] = []
        epoch = 0

        def state() -> dict[str, Any]:
            name, args = getattr(base.backbone, "variant", None) or (base.name, {})
            return {"format": DENSE_FORMAT, "task": task, "head": base.head_name, "variant": name, "args": dict(args),
                    "classes": list(train.classes), "input_size": int(train.images.shape[-1]),
                    "num_classes": base.num_classes, "epoch": epoch, "step": sched.last_step,
                    "model": base.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "ema": ema.state_dict() if ema else None, "rng": all_gather_objects(rng_state()),
                    "history": history, "config": asdict(cfg)}

        if resume == "auto":
            resume = out / "latest.pt" if out is not None and (out / "latest.pt").is_file() else None
        if resume is not None:
            st = load_dense_state(resume)
            if (st["task"], st["head"], st["variant"]) != (task, base.head_name, state()["variant"]):
                raise ArgumentError(f"resume: the checkpoint is {st['variant']} + {st['head']} ({st['task']}), this "
                                    f"run is {state()['variant']} + {base.head_name} ({task})")
            base.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            if ema is not None:
                if st.get("ema") is None:
                    raise ArgumentError("resume: the checkpoint has no EMA weights; resume without --ema")
                ema.load_state_dict(st["ema"])
            set_rng_state(st["rng"][d.rank % len(st["rng"])])
            epoch, history = int(st["epoch"]), list(st["history"])
            saved = epoch
            say(f"resumed from {resume} after epoch {epoch} (step {sched.last_step})")
        t_start = time.perf_counter()
        ran, metrics = 0, None
        dtype = AMP[cfg.amp]
        with _progress(cfg.progress and d.is_main) as progress:
            while epoch < cfg.epochs and (cfg.stop_after is None or ran < cfg.stop_after):
                running = epoch + 1
                t0 = time.perf_counter()
                net.train()
                sampler.set_epoch(epoch)
                gen.manual_seed(cfg.seed + epoch)
                loss_sum, seen, n = 0.0, 0, len(train_loader)
                bar = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=n) if progress else None
                for i, (x, t) in enumerate(train_loader):
                    x, t = x.to(device), _to(t, device)
                    x, t = _hflip(x, t, task, torch.rand(x.shape[0]) < cfg.aug.hflip)
                    last = (i + 1) % cfg.accum_steps == 0 or i + 1 == n
                    with net.no_sync() if d.enabled and not last else nullcontext():
                        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                            o = net(x)
                        o = {k: v.float() for k, v in o.items()} if isinstance(o, dict) else o.float()
                        loss = base.loss(o, t)
                        (loss / cfg.accum_steps).backward()
                    if last:
                        if cfg.clip_grad is not None:
                            torch.nn.utils.clip_grad_norm_(base.parameters(), cfg.clip_grad)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        sched.step()
                        if ema is not None:
                            ema.update(base)
                    loss_sum += loss.item() * x.shape[0]
                    seen += x.shape[0]
                    if bar is not None:
                        progress.update(bar, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs} loss "
                                        f"{loss.item():.3f}")
                if bar is not None:
                    progress.remove_task(bar)
                sums = torch.tensor([loss_sum, seen], dtype=torch.float64, device=device)
                if d.enabled:
                    torch.distributed.all_reduce(sums)
                train_loss = float(sums[0] / sums[1].clamp(min=1))
                if not math.isfinite(train_loss):
                    raise TrainingDivergedError(f"the training loss is {train_loss} in epoch {epoch + 1}; lower --lr "
                                                f"or use --clip-grad")
                if d.enabled:
                    for b in base.buffers():
                        torch.distributed.broadcast(b, 0)
                metrics = evaluate_dense(ema.module if ema else base, val_loader, task, base.num_classes,
                                         device=device, amp=cfg.amp)
                row = dict(epoch=epoch + 1, step=sched.last_step, lr=sched.get_last_lr()[0], train_loss=train_loss,
                           **metrics, epoch_time_s=time.perf_counter() - t0)
                history.append(row)
                epoch += 1
                ran += 1
                st = state()
                if d.is_main and out is not None:
                    write_csv(history, out / "metrics.csv")
                    _save_train_state(out / "latest.pt", st)
                saved = epoch if out is not None else None
                say(f"epoch {epoch}/{cfg.epochs}  train loss {train_loss:.4f}  " + "  ".join(
                    f"{k} {v:.4f}" for k, v in metrics.items()) + f"  ({row['epoch_time_s']:.1f} s)")
        train_time = time.perf_counter() - t_start
        if metrics is None:
            metrics = evaluate_dense(ema.module if ema else base, val_loader, task, base.num_classes, device=device,
                                     amp=cfg.amp)
        files = {}
        if d.is_main and out is not None and epoch >= cfg.epochs:
            files = {"metrics": str(out / "metrics.csv"), "checkpoint": str(out / "latest.pt")}
            files["predictions"] = str(draw_predictions(ema.module if ema else base, val, task,
                                                        out / "predictions.png"))
        barrier()
        return DenseFitResult(history, metrics, out, train_time, files)
    except KeyboardInterrupt:
        raise TrainingInterrupted(running, saved, out / "latest.pt" if out is not None else None) from None
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


# --- pictures ------------------------------------------------------------------------------------------------
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def _colour(k: int) -> tuple[int, int, int]:
    return PALETTE[k % len(PALETTE)] if k < len(PALETTE) else tuple((k * 37 % 256, k * 91 % 256, k * 53 % 256))


@torch.no_grad()
def draw_predictions(model: nn.Module, ds: DenseSet, task: str, path: str | Path, n: int = 4) -> Path:
    """A PNG, one row per image: seg, image | truth | prediction masks over the image; det, truth (white) and
    predicted boxes (class colour, label and score); sr, bicubic | prediction | high resolution."""
    from PIL import Image, ImageDraw

    model = _unwrap(model)
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    n = min(n, len(ds))
    x = ds.images[:n].float().to(dev) / 255
    try:
        out = model.predict(x)
    finally:
        model.train(was)
    rows = []
    for i in range(n):
        img = Image.fromarray(ds.images[i].permute(1, 2, 0).numpy())
        if task == "seg":
            tiles = [img]
            for m in (ds.masks[i], out[i].cpu()):
                colour = torch.tensor([_colour(k) for k in range(int(max(m.max(), 1)) + 1)], dtype=torch.uint8)
                over = Image.fromarray(colour[m.long().clamp(max=len(colour) - 1)].numpy())
                tiles.append(Image.blend(img, over, 0.5))
        elif task == "det":
            tile = img.copy()
            draw = ImageDraw.Draw(tile)
            for b in ds.boxes[i].tolist():
                draw.rectangle(b, outline=(255, 255, 255))
            for b, s, c in zip(out[i]["boxes"].tolist(), out[i]["scores"].tolist(), out[i]["labels"].tolist()):
                if s >= 0.3:
                    draw.rectangle(b, outline=_colour(c + 1), width=2)
                    name = ds.classes[c] if c < len(ds.classes) else str(c)
                    draw.text((b[0] + 2, b[1] + 1), f"{name} {s:.2f}", fill=_colour(c + 1))
            tiles = [img, tile]
        else:
            hr = Image.fromarray(ds.hr[i].permute(1, 2, 0).numpy())
            pred = Image.fromarray((out[i].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
            tiles = [img.resize(hr.size, Image.Resampling.BICUBIC), pred, hr]
        w, h = tiles[-1].size
        row = Image.new("RGB", (w * len(tiles), h))
        for j, t in enumerate(tiles):
            row.paste(t.resize((w, h), Image.Resampling.NEAREST), (j * w, 0))
        rows.append(row)
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
