"""The library's own error classes: what the command line reports in one line, without a traceback."""
from __future__ import annotations


class VisionZooError(Exception):
    """Base class of every error visionzoo raises on purpose."""


class ExportError(VisionZooError, RuntimeError):
    """A model could not be exported, or the exported model does not match eager."""


class BackendUnavailable(VisionZooError, RuntimeError):
    """An inference backend (onnxruntime, openvino, bf16 hardware, ...) is not available here."""


class ArgumentError(VisionZooError, ValueError):
    """An argument value that is not allowed."""


class NotFoundError(VisionZooError, FileNotFoundError):
    """A file or folder the user named does not exist."""
