"""What a traced graph must not see: a test for "are we being traced", and opaque leaf functions for FX.

``torch.fx.symbolic_trace`` runs ``forward`` on proxies, so any Python ``if`` on a shape fails there, and a
table built for the input size would be baked in. Shape checks are skipped while tracing (``is_tracing``);
helpers that must look at concrete sizes (padding amounts, per-size tables) are wrapped with ``trace_leaf``:
under FX they become one ``call_function`` node that runs the helper on the real sizes at run time; everywhere
else (eager, dynamo, torch.export, ONNX) they are plain calls.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils._pytree import tree_flatten

F = TypeVar("F", bound=Callable[..., Any])


def is_tracing() -> bool:
    """True under torch.fx symbolic tracing, TorchScript tracing, dynamo (compile, torch.export) or ONNX export."""
    return (is_fx_symbolic_tracing() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.onnx.is_in_onnx_export())


def trace_leaf(fn: F) -> F:
    """Make ``fn`` one opaque node under ``torch.fx.symbolic_trace`` (its body then runs on concrete values)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if is_fx_symbolic_tracing():
            proxies = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.fx.Proxy)]
            if proxies:
                return proxies[0].tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
