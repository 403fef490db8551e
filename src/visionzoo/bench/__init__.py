"""Measurement: MACs/FLOPs and activations (flops.py); speed and memory of registered models.

``visionzoo.bench.run(patterns, BenchConfig(...))`` returns a list of ``BenchResult`` rows;
``visionzoo.bench.report.write_all(results)`` writes CSV, JSON and PNG plots.

Modules: ``schema`` (config and result rows), ``system`` (CPU, cores, contention and memory probes), ``timing``
(one model in this process), ``runner`` (the run: each model in a child process), ``roofline`` (machine
peaks), ``report`` and ``plots``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["BenchConfig", "BenchResult", "BenchResults", "default_lineup", "run"]


def __getattr__(name: str) -> Any:
    # lazy, so that `python -m visionzoo.bench.runner` does not import the runner twice
    if name in ("BenchConfig", "BenchResult", "BenchResults"):
        from visionzoo.bench import schema

        return getattr(schema, name)
    if name in ("default_lineup", "run"):
        from visionzoo.bench import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'visionzoo.bench' has no attribute {name!r}")
