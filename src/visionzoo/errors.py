"""The library's own errors: what a user asked for cannot be done, and the message says what to do instead.

Every class derives from ``VisionZooError`` and from the built-in error that callers caught before it existed
(``ValueError``, ``TypeError``, ``FileNotFoundError``, ...), so ``except ValueError`` keeps working. The command
line prints a ``VisionZooError`` as one line and exits with status 2; anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

__all__ = ["ArgumentError", "BackendUnavailable", "CheckpointError", "DataError", "DownloadError", "ExportError",
           "MissingDependencyError", "NoWeightsError", "NotFoundError", "TrainingDivergedError", "UnknownArgumentError",
           "UnknownModelError", "VisionZooError"]


class VisionZooError(Exception):
    """Base class: bad input from the user (an argument, a file, a dataset), with a message naming the fix."""


class ArgumentError(VisionZooError, ValueError):
    """An argument value that is not allowed."""


class UnknownModelError(ArgumentError):
    """A model name that is not registered (the message lists the closest names)."""


class UnknownArgumentError(VisionZooError, TypeError):
    """A keyword argument that the model's constructor does not take."""


class NotFoundError(VisionZooError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class CheckpointError(VisionZooError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which and why."""


class DataError(VisionZooError, ValueError):
    """A dataset that cannot be used as given (missing classes, wrong layout, unreadable files)."""


class NoWeightsError(VisionZooError, ValueError):
    """No downloadable pretrained weights are recorded for the variant (or not under that tag)."""


class DownloadError(VisionZooError, OSError):
    """Weights could not be fetched or verified (offline, no network, hash or size mismatch)."""


class MissingDependencyError(VisionZooError, ImportError):
    """An optional package is needed for what was asked; the message gives the pip command."""


class TrainingDivergedError(VisionZooError, FloatingPointError):
    """The training loss became NaN or infinite."""


class ExportError(VisionZooError, RuntimeError):
    """A model could not be exported, or the exported model does not match eager; the message names the op."""


class BackendUnavailable(VisionZooError, RuntimeError):
    """An inference backend (onnxruntime, openvino, bf16 hardware, ...) is not available here."""

