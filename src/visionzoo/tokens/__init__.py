"""Token reduction for every plain-token ViT: ToMe, EViT, ATS, MCTF and token slimming, behind one call.

    handle = visionzoo.tokens.apply(model, "tome", r=13)   # also "evit", "ats", "mctf", "slim"
    model(x)                                                # fewer tokens after each block
    handle.token_counts()                                   # [197, 184, 171, ...]
    visionzoo.tokens.remove(model)                          # the original model again

Works on every model built on the token seam (``layers.TokenBlock``: ViT, DeiT with its distillation token, and
the plain-token families that wire it), and refuses windowed or hierarchical models with the reason. Methods:
``tome`` (tome.py), ``evit`` (evit.py), ``ats`` (ats.py), ``mctf`` (mctf.py), ``slim`` (slim.py); the shared
machinery is in core.py. ``parse_spec("tome:r=8")`` reads the command-line form.
"""
from __future__ import annotations

import ast
import difflib
from typing import Any

from torch import nn

from visionzoo.errors import ArgumentError
from visionzoo.tokens.ats import ATS
from visionzoo.tokens.core import TokenReduction, refusal, token_sequences
from visionzoo.tokens.evit import EViT
from visionzoo.tokens.mctf import MCTF
from visionzoo.tokens.slim import TokenSlimming
from visionzoo.tokens.tome import ToMe
from visionzoo.tokens.viz import merge_labels, plot_merges

METHODS: dict[str, type[TokenReduction]] = {"tome": ToMe, "evit": EViT, "ats": ATS, "mctf": MCTF, "slim": TokenSlimming}

__all__ = ["METHODS", "TokenReduction", "apply", "apply_spec", "can_apply", "merge_labels", "parse_spec",
           "plot_merges", "remove", "token_sequences"]


def apply(model: nn.Module, method: str, **params: Any) -> TokenReduction:
    """Apply token reduction ``method`` with ``params`` to ``model`` in place; returns the handle (also kept as
    ``model.token_reduction``). Parameters and defaults: ``METHODS[method].defaults``."""
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ArgumentError(f"visionzoo.tokens.apply: method must be one of {tuple(METHODS)}, got {method!r}{hint}")
    return METHODS[method](model, **params).install()


def remove(model: nn.Module) -> nn.Module:
    """Undo ``apply``; returns ``model``. Raises ValueError when no token reduction is applied."""
    handle = getattr(model, "token_reduction", None)
    if handle is None:
        name = getattr(model, "name", type(model).__name__)
        raise ArgumentError(f"visionzoo.tokens.remove: {name} has no token reduction applied")
    handle.remove()
    return model


def can_apply(model: nn.Module) -> str | None:
    """``None`` when token reduction can be applied to ``model``, else the reason it cannot."""
    return refusal(model)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"tome:r=8"`` -> ``("tome", {"r": 8})``; values are Python literals (``blocks=[3,6,9]``, ``r=(16,-1)``),
    pairs are separated by commas outside brackets."""
    method, _, rest = spec.strip().partition(":")
    if method not in METHODS:
        close = difflib.get_close_matches(method, METHODS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ArgumentError(f"--tokens: the method must be one of {', '.join(METHODS)} (e.g. tome:r=8), "
                         f"got {method!r}{hint}")
    params: dict[str, Any] = {}
    for item in _split_top(rest):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ArgumentError(f"--tokens {spec!r}: parameters are KEY=VALUE separated by commas (e.g. "
                             f"evit:keep=0.7,blocks=[3,6,9]), got {item!r}")
        try:
            params[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            params[key] = value.strip()
    return method, params


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return [s for s in out if s.strip()]


def apply_spec(model: nn.Module, spec: str) -> TokenReduction:
    """``apply`` from the command-line form ``"method:key=value,..."``."""
    method, params = parse_spec(spec)
    return apply(model, method, **params)

