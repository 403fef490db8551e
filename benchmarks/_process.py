"""The process settings the deploy benchmarks measure under, set before torch is imported.

glibc's malloc keeps freed memory (as ``visionzoo bench`` measures: ``bench.system.MALLOC_KEEP``), and torch's OpenMP
threads wait as ``--omp-wait-policy`` says: ``default`` (unset: spin a while, then sleep; what a user's process gets,
and the like-for-like match for onnxruntime's and OpenVINO's own spinning pools) or ``passive`` (sleep at once, as
``visionzoo bench`` runs by default so that a shared machine's numbers do not collapse; onnxruntime is then built
without spinning too). Both are read at start-up, so the script restarts itself once with them.
"""
from __future__ import annotations

import os
import sys

MALLOC_KEEP = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}  # = bench.system's
POLICIES = ("default", "passive")


def _policy(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--omp-wait-policy"):
            return a.split("=", 1)[1] if "=" in a else argv[i + 1]
    return "default"


def restart_with_settings() -> None:
    """Re-exec this script once with the malloc settings and the OpenMP wait policy its ``--omp-wait-policy`` asks
    for (``default`` when absent)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(MALLOC_KEEP, **({"OMP_WAIT_POLICY": "PASSIVE"} if _policy(sys.argv) == "passive" else {}))
    if any(os.environ.get(k) != env.get(k) for k in (*MALLOC_KEEP, "OMP_WAIT_POLICY")):
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def policy_label() -> str:
    return f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset (spin, then sleep)')}"
