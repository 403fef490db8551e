"""``fit`` and ``evaluate``: the training loop, its checkpoints and exact resume.

One epoch: batches from ``data.make_loaders`` -> ``augment.TrainAugment`` (kornia) -> forward under autocast ->
soft-target cross-entropy -> backward (accumulated, DDP-synchronised on the last micro-batch) -> clip -> step
(SAM: two passes) -> lr schedule -> EMA. After each epoch: evaluation (reduced across ranks), a metrics CSV row
and an atomically written ``latest.pt`` holding model, optimiser, scheduler, EMA, scaler, every rank's RNG
states, epoch, step and the history, so ``resume`` continues exactly where the run stopped.
"""
from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from visionzoo.backbone import require_logits
from visionzoo.errors import ArgumentError, NotFoundError, TrainingDivergedError
from visionzoo.train.augment import AugConfig, Normalize, TrainAugment, channel_stats, soft_cross_entropy
from visionzoo.train.data import DataSplits, make_loaders
from visionzoo.train.dist import DistInfo, all_gather_objects, barrier
from visionzoo.train.metrics import EvalMetrics, MetricAccumulator, plot_history, write_csv
from visionzoo.train.optim import SAM, TrAct, create_optimizer
from visionzoo.train.sched import CosineWarmup

__all__ = ["FitResult", "ModelEma", "TrainConfig", "TrainingInterrupted", "build_model", "evaluate", "fit",
           "load_train_state", "seed_everything"]

TRAIN_FORMAT = "visionzoo-train"
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LossFn = Callable[[nn.Module, Tensor, Tensor], "tuple[Tensor, Tensor]"]


@dataclass
class TrainConfig:
    """One training recipe. ``warmup_epochs`` may be fractional; ``stop_after`` ends this call after that many
    epochs (the schedule still spans ``epochs``), as a run cut short that ``resume`` continues."""

    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int | None = None
    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    layer_decay: float | None = None
    sam: bool = False
    sam_rho: float = 0.05
    tract: float | None = None  # TrAct's lambda for the first layer's update (optim.TrAct), e.g. 0.1
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    ema: bool = False
    ema_decay: float = 0.998
    clip_grad: float | None = None
    accum_steps: int = 1
    amp: str = "none"
    grad_checkpointing: bool = False
    seed: int = 0
    deterministic: bool = True
    crop_pct: float | None = None  # None: the variant's
    workers: int = 0
    stop_after: int | None = None
    progress: bool = True
    aug: AugConfig = field(default_factory=AugConfig)

    def validate(self) -> TrainConfig:
        for k in ("epochs", "batch_size", "accum_steps"):
            if int(getattr(self, k)) < 1:
                raise ArgumentError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not self.lr > 0:
            raise ArgumentError(f"lr must be > 0, got {self.lr}")
        if self.amp not in AMP:
            raise ArgumentError(f"amp must be one of {tuple(AMP)}, got {self.amp!r}")
        if self.sam and self.accum_steps > 1:
            raise ArgumentError("sam takes two forward/backward passes per step; use it with accum_steps=1")
        if self.tract is not None and not self.tract > 0:
            raise ArgumentError(f"tract (TrAct's lambda) must be > 0, got {self.tract}; the paper's default is 0.1")
        if self.tract is not None and self.sam:
            raise ArgumentError("tract preconditions one gradient per step; use it without sam")
        if self.sam and self.amp == "fp16":
            raise ArgumentError("sam with amp='fp16' (a gradient scaler) is not supported; use amp='bf16' or 'none'")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ArgumentError(f"clip_grad must be > 0 (or None), got {self.clip_grad}")
        if not 0 < self.ema_decay < 1:
            raise ArgumentError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ArgumentError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ArgumentError(f"stop_after must be >= 1, got {self.stop_after}")
        self.aug.validate()
        return self


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``fit``: the epoch that was running and the one the last ``latest.pt`` holds (if any)."""

    def __init__(self, epoch: int, saved_epoch: int | None, checkpoint: Path | None) -> None:
        self.epoch, self.saved_epoch, self.checkpoint = epoch, saved_epoch, checkpoint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        if self.epoch == 0:
            return "interrupted before training started; nothing was written"
        if self.saved_epoch and self.checkpoint is not None:
            return (f"interrupted in epoch {self.epoch}; the last complete checkpoint is epoch {self.saved_epoch} "
                    f"({self.checkpoint}); continue with the same command and --resume auto")
        if self.checkpoint is None:
            return f"interrupted in epoch {self.epoch}; no checkpoint is written without an output folder"
        return f"interrupted in epoch {self.epoch}, before any epoch was complete; nothing to resume, start again"


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    metrics: EvalMetrics | None
    ema_metrics: EvalMetrics | None
    out_dir: Path | None
    train_time_s: float
    files: dict[str, str] = field(default_factory=dict)


# --- helpers -------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain types (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ModelEma:
    """Exponential moving average of a model's weights (buffers copied), with timm's warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float = 0.998) -> None:
        self.module = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, m in zip(self.module.state_dict().values(), _unwrap(model).state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(m.detach(), 1 - d)
            else:
                e.copy_(m)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Read a ``latest.pt`` written by ``fit`` (``weights_only=True``: it never runs code)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"checkpoint {str(path)!r} does not exist")
    from visionzoo.weights import _torch_load  # our one-line errors for empty, truncated or code-running files

    state = _torch_load(path)
    if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT:
        raise ArgumentError(f"{str(path)!r} is not a training checkpoint written by visionzoo train "
                            f"(format {TRAIN_FORMAT!r}); to start from weights, pass them as the model's checkpoint")
    return state


