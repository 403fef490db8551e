"""The fake-quant simulator: ``quantize(model, "w8a8", calib)`` on any family.

Convolutions and linears are found by module type (``nn.Conv1d/2d``, ``nn.Linear``) and swapped for subclasses that
fake-quantize the weight (per output channel) and the input activation; the attention matmuls are quantized
through the attention seam (``AttentionCore.q_quant/k_quant/v_quant/probs_quant``). The swapped modules keep
their parameter names, so the state dict reads as before plus the quantizers' buffers.

Which quantizer an activation gets depends on what produced it, found generically in one calibration forward:
a layer whose input is exactly the output tensor of a GELU module (``nn.GELU``, QuickGELU) gets the post-GELU
quantizer, one whose input is a LayerNorm output may get per-channel scales (``post_norm="channel"``, the
RepQ-ViT/FQ-ViT observation that post-LayerNorm activations vary across channels), and the probabilities get
the post-softmax quantizer.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import is_idle
from visionzoo.compress.quantizers import (
    KINDS,
    METHODS,
    Quantizer,
    UniformQuantizer,
    check_bits,
    check_choice,
    make_quantizer,
)
from visionzoo.errors import ArgumentError
from visionzoo.layers import AttentionCore

__all__ = ["QuantConfig", "QuantConv1d", "QuantConv2d", "QuantLinear", "parse_scheme", "quantize", "quant_layers"]

_SCHEME = re.compile(r"^w(\d)a(\d)(?:-(uniform|log2|logsqrt2|adalog|twin))?$")
POST_NORM = ("tensor", "channel")


@dataclass
class QuantConfig:
    """What to fake-quantize and how.

    Args:
        w_bits, a_bits: weight and activation bits (2-8). Weights are per output channel, symmetric.
        w_method: ``minmax`` or ``mse`` for the weights' per-channel range.
        a_method: ``minmax``, ``percentile``, ``mse`` or ``omse`` for static activation ranges.
        a_granularity: ``"tensor"`` (static) or ``"token"`` (dynamic per token/pixel, a calibrated clip ratio).
        post_norm: ``"channel"`` gives inputs that come straight from a LayerNorm static per-channel ranges.
        softmax: the post-softmax quantizer: ``uniform``, ``log2``, ``logsqrt2``, ``adalog`` or ``twin``.
        post_gelu: the quantizer of inputs that come straight from a GELU: ``uniform``, ``adalog`` or ``twin``.
        attn_bits: bits of the attention matmul inputs (q, k, v, probabilities); ``a_bits`` when ``None``.
        attention: quantize the attention matmuls at all (through the seam).
        edge_bits: bits (weights and input) of the first conv and the classifier, which PTQ papers keep at 8;
            ``None`` quantizes them like the rest.
        layer_bits: per-layer ``{name: (w_bits, a_bits)}`` (mixed precision; see ``mixed_precision``).
    """

    w_bits: int = 8
    a_bits: int = 8
    w_method: str = "minmax"
    a_method: str = "minmax"
    a_granularity: str = "tensor"
    post_norm: str = "tensor"
    softmax: str = "uniform"
    post_gelu: str = "uniform"
    attn_bits: int | None = None
    attention: bool = True
    edge_bits: int | None = 8
    layer_bits: dict[str, tuple[int, int]] = field(default_factory=dict)

    def validate(self) -> QuantConfig:
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        if self.attn_bits is not None:
            check_bits(self.attn_bits, "attn_bits")
        if self.edge_bits is not None:
            check_bits(self.edge_bits, "edge_bits")
        check_choice(self.w_method, ("minmax", "mse"), "w_method")
        check_choice(self.a_method, METHODS, "a_method")
        check_choice(self.a_granularity, ("tensor", "token"), "a_granularity")
        check_choice(self.post_norm, POST_NORM, "post_norm")
        check_choice(self.softmax, KINDS, "softmax quantizer")
        check_choice(self.post_gelu, ("uniform", "adalog", "twin"), "post_gelu quantizer")
        for name, bits in self.layer_bits.items():
            if not (isinstance(bits, (tuple, list)) and len(bits) == 2):
                raise ArgumentError(f"layer_bits[{name!r}] must be (w_bits, a_bits), got {bits!r}")
            check_bits(bits[0], f"layer_bits[{name!r}] w_bits")
            check_bits(bits[1], f"layer_bits[{name!r}] a_bits")
        return self

    @property
    def label(self) -> str:
        tag = "" if self.softmax == "uniform" and self.post_gelu == "uniform" else f"-{self.softmax}"
        return f"w{self.w_bits}a{self.a_bits}{tag}" + ("-mixed" if self.layer_bits else "")


def parse_scheme(scheme: str | QuantConfig, **overrides) -> QuantConfig:
    """``"w8a8"``, ``"w4a4-log2"``, ``"w4a4-adalog"``, ``"w6a6-twin"``... -> ``QuantConfig``.

    The suffix picks the post-softmax quantizer; ``adalog`` and ``twin`` also set the post-GELU one.
    """
    if isinstance(scheme, QuantConfig):
        return replace(scheme, **overrides).validate()
    m = _SCHEME.match(str(scheme))
    if not m:
        raise ArgumentError(f"quant scheme must look like w8a8, w6a6, w4a4 or w4a4-log2 (suffixes: uniform, log2, "
                         f"logsqrt2, adalog, twin; bits 2-8), got {scheme!r}")
    w, a, kind = int(m.group(1)), int(m.group(2)), m.group(3) or "uniform"
    gelu = kind if kind in ("adalog", "twin") else "uniform"
    return QuantConfig(**{**dict(w_bits=w, a_bits=a, softmax=kind, post_gelu=gelu), **overrides}).validate()


# --- quantized layers ----------------------------------------------------------------------------------------
class _QuantMixin:
    """Weight and input fake-quantizers on a conv/linear; the weight's grid is cached after calibration."""

    weight_quant: UniformQuantizer
    act_quant: Quantizer | None

    def _init_quant(self, w_bits: int, a_quant: Quantizer | None, w_method: str) -> None:
        self.weight_quant = UniformQuantizer(w_bits, symmetric=True, granularity="channel", channel_axis=0,
                                             method=w_method)
        self.act_quant = a_quant
        self._wq: Tensor | None = None

    def qweight(self) -> Tensor:
        if not self.weight_quant.enabled:
            return self.weight
        if not self.weight_quant.calibrated:
            self.weight_quant.quantize_weight(self.weight.detach())
        if self.training or self.weight.requires_grad and torch.is_grad_enabled():
            return self.weight_quant(self.weight)
        if self._wq is None or self._wq.shape != self.weight.shape:
            self._wq = self.weight_quant(self.weight).detach()
        return self._wq

    def qinput(self, x: Tensor) -> Tensor:
        return x if self.act_quant is None else self.act_quant(x)

    def reset_weight_cache(self) -> None:
        self._wq = None


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight (per output channel) and input."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.qinput(x), self.qweight(), self.bias)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight (per output channel) and input."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.qinput(x), self.qweight(), self.bias)


