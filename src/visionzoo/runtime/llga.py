"""Rewrites of a TorchScript plan for oneDNN Graph fusion (LLGA), which the ``torchscript`` deploy backend runs on
the trace before ``freeze`` (``dense_inputs_for_llga``, which needs the trace's strides) and on the frozen graph
before the plan's profiling runs (``prepare``).

Each works around one fault of oneDNN Graph in torch 2.13, isolated on a small module and named in its docstring;
results stay equal up to rounding, and the backend still checks every plan against eager. Each returns how many
nodes (or inputs) it rewrote, so that a caller and the tests can see whether it applied.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor


def prepare(graph: torch._C.Graph, skip: tuple[str, ...] = ()) -> None:
    """The rewrites of a frozen graph (``REWRITES``, in order), in place, but those named in ``skip`` (for ablations:
    ``benchmarks/llga_rewrites.py``). ``dense_inputs_for_llga`` runs before ``freeze``, on the trace."""
    unknown = set(skip) - {name for name, _ in REWRITES}
    if unknown:
        raise ValueError(f"llga.prepare: no rewrite named {sorted(unknown)}; the rewrites are "
                         f"{[name for name, _ in REWRITES]}")
    for name, rewrite in REWRITES:
        if name not in skip:
            rewrite(graph)


def plan(model: torch.nn.Module, x: Tensor, dense: bool = True, skip: tuple[str, ...] = ()
         ) -> tuple[torch.jit.ScriptModule, int]:
    """The ``torchscript`` backend's plan for ``x``: ``model`` traced, its strided inputs made dense (with ``dense``),
    frozen, rewritten (``prepare``, but ``skip``) and run three times with oneDNN Graph fusion on (the profiling runs
    after which the executor fuses and specialises); returns the plan and how many inputs it made dense. The
    process-wide fusion switch is restored afterwards. Runs under the caller's autocast."""
    was = torch.jit.onednn_fusion_enabled()
    torch.jit.enable_onednn_fusion(True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)  # trace/freeze: deprecated, still shipped
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the backend checks each plan's output
            m = torch.jit.trace(model, x, check_trace=False)
            wrapped = dense_inputs_for_llga(m) if dense else 0
            m = torch.jit.freeze(m)
            prepare(m.graph, skip)
            for _ in range(3):
                m(x)
    finally:
        torch.jit.enable_onednn_fusion(was)
    return m, wrapped


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


_UNARY = frozenset(f"aten::{op}" for op in (
    "exp", "log", "sqrt", "abs", "sigmoid", "tanh", "relu", "gelu", "elu", "leaky_relu", "hardtanh", "hardswish",
    "hardsigmoid", "softplus", "silu", "mish", "clamp", "square", "round"))
# the ops whose kernels oneDNN Graph gives a following elementwise op as a post-op (measured: not sub)
_HEADS = frozenset(f"aten::{op}" for op in ("linear", "matmul", "mm", "bmm", "addmm", "_convolution", "conv2d",
                                               "conv1d", "add", "mul", "div"))


def unary_heads_apart_for_llga(graph: torch._C.Graph) -> int:
    """Put an ``aten::contiguous`` (a no-op on the fresh, dense output of an elementwise op) between each unary
    elementwise op that would start a oneDNN Graph partition and the add, mul or div that read it; returns how many
    outputs it separated.

    oneDNN Graph (torch 2.13) runs a partition that starts with a unary op and continues with a binary one as an
    eltwise kernel with a binary post-op, and that kernel is its reference implementation: ``exp(x) / c`` at
    (1, 3136, 64) took 10.3 ms, and 0.13 ms with the two ops apart (measured, AMD EPYC; T2T-ViT's Performer features
    are ``exp(wx - |x|^2 / 2) / sqrt(m)``: 3.1 ms a call). oneDNN Graph does not fuse across the ``contiguous``, so
    each op runs on its own fast kernel. After a linear, matmul, conv, add, mul or div the unary op and the binary one
    are post-ops of that op's kernel, which is fast, and are left alone: separating them there can cost more than it
    saves (the sigmoid of ``x * sigmoid(x * (a x^2 + b))`` after a 1x1 conv: 2.6 ms apart against 0.8 ms fused, as
    ``x`` and the sigmoid's output then reach the mul in two layouts)."""
    n = 0
    for kind in sorted(_UNARY):
        for node in graph.findAllNodes(kind):
            if next(node.inputs()).node().kind() in _HEADS:
                continue
            out = node.output()
            readers = [use for use in out.uses() if use.user.kind() in ("aten::add", "aten::mul", "aten::div")]
            if not readers:
                continue
            graph.setInsertPoint(node)
            apart = graph.create("aten::contiguous", [out, graph.insertConstant(0)], 1)
            apart.output().setType(out.type())
            apart.insertAfter(node)
            for use in readers:
                use.user.replaceInput(use.offset, apart.output())
            n += 1
    return n


