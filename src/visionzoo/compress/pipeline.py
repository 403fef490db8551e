"""One pipeline: prune -> save -> fuse -> quantize (simulated or real int8) -> measure, from Python or
``visionzoo compress``.

    report = visionzoo.compress.compress("runs/deit/model.safetensors", prune=0.5, quant=["w8a8", "ort-int8-dynamic"],
                                         calib="digits", out_dir="runs/deit-compressed")

Every row of the report is measured in this process against the fp32 model: params, MACs, img/s (timed
interleaved), top-1 (when the data's classes are the model's) and agreement of the top-1 class with fp32.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from visionzoo.compress.report import CompressReport, Row, agreement, layer_sqnr, predict, time_interleaved, top1
from visionzoo.compress.structure import structure_record
from visionzoo.errors import ArgumentError

__all__ = ["QUANT_CHOICES", "compress", "load_input", "save", "strip_quant"]

REAL = {"int8-static": "torchao-static", "int8-dynamic": "torchao-dynamic", "ort-int8-static": "ort-static",
        "ort-int8-dynamic": "ort-dynamic"}
QUANT_CHOICES = ("w8a8", "w6a6", "w4a4", "w4a4-log2", "w4a4-logsqrt2", "w4a4-adalog", "w4a4-twin", *REAL)


def strip_quant(model: nn.Module) -> nn.Module:
    """A plain copy of a fake-quantized model: weights snapped to their grid, plain convs/linears, no quantizers."""
    from visionzoo.compress.quantize import _QuantMixin, _set_module
    from visionzoo.layers import AttentionCore

    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, _QuantMixin):
            base = next(c for c in type(m).__mro__[1:] if c in (nn.Linear, nn.Conv2d, nn.Conv1d))
            plain = base.__new__(base)
            plain.__dict__ = {k: v for k, v in m.__dict__.items() if k not in ("weight_quant", "act_quant", "_wq")}
            plain._modules = {k: v for k, v in m._modules.items() if k not in ("weight_quant", "act_quant")}
            with torch.no_grad():
                plain._parameters = dict(m._parameters)
                plain.weight = nn.Parameter(m.qweight().detach().clone())
            _set_module(model, name, plain)
        elif isinstance(m, AttentionCore):
            m.q_quant = m.k_quant = m.v_quant = m.probs_quant = None
    if hasattr(model, "quant_config"):
        del model.quant_config
    return model


def save(model: nn.Module, path: str | os.PathLike, extra: dict[str, str] | None = None) -> Path:
    """Save in our format with the pruned widths (and a fake-quantized model's grid weights) so that
    ``visionzoo.load_model(path)`` rebuilds it."""
    from visionzoo.weights import save as save_weights

    extra = dict(extra or {})
    cfg = getattr(model, "quant_config", None)
    if cfg is not None:
        extra["quant"] = cfg.label
        model = strip_quant(model)
    record = structure_record(model)
    if record:
        extra["structure"] = json.dumps(record)
    return save_weights(model, path, extra=extra)


def load_input(spec: str, img_size: int | None = None) -> tuple[nn.Module, dict, str]:
    """A registered name (random weights) or a checkpoint (``visionzoo train`` files or our format)."""
    import visionzoo

    if os.path.exists(spec):
        from visionzoo.train.evaluate import load_trained

        model, meta = load_trained(spec, img_size=img_size)
        if meta.get("structure") or _has_structure(spec):
            model = visionzoo.load_model(spec).eval()
        return model.eval(), meta, f"weights from {spec}"
    if spec.endswith((".safetensors", ".pt", ".pth")):
        raise FileNotFoundError(f"checkpoint {spec!r} does not exist; give a checkpoint path or a model name")
    kwargs = {} if img_size is None else {"img_size": img_size}
    return visionzoo.create_model(spec, **kwargs).eval(), {}, "random weights"


def _has_structure(path: str) -> bool:
    from visionzoo.weights import read

    try:
        return bool(read(path)[1].get("structure"))
    except Exception:  # noqa: BLE001
        return False


def _profile(model: nn.Module) -> tuple[float, float | None]:
    import visionzoo

    params = sum(p.numel() for p in model.parameters()) / 1e6
    try:
        return params, visionzoo.profile(model).gmacs
    except Exception:  # noqa: BLE001  (a model the counter cannot run)
        return params, None


def compress(spec: str | nn.Module, *, out_dir: str | os.PathLike, prune: float | None = None,
             prune_importance: str = "magnitude", prune_engine: str = "visionzoo", sparse_2_4: bool = False,
             fuse: bool = False, quant: Sequence[str] = (), calib: str | Tensor = "digits", calib_n: int = 32,
             eval_n: int = 256, data_dir: str | None = None, img_size: int | None = None, batch_size: int = 16,
             budget: float = 1.0, progress: Callable[[str], None] | None = None) -> CompressReport:
    """Compress ``spec`` (a model name, a checkpoint or a model) and measure every step against fp32.

    ``prune``: the ratio of heads/MLP widths/inner channels removed; ``sparse_2_4``: 2:4 weight sparsity
    (simulated); ``fuse``: the deploy re-parameterisation; ``quant``: any of ``QUANT_CHOICES`` (simulated schemes
    ``wXaY[-kind]`` or real ``int8-static``/``int8-dynamic`` (torchao) and ``ort-int8-static``/``ort-int8-dynamic``);
    ``calib``: a dataset name for the calibration and evaluation images, or a tensor of images; ``budget``: seconds
    of timing per row.
    """
    from visionzoo.compress.data import calibration_batches, labelled_images
    from visionzoo.compress.int8 import int8
    from visionzoo.compress.prune import prune as prune_model
    from visionzoo.compress.prune import semi_structured_2_4, sparsity
    from visionzoo.compress.quantize import parse_scheme, quantize

    say = progress or (lambda s: None)
    quant = list(quant)
    for q in quant:
        if q not in REAL:
            parse_scheme(q)  # raises with the allowed forms
    if prune is not None and not 0 <= prune < 1:
        raise ArgumentError(f"--prune takes a ratio in [0, 1), got {prune}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, nn.Module):
        model, meta, what = spec.eval(), {}, "given model"
    else:
        model, meta, what = load_input(spec, img_size)
    say(f"{model.name}: {what}")
    if isinstance(calib, Tensor):
        calib_batches = calibration_batches(calib, model, n=calib_n, batch_size=batch_size)
        x_eval, y_eval = torch.cat(calib_batches), None
    else:
        calib_batches = calibration_batches(calib, model, n=calib_n, batch_size=batch_size, data_dir=data_dir)
        x_eval, y_eval = labelled_images(calib, model, split="val", n=eval_n, data_dir=data_dir)
        classes = meta.get("classes")
        if model.num_classes == 0 or (classes is None and "weights" not in what) or \
                (classes is not None and len(classes) != model.num_classes):
            y_eval = None  # random weights or another label space: agreement only
    report = CompressReport(model.name, setup=dict(model=what, calibration=f"{calib_n} images of "
                                                   f"{calib if isinstance(calib, str) else 'the given tensor'}",
                                                   eval_images=int(x_eval.shape[0]), batch=batch_size,
                                                   threads=torch.get_num_threads()))
    ref_logits = predict(model, x_eval, batch_size)
    runs: dict[str, Callable[[Tensor], Tensor]] = {}

    def add(name: str, net: nn.Module | None, run: Callable[[Tensor], Tensor], note: str = "",
            logits: Tensor | None = None) -> Row:
        logits = predict(run, x_eval, batch_size) if logits is None else logits
        params, gmacs = _profile(net) if isinstance(net, nn.Module) else (None, None)
        from visionzoo.compress.quantizers import sqnr_db

        row = Row(name, params, gmacs, None, top1(logits, y_eval), agreement(logits, ref_logits),
                  sqnr_db(ref_logits, logits), note)
        report.rows.append(row)
        runs[name] = run
        return row

    add("fp32", model, model, "eager", ref_logits)
    current = model
    if prune:
        say(f"pruning {prune:.2f} ({prune_engine}, {prune_importance})")
        current = prune_model(model, prune, importance=prune_importance, engine=prune_engine,
                              calib=calib_batches if prune_importance == "taylor" else None)
        res = current.prune_result
        note = f"{len(res.pruned)} groups" + (f", {len(res.skipped)} left alone" if res.skipped else "")
        add(f"pruned {prune:g}", current, current, note)
    if sparse_2_4:
        current = semi_structured_2_4(current)
        nz, total = sparsity(current)
        row = add("2:4 sparse", current, current, f"{nz / 1e6:.3f}M non-zero of {total / 1e6:.3f}M (simulated)")
        row.params_m = nz / 1e6
    if current is not model:
        report.files["checkpoint"] = str(save(current, out / "model.safetensors"))
    if fuse:
        current = copy.deepcopy(current).eval().fuse()
        add("fused", current, current, "deploy form")
    example = calib_batches[0]
    for q in quant:
        say(f"quantizing: {q}")
        if q in REAL:
            try:
                m8 = int8(current, REAL[q], calib_batches, out_dir=out / "int8")
            except Exception as e:  # noqa: BLE001  (one backend failing is a row, not the end of the report)
                report.rows.append(Row(q, note=f"failed: {type(e).__name__}: {str(e)[:160]}"))
                continue
            add(q, current, m8.run, f"{REAL[q]}" + (f", {Path(m8.path).name}" if m8.path else ""))
            if m8.path:
                report.files[q] = m8.path
        else:
            qm = quantize(current, q, calib_batches)
            add(q, current, qm, "simulated (fake-quant)")
            report.layer_sqnr[q] = layer_sqnr(current, qm, example[:4])
            torch.save({k: v for k, v in qm.state_dict().items() if "_quant." in k}, out / f"quant_state.{q}.pt")
            report.files[f"{q} quantizers"] = str(out / f"quant_state.{q}.pt")
    if budget > 0:
        say("timing (interleaved)")
        x = x_eval[:batch_size]
        if x.shape[0] < batch_size:
            x = x.repeat(-(-batch_size // x.shape[0]), 1, 1, 1)[:batch_size]
        rates = time_interleaved(runs, x, budget)
        for r in report.rows:
            r.img_s = rates.get(r.name, r.img_s)
    report.write(out)
    return report