def _save_train_state(path: Path, state: dict[str, Any]) -> None:
    from visionzoo.weights import atomic_write  # temp file in the same folder, then os.replace

    atomic_write(path, lambda tmp: torch.save(state, tmp))


# --- evaluation ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, num_classes: int, *, mean: list[float],
             std: list[float], device: str | torch.device = "cpu", amp: str = "none",
             classes: list[str] | None = None) -> EvalMetrics:
    """Top-1, top-5, loss, per-class accuracy and confusion over ``loader`` (summed across DDP ranks)."""
    require_logits(model, "evaluate")
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    norm = Normalize(mean, std).to(device)
    acc = MetricAccumulator(num_classes, device)
    dev_type = torch.device(device).type
    try:
        for x, y in loader:
            x, y = norm(x.to(device)), y.to(device)
            with torch.autocast(dev_type, dtype=AMP[amp] or torch.float32, enabled=AMP[amp] is not None):
                logits = model(x)
            acc.update(logits.float(), y, torch.nn.functional.cross_entropy(logits.float(), y))
    finally:
        model.train(was_training)
    return acc.reduce().result(classes or [])


# --- training ------------------------------------------------------------------------------------------------
class _Trainer:
    """The state of one ``fit`` call; methods are the steps of the loop."""

    def __init__(self, model: nn.Module, splits: DataSplits, cfg: TrainConfig, out_dir: Path | None,
                 dist_info: DistInfo, log: Callable[[str], None], loss_fn: LossFn | None = None,
                 on_step: Callable[[float], None] | None = None) -> None:
        self.cfg, self.splits, self.out_dir, self.d, self.log = cfg, splits, out_dir, dist_info, log
        self.loss_fn, self.on_step = loss_fn, on_step
        if loss_fn is not None and dist_info.enabled:
            raise ValueError("a custom loss_fn runs the model outside DistributedDataParallel; train it in one "
                             "process (no torchrun), or without the loss (e.g. --tokens without consistency)")
        self.device = torch.device(dist_info.device)
        base = model.to(self.device)
        dc = getattr(base, "data_config", None) or {}
        self.img_size = int(dc.get("input_size", (3, 224, 224))[-1])
        lo, mult = getattr(base, "min_input_size", 1), getattr(base, "input_multiple", 1)
        if self.img_size < lo or self.img_size % mult:
            ok = max(lo, -(-self.img_size // mult) * mult)
            raise ArgumentError(f"{getattr(base, 'name', type(base).__name__)}: input size {self.img_size} must be at "
                                f"least {lo} and a multiple of {mult}; use img_size={ok}")
        self.mean, self.std = channel_stats(dc.get("mean", (0.5,) * 3), dc.get("std", (0.5,) * 3), base.in_chans)
        if base.in_chans != splits.in_chans:
            raise ArgumentError(f"the model takes in_chans={base.in_chans} but the data has {splits.in_chans} "
                                f"channels; build the model with in_chans={splits.in_chans} or load the data with "
                                f"in_chans={base.in_chans}")
        if base.num_classes != splits.num_classes and not getattr(base, "is_pretext", False):
            raise ArgumentError(f"the model has num_classes={base.num_classes} but the data {splits.num_classes} "
                                f"classes; build it with num_classes={splits.num_classes}")
        self.train_loader, self.val_loader = make_loaders(
            splits, self.img_size, cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
            crop_pct=cfg.crop_pct or dc.get("crop_pct", 0.875), interpolation=dc.get("interpolation", "bicubic"),
            workers=cfg.workers, seed=cfg.seed, rank=dist_info.rank, world=dist_info.world)
        if cfg.grad_checkpointing:
            base.set_grad_checkpointing(True)
        self.base = base
        self.ema = ModelEma(base, cfg.ema_decay) if cfg.ema else None
        if dist_info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # a pretext objective may leave a backbone part unused (MAE skips the final norm): it says so
            unused = bool(getattr(base, "find_unused_parameters", False))
            self.model = nn.parallel.DistributedDataParallel(base, device_ids=ids, find_unused_parameters=unused)
        else:
            self.model = base
        self.opt = create_optimizer(base, cfg.opt, cfg.lr, cfg.weight_decay, cfg.momentum,
                                    layer_decay=cfg.layer_decay, sam=cfg.sam, sam_rho=cfg.sam_rho)
        self.tract = TrAct(base, cfg.tract) if cfg.tract is not None else None
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.accum_steps)
        self.sched = CosineWarmup(self.opt, cfg.epochs * self.steps_per_epoch, cfg.lr,
                                  round(cfg.warmup_epochs * self.steps_per_epoch), min(cfg.min_lr, cfg.lr))
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.augment = TrainAugment(cfg.aug, self.img_size, self.mean, self.std, splits.num_classes).to(self.device)
        self.history: list[dict[str, Any]] = []
        self.epoch = 0

    # --- state ------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        name, args = getattr(self.base, "variant", None) or (type(self.base).__name__, {})
        return {"format": TRAIN_FORMAT, "variant": name, "args": dict(args), "classes": self.splits.classes,
                "input_size": self.img_size, "in_chans": self.base.in_chans, "epoch": self.epoch,
                "step": self.sched.last_step, "model": self.base.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "scaler": self.scaler.state_dict() if self.scaler else None, "rng": all_gather_objects(rng_state()),
                "history": self.history, "config": asdict(self.cfg), "tokens": _tokens_spec(self.base),
                "adapters": _adapter_spec(self.base)}

    def load(self, state: dict[str, Any]) -> None:
        name = getattr(self.base, "variant", (None,))[0]
        if name is not None and state.get("variant") != name:
            raise ArgumentError(f"resume: the checkpoint is for {state.get('variant')!r}, the model is {name!r}")
        self.base.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ArgumentError("resume: the checkpoint has no EMA weights; resume without --ema or start afresh")
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        if len(rngs) != self.d.world:
            self.log(f"resume: the checkpoint has RNG states of {len(rngs)} processes, this run {self.d.world}; "
                     f"augmentation will not repeat the interrupted run exactly")
        set_rng_state(rngs[self.d.rank % len(rngs)])
        self.epoch, self.history = int(state["epoch"]), list(state["history"])

    # --- one step ---------------------------------------------------------------------------------------
    def _forward_backward(self, x: Tensor, t: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        dtype = AMP[self.cfg.amp]
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if self.loss_fn is not None:
                loss, logits = self.loss_fn(self.base, x, t)
            else:
                logits = self.model(x)
        if self.loss_fn is None:
            loss = soft_cross_entropy(logits, t)
        (self.scaler.scale(loss * scale) if self.scaler else loss * scale).backward()
        return loss.detach(), logits.detach()

    def _clip(self) -> None:
        if self.cfg.clip_grad is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.base.parameters(), self.cfg.clip_grad)

    def _step(self, x: Tensor, t: Tensor) -> None:
        if isinstance(self.opt, SAM):
            self._clip()
            self.opt.first_step(zero_grad=True)
            self._forward_backward(x, t, 1.0)
            self._clip()
            self.opt.second_step(zero_grad=True)
        else:
            if self.tract is not None:
                self.tract.precondition()
            self._clip()
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.progress_hook()
        if self.ema is not None:
            self.ema.update(self.base)

    def progress_hook(self) -> None:
        """Tell ``on_step`` the fraction of training done (schedules of tools applied to the model)."""
        if self.on_step is not None:
            self.on_step(min(1.0, self.sched.last_step / max(1, self.cfg.epochs * self.steps_per_epoch)))

    def train_epoch(self, progress: Any) -> tuple[float, float]:
        self.model.train()
        self.train_loader.sampler.set_epoch(self.epoch)
        self.train_loader.generator.manual_seed(self.cfg.seed + self.epoch)
        acc = MetricAccumulator(self.splits.num_classes, self.device)
        n, accum = len(self.train_loader), self.cfg.accum_steps
        task = progress.add_task(f"epoch {self.epoch + 1}/{self.cfg.epochs}", total=n) if progress else None
        for i, (x, y) in enumerate(self.train_loader):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device)
            x, t = self.augment(x, y)
            last = (i + 1) % accum == 0 or i + 1 == n
            sync = self.model.no_sync() if self.d.enabled and not last else nullcontext()
            with sync:
                loss, logits = self._forward_backward(x, t, 1.0 / accum)
            if last:
                self._step(x, t)
            acc.update(logits.float(), y, loss)
            if task is not None:
                progress.update(task, advance=1, description=f"epoch {self.epoch + 1}/{self.cfg.epochs} "
                                f"loss {loss.item():.3f} lr {self.sched.get_last_lr()[0]:.2e}")
        if task is not None:
            progress.remove_task(task)
        m = acc.reduce().result()
        if not math.isfinite(m.loss):
            raise TrainingDivergedError(f"the training loss is {m.loss} in epoch {self.epoch + 1}; lower --lr or "
                                        f"use --clip-grad")
        return m.loss, m.top1

    def evaluate(self, model: nn.Module) -> EvalMetrics:
        if self.d.enabled:  # evaluate every rank with rank 0's BatchNorm statistics
            for b in _unwrap(model).buffers():
                torch.distributed.broadcast(b, 0)
        return evaluate(model, self.val_loader, self.splits.num_classes, mean=self.mean, std=self.std,
                        device=self.device, amp=self.cfg.amp, classes=self.splits.classes)

    def finish(self, out: Path) -> dict[str, str]:
        """The end-of-run files (a subclass, e.g. pretraining, writes its own)."""
        return _finish(self, out)

    def write_epoch(self) -> None:
        state = self.state()  # every rank takes part: the RNG states are gathered
        if self.d.is_main and self.out_dir is not None:
            write_csv(self.history, self.out_dir / "metrics.csv")
            _save_train_state(self.out_dir / "latest.pt", state)


