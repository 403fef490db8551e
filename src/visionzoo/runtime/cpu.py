"""What the CPU is and what it can do: its model name, the SIMD/matrix flags that decide which kernels are
fast, and whether it has bf16 hardware. Read once per process from ``/proc/cpuinfo`` (torch's own probe where
that file is missing)."""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import re

import torch

CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16 and AMX; aarch64 "bf16" (BFMMLA)


def cpu_info() -> tuple[str, list[str]]:
    """The CPU model name and the SIMD/matrix flags of ``CPU_FLAGS`` that it has."""
    name, flags = _cpu_info()
    return name, list(flags)


@functools.lru_cache(maxsize=1)
def _cpu_info() -> tuple[str, tuple[str, ...]]:
    name, have = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            text = f.read()
        m = re.search(r"^(?:model name|Hardware|cpu model)\s*:\s*(.+)$", text, re.M)
        name = m.group(1).strip() if m else name
        m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
        have = set(m.group(1).split()) if m else set()
    if not have:  # no /proc/cpuinfo (macOS, Windows): torch's own probe, where this build has it
        with contextlib.suppress(Exception):
            cap = torch._C._cpu._get_cpu_capability()
            have = {k.replace("avx512_f", "avx512f").replace("avx512_bw", "avx512bw") for k, v in cap.items()
                    if v is True}
            name = cap.get("cpu_name") or name
    return name, tuple(f for f in CPU_FLAGS if f in have)


def cpu_name() -> str:
    return cpu_info()[0]


def has_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX-512 BF16, AMX or Arm BF16), read from the CPU flags."""
    return any(f in cpu_info()[1] for f in BF16_FLAGS)


def threads() -> int:
    return torch.get_num_threads()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe() -> dict:
    """The stamp every deploy record and bench row carries: CPU model, flags, threads, torch version."""
    name, flags = cpu_info()
    return dict(cpu=name, cpu_flags=flags, threads=threads(), torch=torch.__version__)
