"""Probes of the machine a benchmark runs on: CPU model and flags, usable cores, contention, peak memory."""
from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any

import torch

from visionzoo.bench.schema import BenchConfig
from visionzoo.runtime.cpu import CPU_FLAGS, cpu_info  # noqa: F401  (re-exported: bench reads them here)

# glibc returns freed blocks above the mmap threshold (max 32 MB by default) to the OS, so every large activation
# of an eager forward is page-faulted in anew; "keep" makes the measuring process reuse freed memory instead
# (DeepMAD-29M batch 16 on 2 cores: 5.0 -> 10.4 img/s, MaxViT-T 7.8 -> 11.2; ConvNeXt-T unchanged). The same
# effect as running under jemalloc/tcmalloc, as deployments usually do.
MALLOC_KEEP = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}


# --- environment ----------------------------------------------------------------------------------------
def omp_policy_label(policy: str | None = None) -> str:
    """What OMP_WAIT_POLICY a process gets: the configured one, or this process's environment."""
    if policy in ("passive", "active"):
        return policy.upper()
    return os.environ.get("OMP_WAIT_POLICY", "unset (runtime default: spin, then sleep)")


def malloc_label(policy: str | None = None) -> str:
    """Whether a process keeps freed memory (``keep``, our glibc settings) or has the system's malloc settings."""
    keep = policy == "keep" or all(os.environ.get(k) == v for k, v in MALLOC_KEEP.items())
    return "keep" if keep else "system"


def environment(cfg: BenchConfig | None = None) -> dict[str, Any]:
    """A stamp of what the numbers depend on: versions, device, CPU model and flags, threads, OMP policy."""
    cfg = cfg or BenchConfig()
    import visionzoo

    name, flags = cpu_info()
    env = dict(visionzoo=visionzoo.__version__, torch=torch.__version__, python=platform.python_version(),
               platform=platform.platform(), device=cfg.device, cpu=name, cpu_flags=flags,
               cpu_count=os.cpu_count(), cpus_usable=usable_cpus(),
               threads=cfg.threads or torch.get_num_threads(),
               omp_wait_policy=omp_policy_label(cfg.omp_wait_policy if cfg.subprocess else "inherit"),
               malloc_policy=malloc_label(cfg.malloc_policy if cfg.subprocess else "inherit"),
               omp_num_threads=os.environ.get("OMP_NUM_THREADS"), mkldnn=torch.backends.mkldnn.is_available(),
               load_avg=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
               time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if torch.device(cfg.device).type == "cuda" and torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- contention and memory probes ------------------------------------------------------------------------
def system_busy() -> float | None:
    """Seconds of CPU that every process on the machine (plus steal) has used, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in parts[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    try:
        import resource  # microsecond resolution, where os.times() counts clock ticks

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    except ImportError:
        t = os.times()
        return t.user + t.system


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(key: str = "VmRSS") -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if key == "VmHWM":
        import resource

        scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return None


class PeakMemory:
    """Peak memory of one measurement: CUDA's allocator peak, or peak RSS over the idle baseline on CPU."""

    def __init__(self, device: torch.device, baseline_mb: float | None) -> None:
        self.cuda = device.type == "cuda"
        self.baseline = baseline_mb
        self.peak: float | None = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.baseline is not None and not reset_peak_rss():
            self.baseline = None  # without a resettable peak the number would mix measurements

    def stop(self) -> None:
        if self.cuda:
            mb = torch.cuda.max_memory_allocated() / 2**20
        elif self.baseline is not None:
            mb = (rss_mb("VmHWM") or 0.0) - self.baseline
        else:
            return
        self.peak = mb if self.peak is None else max(self.peak, mb)