def _progress(enabled: bool) -> Any:
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)


def fit(model: nn.Module, splits: DataSplits, cfg: TrainConfig | None = None, out_dir: str | Path | None = None, *,
        resume: str | Path | None = None, dist_info: DistInfo | None = None,
        log: Callable[[str], None] | None = print, loss_fn: LossFn | None = None,
        on_step: Callable[[float], None] | None = None, trainer_cls: type[_Trainer] | None = None) -> FitResult:
    """Train ``model`` on ``splits`` with ``cfg``; write ``metrics.csv``, ``latest.pt`` (every epoch) and, at the
    end, ``curves.png`` and ``model.safetensors`` (``model_ema.safetensors``) into ``out_dir`` (rank 0 only).

    ``resume`` is a ``latest.pt`` path, or ``"auto"`` for ``out_dir/latest.pt`` when it exists. ``loss_fn(model, x,
    soft_targets) -> (loss, logits)`` replaces the soft-target cross-entropy (a tool's training loss, e.g. MCTF's
    token-reduction consistency; single process only); ``on_step(fraction_done)`` is called before the first step
    and after every optimiser step (a tool's schedule, e.g. EViT's keep-rate warm-up). ``visionzoo.tokens`` handles
    provide both (``handle.training_loss``, ``handle.on_train_step``). ``trainer_cls`` is a ``_Trainer`` subclass
    with other steps (``visionzoo.train.pretrain`` runs its pretext objectives this way). The model must be
    built with the data's ``num_classes`` and ``in_chans``; its ``data_config`` gives the input size, mean, std,
    crop_pct and interpolation.
    """
    require_logits(model, "fit")
    cfg = (cfg or TrainConfig()).validate()
    d = dist_info or DistInfo()
    out = Path(out_dir) if out_dir is not None else None
    say = (log or (lambda s: None)) if d.is_main else (lambda s: None)
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if cfg.deterministic:
        if d.device.startswith("cuda"):  # cuBLAS needs this for repeatable matmuls; kernels without a
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic version only warn
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=not d.device.startswith("cpu"))
    running, saved = 0, None  # the epoch in progress; the epoch the latest.pt on disk holds
    try:
        seed_everything(cfg.seed + d.rank)
        tr = (trainer_cls or _Trainer)(model, splits, cfg, out, d, say, loss_fn, on_step)
        if resume == "auto":
            resume = out / "latest.pt" if out is not None and (out / "latest.pt").is_file() else None
        if resume is not None:
            tr.load(load_train_state(resume))
            say(f"resumed from {resume} after epoch {tr.epoch} (step {tr.sched.last_step})")
        tr.progress_hook()
        t_start = time.perf_counter()
        ran = 0
        metrics = ema_metrics = None
        saved = tr.epoch if resume is not None else None  # the epoch the latest.pt on disk holds
        with _progress(cfg.progress and d.is_main) as progress:
            while tr.epoch < cfg.epochs and (cfg.stop_after is None or ran < cfg.stop_after):
                running = tr.epoch + 1
                t0 = time.perf_counter()
                train_loss, train_acc = tr.train_epoch(progress)
                metrics = tr.evaluate(tr.base)
                row = dict(epoch=tr.epoch + 1, step=tr.sched.last_step, lr=tr.sched.get_last_lr()[0],
                           train_loss=train_loss, train_top1=train_acc, val_loss=metrics.loss, val_top1=metrics.top1,
                           val_top5=metrics.top5)
                if tr.ema is not None:
                    ema_metrics = tr.evaluate(tr.ema.module)
                    row.update(ema_val_loss=ema_metrics.loss, ema_val_top1=ema_metrics.top1)
                row["epoch_time_s"] = time.perf_counter() - t0
                tr.history.append(row)
                tr.epoch += 1
                ran += 1
                tr.write_epoch()
                saved = tr.epoch if out is not None else None
                say(f"epoch {row['epoch']}/{cfg.epochs}  train loss {train_loss:.4f}  val loss {metrics.loss:.4f}  "
                    f"top-1 {metrics.top1:.2f}%" + (f"  EMA {ema_metrics.top1:.2f}%" if ema_metrics else "")
                    + f"  ({row['epoch_time_s']:.1f} s)")
        train_time = time.perf_counter() - t_start
        if metrics is None and tr.history:  # nothing left to run after a resume: report the stored model
            metrics = tr.evaluate(tr.base)
            ema_metrics = tr.evaluate(tr.ema.module) if tr.ema else None
        files = tr.finish(out) if d.is_main and out is not None and tr.epoch >= cfg.epochs else {}
        barrier()
        return FitResult(tr.history, metrics, ema_metrics, out, train_time, files)
    except KeyboardInterrupt:
        raise TrainingInterrupted(running, saved, out / "latest.pt" if out is not None else None) from None
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def _finish(tr: _Trainer, out: Path) -> dict[str, str]:
    """The end-of-run files: curves plot and the final weights in visionzoo format."""
    from visionzoo.weights import save

    files = {"metrics": str(out / "metrics.csv"), "checkpoint": str(out / "latest.pt")}
    files["curves"] = str(plot_history({tr.base.name: tr.history}, out / "curves.png", title=tr.base.name))
    extra = train_metadata(tr.splits.classes, tr.img_size)
    if _tokens_spec(tr.base):
        extra["tokens"] = _tokens_spec(tr.base)
    if _adapter_spec(tr.base):
        import json

        extra["adapters"] = json.dumps(_adapter_spec(tr.base))
    if getattr(tr.base, "variant", None) is not None:
        files["model"] = str(save(tr.base, out / "model.safetensors", extra=extra))
        if tr.ema is not None:
            tr.ema.module.variant = tr.base.variant
            files["model_ema"] = str(save(tr.ema.module, out / "model_ema.safetensors", extra=extra))
    return files