class QuantConv1d(_QuantMixin, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight (per output channel) and input."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.qinput(x), self.qweight(), self.bias)


_SWAP = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d, nn.Conv1d: QuantConv1d}


def _swap(module: nn.Module, w_bits: int, a_quant: Quantizer | None, w_method: str) -> nn.Module:
    """The quantized subclass instance sharing ``module``'s parameters, buffers and attributes."""
    q = _SWAP[type(module)].__new__(_SWAP[type(module)])
    q.__dict__ = {**module.__dict__, "_parameters": dict(module._parameters), "_buffers": dict(module._buffers),
                  "_modules": dict(module._modules)}
    q._init_quant(w_bits, a_quant, w_method)
    return q


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The fake-quantized convs/linears and attention cores of ``model``, by name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, _QuantMixin) or (isinstance(m, AttentionCore) and m.probs_quant is not None)}


def quantizable(model: nn.Module) -> dict[str, nn.Module]:
    """The convs and linears a simulator would quantize (exact types: subclasses keep their own forward)."""
    return {n: m for n, m in model.named_modules() if type(m) in _SWAP and not is_idle(model, n)}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


# --- what produced each layer's input ------------------------------------------------------------------------
_NORMS = (nn.LayerNorm, nn.GroupNorm)


@torch.no_grad()
def input_producers(model: nn.Module, x: Tensor, names: Iterable[str]) -> dict[str, str]:
    """For each layer in ``names``: ``"gelu"`` or ``"norm"`` when its input is exactly the output tensor of a
    ``nn.GELU`` / LayerNorm-like module (through identity modules such as eval-mode dropout), else ``""``."""
    outputs: dict[int, str] = {}
    seen: dict[str, str] = {}
    wanted = set(names)
    handles = []

    def tag_output(kind: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple, out: object) -> None:
            if isinstance(out, Tensor):
                outputs[id(out)] = kind
        return hook

    def passthrough(mod: nn.Module, args: tuple, out: object) -> None:
        if args and isinstance(args[0], Tensor) and out is args[0]:
            return  # same object: the tag stays
        if args and isinstance(args[0], Tensor) and isinstance(out, Tensor) and id(args[0]) in outputs \
                and out.data_ptr() == args[0].data_ptr() and out.shape == args[0].shape:
            outputs[id(out)] = outputs[id(args[0])]

    def read_input(name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], Tensor):
                seen.setdefault(name, outputs.get(id(args[0]), ""))
        return hook

    kept: list[Tensor] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.GELU) or "gelu" in type(m).__name__.lower():  # nn.GELU, QuickGELU
            handles.append(m.register_forward_hook(tag_output("gelu")))
        elif isinstance(m, _NORMS) or type(m).__name__ in ("LayerNorm2d",):
            handles.append(m.register_forward_hook(tag_output("norm")))
        elif isinstance(m, (nn.Dropout, nn.Identity)):
            handles.append(m.register_forward_hook(passthrough))
        if name in wanted:
            handles.append(m.register_forward_pre_hook(read_input(name)))
    # keep every output alive during the pass so ids are not reused
    handles.append(torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: kept.append(o)))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: seen.get(n, "") for n in names}


