"""Mixed precision: a per-layer sensitivity and a bit budget -> bits per layer.

Two sensitivity measures, after the papers' ideas (neither has public code; see methods.md B10/B11):
- ``"output"`` (Q-HyViT/PTQ4ViT: the output perturbation a layer's quantization causes): quantize one layer at a
  time at each candidate width, every other layer in fp32, and take the mean squared error of the logits against
  fp32 on the calibration images.
- ``"relevance"`` (LRP-QViT: a layer contribution score from relevance propagation): gradient x activation of each
  layer's output for the predicted logit, summed in absolute value over the calibration images (the LRP-0 rule for
  piecewise-linear networks, Ancona et al. 2018); a layer's cost at ``b`` bits is its score times ``4**-b``, the
  power of uniform quantization noise.

The allocation minimises the summed sensitivity under ``mean bits (weighted by parameters) <= budget``: every layer
starts at the widest candidate, then the cheapest lowering per bit saved is taken until the budget holds (the
greedy knapsack HAWQ-style allocators use).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from visionzoo.compress.quantize import quantizable, quantize, set_quant_enabled
from visionzoo.errors import ArgumentError

MEASURES = ("output", "relevance")


@torch.no_grad()
def _output_sensitivity(model: nn.Module, calib: list[Tensor], names: list[str], bits: tuple[int, ...], **kw
                        ) -> dict[str, dict[int, float]]:
    ref = [model(x) for x in calib]
    out: dict[str, dict[int, float]] = {n: {} for n in names}
    for b in bits:
        q = quantize(model, f"w{b}a{b}", calib, attention=False, edge_bits=None, **kw)
        set_quant_enabled(q, False)
        for n in names:
            set_quant_enabled(q, True, [n])
            err = sum((q(x) - r).pow(2).mean().item() for x, r in zip(calib, ref)) / len(calib)
            out[n][b] = err
            set_quant_enabled(q, False, [n])
    return out


def _relevance_sensitivity(model: nn.Module, calib: list[Tensor], names: list[str], bits: tuple[int, ...]
                           ) -> dict[str, dict[int, float]]:
    mods = dict(model.named_modules())
    acts: dict[str, Tensor] = {}

    def keep(name: str):  # noqa: ANN202
        def hook(m: nn.Module, args: tuple, out: Tensor) -> None:
            out.retain_grad()
            acts[name] = out
        return hook

    score = dict.fromkeys(names, 0.0)
    handles = [mods[n].register_forward_hook(keep(n)) for n in names]
    try:
        for x in calib:
            acts.clear()
            with torch.enable_grad():
                logits = model(x)
                target = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
                target.backward()
            for n, a in acts.items():
                if a.grad is not None:
                    score[n] += (a * a.grad).sum().abs().item()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return {n: {b: score[n] * 4.0 ** -b for b in bits} for n in names}


def layer_sensitivity(model: nn.Module, calib: list[Tensor], bits: tuple[int, ...] = (4, 6, 8),
                      measure: str = "output", **quant_kwargs) -> dict[str, dict[int, float]]:
    """``{layer: {bits: sensitivity}}`` for every conv/linear (see the module docstring for ``measure``)."""
    if measure not in MEASURES:
        raise ArgumentError(f"measure must be one of {MEASURES}, got {measure!r}")
    if not calib:
        raise ArgumentError("layer_sensitivity needs calibration images; the calibration set is empty")
    model = model.eval()
    names = list(quantizable(model))
    if measure == "output":
        return _output_sensitivity(model, calib, names, bits, **quant_kwargs)
    return _relevance_sensitivity(model, calib, names, bits)


def allocate_bits(sensitivity: dict[str, dict[int, float]], params: dict[str, int], budget: float
                  ) -> dict[str, int]:
    """Bits per layer with ``sum(params * bits) / sum(params) <= budget`` and a small summed sensitivity."""
    cands = sorted({b for s in sensitivity.values() for b in s})
    if not cands:
        raise ArgumentError("allocate_bits: no sensitivity was measured")
    if not cands[0] <= budget <= cands[-1]:
        raise ArgumentError(f"bit budget must be between {cands[0]} and {cands[-1]} (the candidate widths), "
                            f"got {budget}")
    bits = {n: cands[-1] for n in sensitivity}
    total = sum(params[n] for n in bits) or 1

    def mean_bits() -> float:
        return sum(params[n] * b for n, b in bits.items()) / total

    while mean_bits() > budget + 1e-9:
        best = None
        for n, b in bits.items():
            lower = [c for c in cands if c < b]
            if not lower or params[n] == 0:
                continue
            nb = lower[-1]
            cost = (sensitivity[n][nb] - sensitivity[n][b]) / (params[n] * (b - nb))
            if best is None or cost < best[0]:
                best = (cost, n, nb)
        if best is None:
            break
        bits[best[1]] = best[2]
    return bits


def mixed_precision(model: nn.Module, calib: list[Tensor], budget: float, bits: tuple[int, ...] = (4, 6, 8),
                    measure: str = "output") -> dict[str, tuple[int, int]]:
    """``QuantConfig.layer_bits`` for a mean of ``budget`` bits (weights and activations of each conv/linear)."""
    sens = layer_sensitivity(model, calib, bits, measure)
    mods = dict(model.named_modules())
    params = {n: mods[n].weight.numel() for n in sens}
    return {n: (b, b) for n, b in allocate_bits(sens, params, budget).items()}
