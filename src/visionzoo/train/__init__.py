"""Training, evaluation and fair comparison: ``fit``, ``evaluate``, ``compare`` (see ``visionzoo train --help``)."""
from visionzoo.train.loop import FitResult, TrainConfig, build_model, evaluate, fit

__all__ = ["FitResult", "TrainConfig", "build_model", "evaluate", "fit"]
