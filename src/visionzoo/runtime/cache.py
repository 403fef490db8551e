"""A small JSON cache of measured choices (deploy backends, linear kernels) under ``VISIONZOO_CACHE``
(default ``~/.cache/visionzoo``). Every key names what the measurement depends on: CPU model, torch version,
threads, and for deploy the model, input shape and dtype. A cache that cannot be read or written is treated as
empty: it only saves time, it never decides a result."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any


def cache_dir(path: str | os.PathLike | None = None) -> str:
    """``path``, else ``$VISIONZOO_CACHE``, else ``~/.cache/visionzoo``."""
    if path is not None:
        return os.fspath(path)
    return os.environ.get("VISIONZOO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "visionzoo")


def key(**parts: Any) -> str:
    """A stable string key: the parts as sorted JSON."""
    return json.dumps(parts, sort_keys=True, default=str)


class JsonCache:
    """``{key: entry}`` in one JSON file, read and rewritten whole (entries are small, writes rare)."""

    def __init__(self, name: str, path: str | os.PathLike | None = None) -> None:
        self.file = os.path.join(cache_dir(path), name)

    def _read(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            with open(self.file) as f:
                d = json.load(f)
            if isinstance(d, dict):
                return d
        return {}

    def get(self, k: str) -> Any | None:
        return self._read().get(k)

    def put(self, k: str, entry: Any) -> None:
        d = self._read()
        d[k] = entry
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(self.file), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.file), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(d, f, indent=1, sort_keys=True)
            os.replace(tmp, self.file)  # atomic: a reader sees the old file or the new one

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.file)
