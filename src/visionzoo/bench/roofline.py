"""This machine's roofline: matmul peak per dtype and memory bandwidth, measured once per run.

The peak is the best of several square matmuls (large enough to be compute-bound); the bandwidth is the best
of several copies of a buffer far larger than the caches (read + write bytes). A model's achieved GFLOP/s
(counted FLOPs per image x images per second) over the peak of its dtype is its model FLOP utilisation (MFU).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from visionzoo.bench.schema import DTYPES
from visionzoo.bench.system import own_cpu, system_busy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", n: int | None = None,
                seconds: float = 0.4) -> float:
    """Best GFLOP/s of ``n x n @ n x n`` matmuls over about ``seconds``."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048 if dtype == torch.float32 else 4096)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: kernel selection, packing buffers
    _sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 / dt / 1e9)
        if time.perf_counter() > t_end:
            return best


def memory_bandwidth(device: str | torch.device = "cpu", mbytes: int = 256, seconds: float = 0.4) -> float:
    """Best GB/s of copying a ``mbytes`` MB fp32 buffer (read + write bytes counted)."""
    device = torch.device(device)
    x = torch.ones(mbytes * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        dt = time.perf_counter() - t0
        best = max(best, 2 * x.numel() * 4 / dt / 1e9)
        if time.perf_counter() > t_end:
            return best


def measure_peaks(device: str | torch.device = "cpu", dtypes: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, Any]:
    """``{"fp32_gflops", "bf16_gflops", "mem_gbs", "threads", "device"}`` for this machine."""
    out: dict[str, Any] = dict(device=str(device), threads=torch.get_num_threads())
    t0, busy0, cpu0 = time.perf_counter(), system_busy(), own_cpu()
    for name in dtypes:
        try:
            out[f"{name}_gflops"] = round(matmul_peak(DTYPES[name], device), 1)
        except RuntimeError as e:  # a dtype without a matmul kernel on this device
            out[f"{name}_gflops"] = None
            out[f"{name}_error"] = str(e).splitlines()[0]
    out["mem_gbs"] = round(memory_bandwidth(device), 1)
    if busy0 is not None:  # cores other processes used meanwhile: a shared machine lowers the peak too
        out["other_cores"] = round(max(0.0, (system_busy() - busy0 - (own_cpu() - cpu0))
                                       / (time.perf_counter() - t0)), 2)
    if out.get("fp32_gflops"):
        out["fp32_ridge_flop_per_byte"] = round(out["fp32_gflops"] / out["mem_gbs"], 1)
    return out


def utilisation(gflops_per_image: float, samples_per_sec: float, peak_gflops: float) -> float:
    """Model FLOP utilisation: achieved GFLOP/s over the matmul peak."""
    return gflops_per_image * samples_per_sec / peak_gflops
