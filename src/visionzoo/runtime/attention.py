"""Each attention call of a model through the faster of two kernels on this CPU, chosen by timing its own shapes.

``layers.AttentionCore`` runs ``F.scaled_dot_product_attention`` (on CPU a flash kernel) or, with ``fused = False``,
the explicit ``softmax(q k^T * scale + bias) v`` with two batched matmuls. Which is faster depends on the shape and
the CPU: on an AMD EPYC with 2 threads the flash kernel won at batch 32 on DeiT-S's 197 tokens (17.4 vs 19.4 ms) and
on long sequences (3136 tokens: 28 vs 114 ms), while the matmuls won at batch 1 (0.46 vs 0.51 ms) and on Swin's
7x7 windows (64 windows x 3 heads x 49 tokens: 0.74 vs 1.26 ms). So nothing is decided by rule: ``tune_attention``
runs the model once, records the tensors every core receives (shapes, strides, bias), times both kernels on each
distinct case, interleaved, and sets ``fused = False`` on the cores where the matmuls are faster.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from visionzoo.layers import AttentionCore
from visionzoo.runtime.kernels import best_seconds

__all__ = ["AttentionChoice", "tune_attention"]

MARGIN = 1.03  # the matmuls must be at least 3% faster to replace the fused kernel


@dataclass
class AttentionChoice:
    """What ``tune_attention`` measured: per distinct case, milliseconds of each kernel, and the cores switched."""

    cases: list[dict] = field(default_factory=list)  # {"shape", "bias", "sdpa_ms", "matmul_ms", "kernel", "cores"}
    explicit: int = 0  # cores set to the matmul path
    fused: int = 0  # cores left on scaled_dot_product_attention

    def summary(self) -> str:
        if not self.cases:
            return "no attention"
        return (f"attention: {self.explicit} core(s) on matmul+softmax+matmul, {self.fused} on SDPA (measured per "
                f"shape: " + "; ".join(f"{c['shape']} {c['kernel']} {c['sdpa_ms']:.3f}/{c['matmul_ms']:.3f} ms"
                                      for c in self.cases) + ")")


def _signature(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype) for t in (q, k, v)) + (
        None if bias is None else (tuple(bias.shape), bias.stride(), bias.dtype),)


def _best_ms(fns: dict[str, object], rounds: int, sample_s: float) -> dict[str, float]:
    return {k: v * 1e3 for k, v in best_seconds(fns, rounds, sample_s).items()}


def _kernels(core: AttentionCore, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> dict:
    return {"sdpa": lambda: core._sdpa(q, k, v, bias, scale),  # the core's fused path
            "matmul": lambda: core._probs(q, k, bias, scale) @ v}  # the core's own explicit path (fused = False)


def tune_attention(model: nn.Module, x: Tensor, autocast: bool = False, rounds: int = 5,
                   sample_s: float = 0.01) -> AttentionChoice:
    """Time SDPA against the explicit path on every distinct attention case ``model(x)`` makes; set ``fused = False``
    on the cores where the explicit path is faster (in place; inference only). Cores a tool has switched to the
    explicit path already (observers, quantizers) are left as they are."""
    cores = [m for m in model.modules() if isinstance(m, AttentionCore) and m.fused]
    seen: dict[AttentionCore, tuple] = {}
    inputs: dict[tuple, tuple] = {}
    previous = {c: c.qkv_observer for c in cores}

    def observe(core: AttentionCore, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> None:
        if core in seen:  # a core called several times per forward: its first call stands for it
            return
        sig = _signature(q, k, v, bias) + (scale,)
        seen[core] = sig
        if sig not in inputs:
            inputs[sig] = tuple(None if t is None else t.detach().clone(memory_format=torch.preserve_format)
                                for t in (q, k, v, bias)) + (scale,)
    for c in cores:
        c.qkv_observer = observe
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x)
    finally:
        for c, prev in previous.items():
            c.qkv_observer = prev
    choice = AttentionChoice()
    slower: set[tuple] = set()
    with torch.inference_mode():
        for sig, (q, k, v, bias, scale) in inputs.items():
            core = next(c for c, s in seen.items() if s == sig)
            ms = _best_ms(_kernels(core, q, k, v, bias, scale), rounds, sample_s)
            kernel = "matmul" if ms["matmul"] * MARGIN < ms["sdpa"] else "sdpa"
            if kernel == "matmul":
                slower.add(sig)
            choice.cases.append({"shape": "x".join(map(str, q.shape)) + ("+bias" if bias is not None else ""),
                                 "sdpa_ms": ms["sdpa"], "matmul_ms": ms["matmul"], "kernel": kernel,
                                 "cores": sum(s == sig for s in seen.values())})
    for c, sig in seen.items():
        if sig in slower:
            c.fused = False
    choice.explicit = sum(sig in slower for sig in seen.values())
    choice.fused = len(seen) - choice.explicit
    return choice