def _tokens_spec(model: nn.Module) -> str | None:
    """The token reduction applied to ``model`` (``visionzoo.tokens``), as ``--tokens`` takes it, or ``None``."""
    handle = getattr(model, "token_reduction", None)
    return None if handle is None else handle.spec


def _adapter_spec(model: nn.Module) -> dict[str, Any] | None:
    """The SPT/LSA/PEFT additions of ``model`` (``visionzoo.train.peft.adapter_spec``), or ``None``."""
    from visionzoo.train.peft import adapter_spec

    return adapter_spec(model)


def train_metadata(classes: list[str], input_size: int) -> dict[str, str]:
    """String metadata stored next to trained weights so ``visionzoo eval`` preprocesses as training did."""
    import json

    return {"classes": json.dumps(classes), "input_size": str(input_size)}


def build_model(name: str, num_classes: int, in_chans: int, img_size: int | None = None,
                patch_size: int | None = None, **overrides: Any) -> nn.Module:
    """``create_model`` for training: ``patch_size`` is passed only to families that have one (so one recipe
    serves ConvNets and ViTs); other ``overrides`` go to every model and must be its constructor's arguments."""
    from visionzoo.registry import create_model, get_variant

    if patch_size is not None and getattr(get_variant(name).cls, "takes_patch_size", False):
        overrides["patch_size"] = patch_size
    return create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **overrides)