# --- the simulator -------------------------------------------------------------------------------------------
def _edge_names(model: nn.Module) -> set[str]:
    """The first conv and the classifier(s), named through the contract (``first_conv``, ``classifier``)."""
    names = set()
    first = getattr(model, "first_conv", None)
    if isinstance(first, str):
        names.add(first)
    cls = getattr(model, "classifier", None)
    names.update([cls] if isinstance(cls, str) else list(cls or ()))
    return names


def _act_quantizer(cfg: QuantConfig, bits: int, producer: str, channel_axis: int) -> Quantizer:
    if producer == "gelu" and cfg.post_gelu != "uniform":
        return make_quantizer(cfg.post_gelu, bits, role="gelu")
    if producer == "norm" and cfg.post_norm == "channel":
        return UniformQuantizer(bits, False, "channel", channel_axis, cfg.a_method)
    return UniformQuantizer(bits, False, cfg.a_granularity, channel_axis, cfg.a_method)


@torch.no_grad()
def quantize(model: nn.Module, scheme: str | QuantConfig, calib: Tensor | Iterable[Tensor], *, inplace: bool = False,
             **overrides) -> nn.Module:
    """A fake-quantized copy of ``model`` (or ``model`` itself with ``inplace=True``), calibrated on ``calib``.

    ``scheme``: ``"w8a8"``, ``"w4a4-log2"``... or a ``QuantConfig``; ``overrides`` set ``QuantConfig`` fields.
    ``calib``: a batch of images ``(N, C, H, W)`` or an iterable of batches (the user's data or the bundled
    data, see ``calibration_batches``). Raises ``ValueError`` for an empty calibration set or a bad bit width.
    """
    cfg = parse_scheme(scheme, **overrides)
    batches = _batches(calib)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    targets = quantizable(model)
    cores = {n: m for n, m in model.named_modules() if isinstance(m, AttentionCore) and not is_idle(model, n)}
    if not targets and not cores:
        name = getattr(model, "name", type(model).__name__)
        raise ArgumentError(f"{name} has no conv, linear or attention to quantize")
    producers = input_producers(model, batches[0][:1], targets)
    edges = _edge_names(model)
    for name, m in targets.items():
        w_bits, a_bits = cfg.layer_bits.get(name, (cfg.w_bits, cfg.a_bits))
        if cfg.edge_bits is not None and name in edges and name not in cfg.layer_bits:
            w_bits = a_bits = max(cfg.edge_bits, w_bits)
        axis = -1 if isinstance(m, nn.Linear) else 1
        _set_module(model, name, _swap(m, w_bits, _act_quantizer(cfg, a_bits, producers[name], axis), cfg.w_method))
    if cfg.attention:
        for name, core in cores.items():
            bits = cfg.layer_bits.get(name, (None, cfg.attn_bits or cfg.a_bits))[1]
            core.q_quant = UniformQuantizer(bits, True, cfg.a_granularity, -1, cfg.a_method)
            core.k_quant = UniformQuantizer(bits, True, cfg.a_granularity, -1, cfg.a_method)
            core.v_quant = UniformQuantizer(bits, True, cfg.a_granularity, -1, cfg.a_method)
            core.probs_quant = make_quantizer(cfg.softmax, bits, role="softmax", method=cfg.a_method)
    calibrate(model, batches)
    model.quant_config = cfg
    return model


