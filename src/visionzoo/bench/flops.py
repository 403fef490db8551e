"""Params, MACs, FLOPs and activations counted at the dispatcher with ``torch.utils.flop_counter``.

``FlopCounterMode`` has formulas for conv, (b)mm, addmm and the fused attention kernels of CUDA, but not
for ``aten._scaled_dot_product_flash_attention_for_cpu``, which it counts as zero; we register the same
formula for it. FFTs (global-filter layers) are counted with the radix-2 estimate, 5 N log2 N real FLOPs
per complex transform of N points and half that for real-input/real-output ones, per transformed signal.
MACs are FLOPs / 2: every counted op is a multiply-accumulate (for FFTs: half their FLOPs). Activations are the
output elements of the counted ops (fvcore's convention). Elementwise ops, norms and softmax are not
counted, as in the papers' tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _fft_flops(input_shape, dim, *args, out_shape=None, real: bool = False, **kwargs) -> int:  # noqa: ANN001
    """5 N log2 N per complex transform of N points (2.5 N log2 N when the input or output is real)."""
    numel = math.prod(input_shape)
    n = math.prod(input_shape[d] for d in dim) if dim else 1
    if n <= 1:
        return 0
    per_point = (2.5 if real else 5.0) * math.log2(n)
    return int(per_point * max(numel, math.prod(out_shape) if out_shape else 0))


def _fft_c2r_flops(input_shape, dim, normalization, last_dim_size, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    full = list(out_shape) if out_shape else list(input_shape)
    return _fft_flops(tuple(full), dim, real=True)


CUSTOM_FLOPS = {
    aten._fft_r2c: lambda input_shape, dim, *a, out_shape=None, **k: _fft_flops(input_shape, dim, real=True),
    aten._fft_c2c: lambda input_shape, dim, *a, out_shape=None, **k: _fft_flops(input_shape, dim),
    aten._fft_c2r: _fft_c2r_flops,
}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    CUSTOM_FLOPS[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops


class _ActivationCounter(TorchDispatchMode):
    """Counts the output elements of every op the flop counter has a formula for."""

    def __init__(self, ops: set) -> None:
        super().__init__()
        self.ops = ops
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self.ops or func in self.ops:
            first = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(first, torch.Tensor):
                self.count += first.numel()
        return out


@dataclass
class Profile:
    """Counts for one forward pass at ``input_size`` and ``batch_size`` (MACs and FLOPs per batch)."""

    params: int
    macs: int
    flops: int
    activations: int
    input_size: tuple[int, int, int]
    batch_size: int

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9 / self.batch_size

    @property
    def gflops(self) -> float:
        return self.flops / 1e9 / self.batch_size

    @property
    def mactivations(self) -> float:
        return self.activations / 1e6 / self.batch_size


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def profile(model: nn.Module | str, input_size: int | tuple[int, ...] | None = None, batch_size: int = 1,
            device: str | torch.device | None = None, **create_kwargs) -> Profile:
    """Count params, MACs, FLOPs and activations of one forward pass.

    ``model`` may be a registered name, which is built on the meta device (shapes only, no memory, no
    init), so even the largest variants are counted in seconds. ``input_size`` is ``H``, ``(H, W)`` or
    ``(C, H, W)``; by default the model's ``data_config``.
    """
    if isinstance(model, str):
        from visionzoo.registry import create_model

        with torch.device(device or "meta"):
            model = create_model(model, **create_kwargs)
    cfg = getattr(model, "data_config", {}).get("input_size", (3, 224, 224))
    if input_size is None:
        input_size = cfg
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if len(input_size) == 2:
        input_size = (getattr(model, "in_chans", cfg[0]), *input_size)
    param = next(model.parameters(), None)
    dev = device or (param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_size, device=dev)
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS)
    acts = _ActivationCounter(set(counter.flop_registry))
    try:
        with counter, acts:
            model(x)
    finally:
        model.train(was_training)
    flops = counter.get_total_flops()
    return Profile(count_params(model), flops // 2, flops, acts.count, tuple(input_size), batch_size)
