"""Evaluate a trained checkpoint: rebuild the model, preprocess as it was trained, report and plot.

Accepts the files ``visionzoo train`` writes (``latest.pt``, ``model.safetensors``, ``model_ema.safetensors``)
and any other checkpoint ``create_model(..., checkpoint_path=)`` reads (then ``--model`` names the variant).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from visionzoo.errors import ArgumentError, NotFoundError
from visionzoo.train.augment import channel_stats
from visionzoo.train.data import DataSplits, make_loaders
from visionzoo.train.loop import TRAIN_FORMAT, evaluate
from visionzoo.train.metrics import MAX_CONFUSION_CLASSES, EvalMetrics, plot_confusion, write_csv

__all__ = ["eval_checkpoint", "load_trained", "write_report"]


def _plain_args(args: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def load_trained(path: str | Path, name: str | None = None, *, num_classes: int | None = None,
                 in_chans: int | None = None, img_size: int | None = None, ema: bool = False,
                 tokens: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model in ``path`` and what training recorded (``classes``, ``input_size``, ``tokens``); see the module
    docstring.

    ``name`` must match the recorded variant when the file records one, and is required when it does not.
    ``tokens``: a token reduction to apply (``"tome:r=8"``, see ``visionzoo.tokens.parse_spec``), ``"none"`` for
    none, or ``None`` for the one the run was trained with (recorded by ``visionzoo train --tokens``).
    """
    from visionzoo.registry import create_model
    from visionzoo.weights import FORMAT, load_checkpoint, read

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"checkpoint {str(path)!r} does not exist")
    state: dict[str, Any] | None = None
    if path.suffix != ".safetensors":
        from visionzoo.errors import CheckpointError
        from visionzoo.weights import _torch_load

        try:
            obj = _torch_load(path)
        except CheckpointError:  # weights.read below raises the explanatory error
            obj = None
        if isinstance(obj, dict) and obj.get("format") == TRAIN_FORMAT:
            state = obj
    if state is not None:
        variant, args, meta = state["variant"], state["args"], {k: state[k] for k in ("classes", "input_size")}
        if state.get("tokens"):
            meta["tokens"] = state["tokens"]
        if state.get("adapters"):
            meta["adapters"] = state["adapters"]
        if ema and state.get("ema") is None:
            raise ArgumentError(f"{path}: --ema asked for, but the run was trained without EMA")
        weights = state["ema"]["module"] if ema else state["model"]
    else:
        weights, meta = read(path)
        variant, args = (meta.get("variant"), meta.get("args")) if meta.get("format") == FORMAT else (None, None)
        if "classes" in meta:
            meta["classes"] = json.loads(meta["classes"])
        if "input_size" in meta:
            meta["input_size"] = int(meta["input_size"])
        if "adapters" in meta:
            meta["adapters"] = json.loads(meta["adapters"])
    if variant is not None and name is not None and name != variant:
        raise ArgumentError(f"--model {name!r} does not match the checkpoint, which holds {variant!r}; drop --model or "
                            f"pass --model {variant}")
    if variant is not None:
        model = create_model(variant, **_plain_args(args))
    elif name is None:
        raise ArgumentError(f"{path} does not record its model; pass --model NAME")
    else:
        model = create_model(name, num_classes=num_classes or 1000, in_chans=in_chans or 3, img_size=img_size)
    size = img_size or meta.get("input_size") or model.data_config["input_size"][-1]
    model.data_config["input_size"] = (model.in_chans, size, size)
    spec = meta.get("tokens") if tokens is None else (None if tokens == "none" else tokens)
    if spec:
        from visionzoo.tokens import apply_spec

        apply_spec(model, spec)  # before loading: token slimming adds parameters the checkpoint holds
    if meta.get("adapters"):  # SPT/LSA/DHVT/PEFT (visionzoo train --spt/--lsa/--dhvt/--peft) add parameters too
        from visionzoo.train.peft import apply_adapter_spec

        apply_adapter_spec(model, meta["adapters"])
    load_checkpoint(model, weights)
    return model.eval(), meta


def eval_checkpoint(model: nn.Module, splits: DataSplits, meta: dict[str, Any], *, batch_size: int = 128,
                    crop_pct: float | None = None, device: str = "cpu", amp: str = "none") -> EvalMetrics:
    """Top-1/top-5/loss/per-class/confusion of ``model`` on the validation split, preprocessed as in training."""
    classes = meta.get("classes")
    if classes is not None and list(classes) != list(splits.classes):
        raise ArgumentError(f"the checkpoint was trained on classes {classes[:10]}, the data has "
                            f"{splits.classes[:10]}; evaluate on the same dataset (and class folders)")
    if model.num_classes != splits.num_classes:
        raise ArgumentError(f"the model has {model.num_classes} classes, the data {splits.num_classes}; pass the "
                            f"dataset the model was trained on")
    dc = model.data_config
    size = dc["input_size"][-1]
    _, val = make_loaders(splits, size, batch_size, crop_pct=crop_pct or dc["crop_pct"],
                          interpolation=dc["interpolation"])
    mean, std = channel_stats(dc["mean"], dc["std"], model.in_chans)
    return evaluate(model.to(device), val, splits.num_classes, mean=mean, std=std, device=device, amp=amp,
                    classes=splits.classes)


def write_report(m: EvalMetrics, out_dir: str | Path, title: str = "") -> dict[str, str]:
    """``metrics.json``, ``per_class.csv`` and (up to 20 classes) ``confusion.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(m.as_dict(), indent=1))
    counts = m.confusion.sum(1).tolist()
    write_csv([dict(cls=c, images=n, top1=a) for c, n, a in zip(m.classes, counts, m.per_class)],
              out / "per_class.csv")
    files = {"metrics": str(out / "metrics.json"), "per_class": str(out / "per_class.csv")}
    if len(m.confusion) <= MAX_CONFUSION_CLASSES:
        files["confusion"] = str(plot_confusion(m, out / "confusion.png", title))
    return files