def _batches(calib: Tensor | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(calib, Tensor):
        batches = [calib] if calib.shape[0] > 0 else []
    elif calib is None:
        batches = []
    else:
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calib]
        batches = [b for b in batches if b.shape[0] > 0]
    if not batches:
        raise ArgumentError("calib is empty: give at least one calibration image (a (N, C, H, W) tensor or an iterable "
                         "of batches; visionzoo.compress.calibration_batches('digits', model, n=32) builds one)")
    return batches


def quantizers(model: nn.Module) -> list[Quantizer]:
    return [m for m in model.modules() if isinstance(m, Quantizer)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: list[Tensor]) -> None:
    """Calibrate every quantizer in ``model``: weights from the weights, then activations from one pass over
    ``batches`` in which every quantizer sees fp32 activations (parallel calibration, as PTQ4ViT's)."""
    for m in model.modules():
        if isinstance(m, _QuantMixin):
            m.weight_quant.calibrated = False
            m.weight_quant.quantize_weight(m.weight.detach())
            m.reset_weight_cache()
    acts = [q for q in quantizers(model) if q.calibrated is False]
    _observe_pass(model, acts, batches)
    for q in acts:
        q.finish()


def _observe_pass(model: nn.Module, acts: list[Quantizer], batches: list[Tensor]) -> None:
    state = {id(q): q.enabled for q in acts}
    for q in acts:
        def observing(x: Tensor, q: Quantizer = q) -> Tensor:
            q.observe(x)
            return x
        q.forward = observing  # the calibration forward sees fp activations and passes them on unchanged
    try:
        for x in batches:
            model(x)
    finally:
        for q in acts:
            del q.forward  # back to the class's forward
            q.enabled = state[id(q)]


def set_quant_enabled(model: nn.Module, enabled: bool, names: Iterable[str] | None = None) -> None:
    """Turn fake-quantization on or off (all quantizers, or those inside the named layers) without removing it."""
    mods = dict(model.named_modules())
    roots = [mods[n] for n in names] if names is not None else [model]
    for root in roots:
        for q in root.modules():
            if isinstance(q, Quantizer):
                q.enabled = enabled
