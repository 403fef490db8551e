"""Fake-quantizers: uniform (per tensor, per channel, per token), log2, log√2, AdaLog, twin-uniform.

Each quantizer is a small module that maps a float tensor to the nearest value on its grid (quantize, then
de-quantize), so a simulated model runs in float with the rounding and clipping of the integer one. Static
quantizers are calibrated: ``observe`` collects statistics over calibration batches, ``finish`` chooses their
parameters by the method asked (``minmax``, ``percentile``, ``mse``/``omse``).

Sources (algorithms written from the papers; facts checked against the official code):
- uniform, asymmetric for activations and symmetric per output channel for weights: the usual PTQ baseline
  (PTQ4ViT, RepQ-ViT, FQ-ViT).
- ``mse``/``omse``: the clipping range that minimises the squared error of the quantized tensor, found by a grid
  search over clipping ratios (OMSE, Choukroun et al. 2019; FQ-ViT's ``--quant-method omse``). 80 ratios in
  [0.05, 1]; ``percentile``: the 0.01th/99.99th percentiles (our default).
- ``log2`` / ``logsqrt2`` (RepQ-ViT, AdaLog): code = round(-log_b(x / s)), 2**bits codes, values whose code falls
  beyond the last one become 0; b = 2 or √2.
- ``adalog`` (AdaLog, ECCV 2024): base b = 2**(q / r) with r = 37 fixed and the integer q searched (AdaLog's
  ``quantizers/logarithm.py``); for post-GELU inputs a shift is added before the log quantizer and removed after
  (AdaLog's bias re-parameterisation folds it into the next layer's bias).
- ``twin`` (PTQ4ViT, ECCV 2022): two uniform ranges of 2**(bits-1) levels each. Post-softmax: [0, split) with step
  split / (2**(bits-1) - 1) and [split, 1] with step 1 / (2**(bits-1) - 1), split searched over 2**-i, i < 20.
  Post-GELU: the negative range has a fixed step 0.17 / 2**(bits-1) (GELU's minimum is -0.17), the positive
  range's step is searched.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from visionzoo.errors import ArgumentError

METHODS = ("minmax", "percentile", "mse", "omse")
GRANULARITIES = ("tensor", "channel", "token")
KINDS = ("uniform", "log2", "logsqrt2", "adalog", "twin")
MIN_BITS, MAX_BITS = 2, 8
GELU_MIN = 0.16997  # -min over x of x * Phi(x)
ADALOG_R = 37
PERCENTILE = 99.99
_CLIP_RATIOS = torch.linspace(0.05, 1.0, 80)
_MAX_ROWS = 2048  # rows (tokens, pixels, query rows) kept per calibration batch for the searches


def check_bits(bits: int, what: str = "bits") -> int:
    """``bits`` as an int in 2..8, or a ``ValueError`` naming the argument."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ArgumentError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ArgumentError(f"{what} must be one of {allowed}, got {value!r}")
    return value


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)`` in dB (inf when equal)."""
    ref, approx = ref.detach().double(), approx.detach().double()
    noise = (ref - approx).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


# --- the uniform grid ----------------------------------------------------------------------------------------
def uniform_qparams(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point of the ``bits``-bit grid covering ``[lo, hi]`` (symmetric: ``[-max|.|, max|.|]``)."""
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = (amax / (2 ** (bits - 1) - 1)).clamp_min(1e-12)
        return scale, torch.zeros_like(scale)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)  # the grid always holds 0 exactly (zero padding, ReLU)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-12)
    return scale, torch.round(-lo / scale)


