"""Measurement: MACs/FLOPs and activations (flops.py); speed and memory (measure.py), reports and plots.

``visionzoo.bench.run(patterns, BenchConfig(...))`` returns a list of ``BenchResult`` rows;
``visionzoo.bench.report.write_all(results)`` writes CSV, JSON and PNG plots.
"""
from __future__ import annotations

from typing import Any

__all__ = ["BenchConfig", "BenchResult", "BenchResults", "default_lineup", "run"]


def __getattr__(name: str) -> Any:
    # lazy, so that `python -m visionzoo.bench.measure` does not import the module twice
    if name in __all__:
        from visionzoo.bench import measure

        return getattr(measure, name)
    raise AttributeError(f"module 'visionzoo.bench' has no attribute {name!r}")
