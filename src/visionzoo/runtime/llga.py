"""Rewrites of a frozen TorchScript graph for oneDNN Graph fusion (LLGA), which the ``torchscript`` deploy backend
runs before a plan's profiling runs (``prepare``).

Each works around one fault of oneDNN Graph in torch 2.13, isolated on a small module and named in its docstring;
results stay equal up to rounding, and the backend still checks every plan against eager. Each returns how many
nodes (or pieces) it rewrote, so that a caller and the tests can see whether it applied.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def prepare(graph: torch._C.Graph, dense: bool = True) -> int:
    """All the rewrites, in place, in the order they must run; returns how many pieces ``dense_pieces_for_llga``
    made dense (0 with ``dense=False``): a plan with dense pieces is worth timing against one without."""
    constant_operands_for_llga(graph)
    gelu_tanh_for_llga(graph)
    wrapped = dense_pieces_for_llga(graph) if dense else 0
    split_outputs_as_slices(graph)  # after the dense pieces, which wrap the unpacked pieces it replaces
    layer_norm_sums_for_llga(graph)
    return wrapped


def _insert(graph: torch._C.Graph, before: torch._C.Node, kind: str, args: list, like: torch._C.Value
            ) -> torch._C.Value:
    """A new ``kind`` node on ``args`` just before ``before``, typed as ``like``; returns its output."""
    new = graph.create(kind, list(args), 1)
    new.insertBefore(before)
    new.output().setType(like.type())
    return new.output()


def _replace(node: torch._C.Node, value: torch._C.Value) -> None:
    node.output().replaceAllUsesWith(value)
    node.destroy()


def constant_operands_for_llga(graph: torch._C.Graph) -> int:
    """Rewrite, in place, each ``aten::mul(a, C)`` as ``aten::div(a, 1 / C)`` and each ``aten::add(a, C)`` as
    ``aten::sub(a, -C)``, where ``C`` is a constant floating tensor (a frozen parameter: a layer scale, a learned
    coefficient, a position table); returns how many nodes it rewrote.

    oneDNN Graph (torch 2.13) fails to compile a partition that holds a linear together with a mul or add whose
    other operand is such a constant ("vector::_M_range_check", measured: ``Linear(x) * p``, ``x * p + Linear(x)``,
    ``Linear(x) + p``, for ``p`` of shape (), (1,) or (C,)), and the whole plan fails with it (SReT's learned
    coefficients). It compiles the same partition with sub and div. The add rewrite is exact; the mul one is within
    an ulp (``1 / C`` is rounded), and the plan is checked against eager afterwards either way."""
    n = 0
    for kind, into in (("aten::mul", "aten::div"), ("aten::add", "aten::sub")):
        for node in graph.findAllNodes(kind):
            ins = list(node.inputs())
            if len(ins) != (2 if kind == "aten::mul" else 3) or (kind == "aten::add" and ins[2].toIValue() != 1):
                continue
            const = [i for i in (0, 1) if ins[i].node().kind() == "prim::Constant"
                     and isinstance(ins[i].toIValue(), Tensor) and ins[i].toIValue().is_floating_point()]
            if len(const) != 1 or not isinstance(ins[1 - const[0]].type(), torch._C.TensorType):
                continue
            c = ins[const[0]].toIValue()
            graph.setInsertPoint(node)
            value = graph.insertConstant((1.0 / c.double()).to(c.dtype) if kind == "aten::mul" else -c)
            _replace(node, _insert(graph, node, into, [ins[1 - const[0]], value, *ins[2:]], node.output()))
            n += 1
    return n


def gelu_tanh_for_llga(graph: torch._C.Graph) -> int:
    """Rewrite, in place, each ``aten::gelu(x, approximate="tanh")`` as its formula in plain ops,
    ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``; returns how many nodes it rewrote.

    oneDNN Graph's own tanh-GELU (torch 2.13) is off by 1.0-1.7e-4 relative after a linear (measured: Linear, GELU
    tanh, Linear), over the fp32 tolerance, so MaxViT's plan was refused; the same partition built from mul, add and
    tanh agrees with eager within 6e-7 and oneDNN Graph still fuses it."""
    n = 0
    for node in graph.findAllNodes("aten::gelu"):
        x, approximate = node.inputs()
        if approximate.toIValue() != "tanh":
            continue
        graph.setInsertPoint(node)

        def op(kind: str, *args: torch._C.Value, node=node) -> torch._C.Value:  # noqa: ANN001
            return _insert(graph, node, kind, args, node.output())
        const, one = graph.insertConstant, graph.insertConstant(1)
        inner = op("aten::add", x, op("aten::mul", op("aten::mul", op("aten::mul", x, x), x), const(0.044715)), one)
        tanh = op("aten::tanh", op("aten::mul", inner, const(math.sqrt(2 / math.pi))))
        _replace(node, op("aten::mul", op("aten::mul", x, const(0.5)), op("aten::add", tanh, const(1.0), one)))
        n += 1
    return n


_POINTWISE = frozenset(f"aten::{op}" for op in ("add", "sub", "mul", "div", "neg", "sigmoid", "relu", "gelu", "tanh",
                                                   "_convolution", "conv2d"))


def dense_pieces_for_llga(graph: torch._C.Graph) -> int:
    """Give each unpacked piece of a ``chunk``, ``split`` or ``unbind`` that an elementwise op or a convolution
    reads an ``aten::contiguous`` (a no-op where the piece is dense already, a copy where it is a strided view);
    returns how many pieces it wrapped. Pieces that only reach matmuls and attention are left as views.

    oneDNN Graph (torch 2.13) runs an elementwise partition on a strided input far slower than on a dense one:
    CAS-ViT's ``q, k, v = qkv(x).chunk(3, dim=1)`` pieces are strided at batch > 1, and its gates (conv, sigmoid,
    mul) took 200 ms a call at batch 32, where the whole plan fell to 0.45x eager (measured, AMD EPYC). Copying
    every piece instead cost DeiT-S and Swin-T 4-5% at batch 32, hence the choice by reader. Where the copies may
    not pay (T2T-ViT's row slices at batch 1: 9% slower in one measurement, even in another), the ``torchscript``
    backend times the plan with and without them and keeps the faster."""
    n = 0
    for unpack in graph.findAllNodes("prim::ListUnpack"):
        if unpack.input().node().kind() not in ("aten::chunk", "aten::split", "aten::split_with_sizes", "aten::unbind"):
            continue
        for piece in unpack.outputs():
            if not any(use.user.kind() in _POINTWISE for use in piece.uses()):
                continue
            graph.setInsertPoint(unpack)
            dense = graph.create("aten::contiguous", [piece, graph.insertConstant(0)], 1)  # 0: torch.contiguous_format
            dense.output().setType(piece.type())
            dense.insertAfter(unpack)
            piece.replaceAllUsesWith(dense.output())
            dense.replaceInput(0, piece)
            n += 1
    return n


def split_outputs_as_slices(graph: torch._C.Graph) -> int:
    """Rewrite, in place, each ``aten::split`` / ``aten::split_with_sizes`` whose pieces are unpacked into one
    ``aten::slice`` per piece (the same views); returns how many splits it rewrote.

    oneDNN Graph (torch 2.13) fails to compile a partition where a piece of a split meets a linear's output in an
    add ("vector::_M_range_check"; T2T-ViT's Performer: ``k, q, v = kqv(x).split(d)``, then ``v + proj(y)``), and
    compiles it when the piece is a slice. The bounds are the split's constants, so no size is needed: the last
    piece runs to the end."""
    n = 0
    for unpack in graph.findAllNodes("prim::ListUnpack"):
        split = unpack.input().node()
        if split.kind() not in ("aten::split", "aten::split_with_sizes") or len(list(split.inputs())) != 3:
            continue
        x, size, dim = split.inputs()
        size, dim, pieces = size.toIValue(), dim.toIValue(), list(unpack.outputs())
        if not isinstance(dim, int) or not (isinstance(size, int) or (isinstance(size, list) and
                                                                          len(size) == len(pieces))):
            continue
        sizes = size if isinstance(size, list) else [size] * len(pieces)
        graph.setInsertPoint(unpack)
        start = 0
        for i, piece in enumerate(pieces):
            end = None if i == len(pieces) - 1 else start + sizes[i]
            args = [x, *(graph.insertConstant(v) for v in (dim, start, end, 1))]
            piece.replaceAllUsesWith(_insert(graph, unpack, "aten::slice", args, piece))
            start = end
        unpack.destroy()
        if not split.output().uses():
            split.destroy()
        n += 1
    return n


def layer_norm_sums_for_llga(graph: torch._C.Graph) -> int:
    """Rewrite, in place, each ``aten::add(a, layer_norm(x))`` (alpha 1, either order) as
    ``aten::sub(a, neg(layer_norm(x)))``, which is exact; returns how many adds it rewrote.

    oneDNN Graph (torch 2.13) fuses a LayerNorm with the add that reads it and gets the sum wrong: 0.5 relative
    for ``c + LayerNorm(a)`` on fresh inputs (measured; TNT adds a LayerNorm's output to the patch tokens, and its
    plan was 0.4-0.7 off). With the negation between them it agrees within 2e-7."""
    n = 0
    for node in graph.findAllNodes("aten::add"):
        ins = list(node.inputs())
        if len(ins) != 3 or ins[2].toIValue() != 1:
            continue
        normed = [i for i in (1, 0) if ins[i].node().kind() == "aten::layer_norm"]
        if not normed:
            continue
        ln, other = ins[normed[0]], ins[1 - normed[0]]
        graph.setInsertPoint(node)
        neg = _insert(graph, node, "aten::neg", [ln], ln)
        _replace(node, _insert(graph, node, "aten::sub", [other, neg, ins[2]], node.output()))
        n += 1
    return n