def fake_quant_uniform(x: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Round ``x`` to the grid ``(q - zero) * scale``, with ``q`` clipped to the ``bits``-bit integer range."""
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2 ** bits - 1
    q = torch.clamp(torch.round(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def _rows(x: Tensor, channel_axis: int) -> Tensor:
    """``x`` as a ``(rows, channels)`` matrix with the channel axis last."""
    return x.detach().movedim(channel_axis, -1).reshape(-1, x.shape[channel_axis]).float()


def _subsample(rows: Tensor, n: int = _MAX_ROWS) -> Tensor:
    if rows.shape[0] <= n:
        return rows
    idx = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(rows.shape[0]))[:n]
    return rows[idx]


class Quantizer(nn.Module):
    """Base class: ``forward`` fake-quantizes; ``observe``/``finish`` calibrate. ``enabled=False`` passes through."""

    kind = "base"

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.enabled = True
        self.calibrated = False
        self._samples: list[Tensor] = []

    def observe(self, x: Tensor) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Choose the parameters from what ``observe`` saw; a quantizer that saw nothing raises."""
        raise NotImplementedError

    def quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if not self.calibrated:
            raise RuntimeError(f"{self}: not calibrated; run visionzoo.compress.quantize with calibration images")
        return self.quantize(x)

    def _need_samples(self) -> Tensor:
        if not self._samples:
            raise ArgumentError(f"{self}: no calibration data reached this quantizer; the calibration set is empty or "
                             f"the layer never ran (give at least one image that runs through the whole model)")
        return torch.cat(self._samples)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class UniformQuantizer(Quantizer):
    """Uniform fake-quantizer.

    Args:
        granularity: ``"tensor"`` (one static range), ``"channel"`` (a static range per channel along
            ``channel_axis``: weights per output channel, post-LayerNorm activations per channel) or ``"token"``
            (dynamic: each row of ``(tokens, channels)`` gets its own range at run time, shrunk by a clip ratio
            that calibration chooses).
        method: ``minmax``, ``percentile``, ``mse`` or ``omse`` (the same search, under the name FQ-ViT uses).
    """

    kind = "uniform"

    def __init__(self, bits: int = 8, symmetric: bool = False, granularity: str = "tensor", channel_axis: int = -1,
                 method: str = "minmax") -> None:
        super().__init__(bits)
        self.symmetric = symmetric
        self.granularity = check_choice(granularity, GRANULARITIES, "granularity")
        self.method = check_choice(method, METHODS, "calibration method")
        self.channel_axis = channel_axis
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero", torch.zeros(()))
        self.register_buffer("clip", torch.ones(()))
        self._lo: Tensor | None = None
        self._hi: Tensor | None = None

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, {self.granularity}, "
                f"{self.method}")

    # calibration
    def observe(self, x: Tensor) -> None:
        rows = _rows(x, self.channel_axis)
        if self.granularity == "channel":
            lo, hi = rows.amin(0), rows.amax(0)
        else:
            lo, hi = rows.min(), rows.max()
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        if self.method != "minmax" or self.granularity == "token":
            self._samples.append(_subsample(rows))

    def finish(self) -> None:
        if self._lo is None:
            self._need_samples()
        lo, hi = self._lo, self._hi
        if self.granularity == "token":
            self.clip = self._search_token_clip(self._need_samples()) if self.method != "minmax" else torch.ones(())
        elif self.method == "percentile":
            rows = self._need_samples()
            dim = 0 if self.granularity == "channel" else None
            flat = rows if dim == 0 else rows.flatten()
            lo = torch.quantile(_cap(flat), 1 - PERCENTILE / 100, dim=dim)
            hi = torch.quantile(_cap(flat), PERCENTILE / 100, dim=dim)
        elif self.method in ("mse", "omse"):
            lo, hi = self._search_range(self._need_samples(), lo, hi)
        if self.granularity != "token":
            self.scale, self.zero = uniform_qparams(lo, hi, self.bits, self.symmetric)
        self._samples, self._lo, self._hi = [], None, None
        self.calibrated = True

    def _search_range(self, rows: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """The clipping ratio of ``[lo, hi]`` with the least squared error (per channel for ``"channel"``)."""
        best_err, best = None, None
        for r in _CLIP_RATIOS:
            s, z = uniform_qparams(lo * r, hi * r, self.bits, self.symmetric)
            err = (fake_quant_uniform(rows, s, z, self.bits, self.symmetric) - rows).pow(2)
            err = err.sum(0) if self.granularity == "channel" else err.sum()
            if best_err is None:
                best_err, best = err, torch.full_like(err, float(r))
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, torch.full_like(best, float(r)), best)
        return lo * best, hi * best

    def _token_range(self, rows: Tensor, clip: Tensor | float) -> tuple[Tensor, Tensor]:
        return rows.amin(-1, keepdim=True) * clip, rows.amax(-1, keepdim=True) * clip

    def _search_token_clip(self, rows: Tensor) -> Tensor:
        errs = []
        for r in _CLIP_RATIOS:
            s, z = uniform_qparams(*self._token_range(rows, r), self.bits, self.symmetric)
            errs.append((fake_quant_uniform(rows, s, z, self.bits, self.symmetric) - rows).pow(2).sum())
        return _CLIP_RATIOS[int(torch.stack(errs).argmin())].clone()

    # run time
    def quantize(self, x: Tensor) -> Tensor:
        if self.granularity == "token":
            moved = x.movedim(self.channel_axis, -1)
            s, z = uniform_qparams(*self._token_range(moved, self.clip), self.bits, self.symmetric)
            return fake_quant_uniform(moved, s, z, self.bits, self.symmetric).movedim(-1, self.channel_axis)
        scale, zero = self.scale, self.zero
        if scale.ndim == 1:  # per channel: put the channel axis in place for broadcasting
            shape = [1] * x.ndim
            shape[self.channel_axis] = -1
            scale, zero = scale.view(shape), zero.view(shape)
        return fake_quant_uniform(x, scale, zero, self.bits, self.symmetric)

    def quantize_weight(self, w: Tensor) -> None:
        """Calibrate on a weight directly (per output channel when ``granularity="channel"``, axis 0)."""
        self.observe(w)
        self.finish()