def gelu_tanh_for_llga(graph: torch._C.Graph) -> int:
    """Rewrite, in place, each ``aten::gelu(x, approximate="tanh")`` as the same function in plain ops,
    ``x sigmoid(x (a x^2 + b))`` with ``b = 2 sqrt(2 / pi)``, ``a = 0.044715 b`` (``(1 + tanh(z)) / 2`` is
    ``sigmoid(2 z)``); returns how many nodes it rewrote.

    oneDNN Graph's own tanh-GELU (torch 2.13) is off by 1.0-1.7e-4 relative after a linear (measured: Linear, GELU
    tanh, Linear), over the fp32 tolerance, so MaxViT's plan was refused. In plain ops it agrees with eager within
    1e-6, and oneDNN Graph fuses the chain into one binary kernel with post-ops. This form is one chain from ``x * x``
    on, and measured faster than the tanh form (split into four kernels): a 1x1 conv + GELU at (1, 256, 56, 56)
    channels-last took 0.74 ms against 1.29 ms, and 0.86 ms with oneDNN's own GELU (AMD EPYC, 2 threads)."""
    n = 0
    for node in graph.findAllNodes("aten::gelu"):
        x, approximate = node.inputs()
        if approximate.toIValue() != "tanh":
            continue
        graph.setInsertPoint(node)

        def op(kind: str, *args: torch._C.Value, node=node) -> torch._C.Value:  # noqa: ANN001
            return _insert(graph, node, kind, args, node.output())
        b = 2 * math.sqrt(2 / math.pi)
        const, one = graph.insertConstant, graph.insertConstant(1)
        inner = op("aten::add", op("aten::mul", op("aten::mul", x, x), const(0.044715 * b)), const(b), one)
        _replace(node, op("aten::mul", x, op("aten::sigmoid", op("aten::mul", x, inner))))
        n += 1
    return n


# the readers that oneDNN Graph runs slowly on a strided input: elementwise ops, convolutions and pooling (matmuls,
# softmax and LayerNorm read any layout at full speed, measured)
_POINTWISE = frozenset(f"aten::{op}" for op in ("add", "sub", "mul", "div", "neg", "sigmoid", "relu", "gelu", "tanh",
                                                   "_convolution", "conv2d", "avg_pool2d", "max_pool2d"))


def onednn_reads_dense(t: torch._C.TensorType) -> bool:
    """Whether a traced tensor type is laid out as oneDNN's fast elementwise kernels take it: dense (no gaps), with
    its dimensions in order or channels-last (dimension 1 innermost, the rest in order). Size-1 and broadcast
    (stride 0) dimensions do not count; a type without sizes or strides counts as dense."""
    sizes, strides = t.sizes(), t.strides()
    if sizes is None or strides is None or None in sizes or None in strides:
        return True
    dims = sorted((st, sz, i) for i, (sz, st) in enumerate(zip(sizes, strides)) if sz != 1 and st != 0)
    expect = 1
    for st, sz, _ in dims:
        if st != expect:
            return False
        expect *= sz
    order = [i for _, _, i in reversed(dims)]  # outermost first
    rest = [i for i in order if i != 1]
    return order == sorted(order) or (order[-1:] == [1] and rest == sorted(rest))


def dense_inputs_for_llga(traced: torch.jit.ScriptModule) -> int:
    """Before ``freeze``: give each input of an elementwise op, a convolution or a pooling whose traced layout is not
    one that ``onednn_reads_dense`` accepts an ``aten::contiguous`` (a copy), in every traced (sub)module graph;
    returns how many inputs it wrapped. The trace's types hold the example input's sizes and strides, which
    ``freeze`` drops.

    oneDNN Graph (torch 2.13) runs an elementwise partition with a strided input on its reference kernels, 50-150x
    slower than on a dense copy (measured, AMD EPYC: ``relu(x.permute(0, 2, 3, 1) + y)`` at (8, 56, 56, 64) took 49
    ms against 1.0 ms; at (8, 6, 197, 64), a transpose(1, 2), 16 ms against 0.1 ms). Plain and channels-last
    views run at full speed and are left alone. RMT's rotary embedding reads a permuted (B, heads, H, W, d) view and
    spent 190 of its 250 ms of oneDNN time there; CAS-ViT's ``qkv.chunk(3, dim=1)`` pieces have gaps at batch > 1
    (200 ms a call at batch 32). The copies may not pay where a partition would have been fast anyway, so the
    ``torchscript`` backend times the plan with and without them and keeps the faster."""
    n = 0
    for sub in traced.modules():
        try:
            graph = sub.graph
        except (AttributeError, RuntimeError):  # a submodule whose forward the trace never ran
            continue
        for kind in sorted(_POINTWISE):
            for node in graph.findAllNodes(kind):
                for i, value in enumerate(list(node.inputs())):
                    t = value.type()
                    if (not isinstance(t, torch._C.TensorType) or onednn_reads_dense(t)
                            or value.node().kind() == "aten::contiguous"):  # a module shared by two instances
                        continue
                    graph.setInsertPoint(node)
                    dense = _insert(graph, node, "aten::contiguous", [value, graph.insertConstant(0)], value)
                    node.replaceInput(i, dense)
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


# the order matters: the unary ops are kept apart before the GELU rewrite adds a sigmoid that must stay in its chain
REWRITES = (("constant_operands", constant_operands_for_llga), ("unary_heads_apart", unary_heads_apart_for_llga),
            ("gelu_tanh", gelu_tanh_for_llga), ("split_slices", split_outputs_as_slices),
            ("layer_norm_sums", layer_norm_sums_for_llga))