def _cap(x: Tensor, n: int = 1 << 22) -> Tensor:
    """torch.quantile refuses inputs above 16M elements: a seeded subsample of at most ``n``."""
    if x.numel() <= n:
        return x
    if x.ndim == 1:
        return x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:n]]
    return x[: max(1, n // x.shape[1])]


class LogQuantizer(Quantizer):
    """Log quantizer for non-negative, power-law activations (post-softmax; post-GELU with ``shift``).

    ``x_hat = s * b ** -code``, ``code = round(-log_b(x / s))`` in ``0 .. 2**bits - 1``; codes beyond the last become
    0. ``base`` is 2 (``log2``), √2 (``logsqrt2``) or searched (``adalog``: ``b = 2 ** (q / 37)``, integer q).
    ``shift`` (post-GELU): quantize ``x + shift``, then subtract it, with ``shift = -min`` of the calibration data.
    """

    def __init__(self, bits: int = 4, kind: str = "log2", shift: bool = False) -> None:
        super().__init__(bits)
        self.kind = check_choice(kind, ("log2", "logsqrt2", "adalog"), "log quantizer kind")
        self.use_shift = shift
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("shift", torch.zeros(()))
        q = {"log2": ADALOG_R, "logsqrt2": ADALOG_R / 2, "adalog": ADALOG_R}[self.kind]
        self.register_buffer("q", torch.tensor(float(q)))  # base = 2 ** (q / r)

    @property
    def base(self) -> float:
        return 2.0 ** (float(self.q) / ADALOG_R)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {self.kind}, base={self.base:.4f}" + (", shift" if self.use_shift else "")

    def observe(self, x: Tensor) -> None:
        self._samples.append(_subsample(x.detach().reshape(-1, x.shape[-1]).float()))

    def _log_fq(self, x: Tensor, scale: Tensor | float, q: Tensor | float) -> Tensor:
        levels = 2 ** self.bits
        exponent = float(q) / ADALOG_R  # log2 of the base
        ratio = (x / scale).clamp(min=1e-30, max=1.0)
        code = torch.round(-torch.log2(ratio) / exponent)
        keep = code < levels
        code = code.clamp(0, levels - 1)
        return torch.where(keep, scale * torch.exp2(-code * exponent), torch.zeros_like(x))

    def finish(self) -> None:
        x = self._need_samples().flatten()
        self._samples = []
        shift = (-x.min()).clamp_min(0.0) if self.use_shift else torch.zeros(())
        x = x + shift
        top = x.max().clamp_min(1e-12)
        qs = [float(self.q)] if self.kind != "adalog" else [float(q) for q in range(ADALOG_R // 4, 2 * ADALOG_R + 1)]
        scales = [top * 2.0 ** (-i / 8) for i in range(0, 9)]  # the scale may sit below the max (clipping)
        best = None
        for q in qs:
            for s in scales:
                err = (self._log_fq(x, s, q) - x).pow(2).sum().item()
                if best is None or err < best[0]:
                    best = (err, q, s)
        _, q, s = best
        self.q, self.scale, self.shift = torch.tensor(q), s.clone().reshape(()), shift.reshape(())
        self.calibrated = True

    def quantize(self, x: Tensor) -> Tensor:
        if self.use_shift:
            return self._log_fq(x + self.shift, self.scale, self.q) - self.shift
        return self._log_fq(x, self.scale, self.q)


class TwinUniformQuantizer(Quantizer):
    """PTQ4ViT's twin uniform quantizer: two ranges with their own step, ``2**(bits-1)`` levels each.

    ``mode="softmax"``: values in [0, 1]; ``[0, split)`` with a fine step, ``[split, 1]`` with step
    ``1 / (2**(bits-1) - 1)``. ``mode="gelu"``: negative values with a fixed step ``0.17 / 2**(bits-1)``, positive
    ones with a searched step.
    """

    kind = "twin"

    def __init__(self, bits: int = 4, mode: str = "softmax") -> None:
        super().__init__(bits)
        self.mode = check_choice(mode, ("softmax", "gelu"), "twin quantizer mode")
        self.register_buffer("split", torch.tensor(0.01))
        self.register_buffer("step", torch.tensor(1.0))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, twin ({self.mode})"

    def observe(self, x: Tensor) -> None:
        self._samples.append(_subsample(x.detach().reshape(-1, x.shape[-1]).float()))

    def _fq(self, x: Tensor, param: Tensor | float) -> Tensor:
        half = 2 ** (self.bits - 1)
        if self.mode == "softmax":
            split = param
            fine = split / (half - 1)
            high = torch.round(x.clamp(split, 1.0) * (half - 1)).clamp(0, half - 1) / (half - 1)
            low = torch.round(x.clamp(0.0, split) / fine).clamp(0, half - 1) * fine
            return torch.where(x >= split, high, low)
        neg_step = GELU_MIN / half
        neg = torch.round(x.clamp(max=0.0) / neg_step).clamp(-half, 0) * neg_step
        pos = torch.round(x.clamp(min=0.0) / param).clamp(0, half - 1) * param
        return torch.where(x < 0, neg, pos)

    def finish(self) -> None:
        x = self._need_samples().flatten()
        self._samples = []
        half = 2 ** (self.bits - 1)
        if self.mode == "softmax":
            cands = [torch.tensor(2.0 ** -i) for i in range(20)]
        else:
            top = x.max().clamp_min(1e-8)
            cands = [top * r / (half - 1) for r in _CLIP_RATIOS]
        errs = [(self._fq(x, c) - x).pow(2).sum() for c in cands]
        best = cands[int(torch.stack(errs).argmin())].reshape(())
        if self.mode == "softmax":
            self.split = best
        else:
            self.step = best
        self.calibrated = True

    def quantize(self, x: Tensor) -> Tensor:
        return self._fq(x, self.split if self.mode == "softmax" else self.step)


def make_quantizer(kind: str, bits: int, *, role: str = "act", method: str = "minmax", granularity: str = "tensor",
                   channel_axis: int = -1, symmetric: bool = False) -> Quantizer:
    """A quantizer by name. ``role``: ``"act"``, ``"softmax"`` (post-softmax probabilities), ``"gelu"`` (post-GELU)."""
    check_choice(kind, KINDS, "quantizer kind")
    if kind == "uniform":
        return UniformQuantizer(bits, symmetric, granularity, channel_axis, method)
    if kind == "twin":
        return TwinUniformQuantizer(bits, "gelu" if role == "gelu" else "softmax")
    return LogQuantizer(bits, kind, shift=role == "gelu")
