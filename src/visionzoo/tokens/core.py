"""What every token-reduction method shares: finding the plain-token blocks, the per-forward token state, the
per-block hook that runs a block through the token seam, merging by group, and the handle ``apply`` returns.

A model takes part when it has ``layers.TokenBlock`` s (the token seam). Blocks that share a parent module (ViT's
``blocks``) carry one token sequence; each sequence gets one ``TokenState``, reset by its first block on every
forward pass. Every block of the sequence gets a hook (a ``TokenHook``, set as ``block.token_hook``), also those
where nothing is removed, because later blocks must still see the token sizes (proportional attention) or the
padding mask (ATS) as a key bias on the attention core.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from visionzoo.backbone import is_idle
from visionzoo.errors import ArgumentError
from visionzoo.layers import AttentionCore, TokenBlock


# --- which blocks ---------------------------------------------------------------------------------------------
def token_sequences(model: nn.Module) -> list[list[TokenBlock]]:
    """The model's ``TokenBlock`` s grouped by parent module (one group per token sequence), in model order; blocks
    the current configuration does not run (``idle_names``) are left out."""
    groups: dict[str, list[TokenBlock]] = {}
    for name, m in model.named_modules():
        if isinstance(m, TokenBlock) and not is_idle(model, name):
            groups.setdefault(name.rpartition(".")[0], []).append(m)
    return list(groups.values())


def refusal(model: nn.Module) -> str | None:
    """Why token reduction cannot be applied to ``model`` (``None`` when it can)."""
    name = getattr(model, "name", type(model).__name__)
    if getattr(model, "token_reduction", None) is not None:
        return (f"{name} already has {model.token_reduction.spec} applied; call visionzoo.tokens.remove(model) "
                f"first")
    seqs = token_sequences(model)
    if seqs and getattr(model, "no_token_reduction_reason", None):  # token blocks, but something needs every token
        return f"{name} cannot take token reduction: {model.no_token_reduction_reason}"
    if not seqs:
        if getattr(model, "no_token_reduction_reason", None):  # a family that says why (TNT's word stream)
            why = model.no_token_reduction_reason
        elif not getattr(model, "has_attention", False):
            why = ("it computes no softmax attention (has_attention=False): its tokens are the pixels of "
                   "convolutional feature maps")
        else:
            why = ("its attention runs on a spatial map (windows, stripes or stages that downsample the map), not on "
                   "one plain token sequence, so merging or dropping tokens would break the map layout")
        return (f"{name} cannot take token reduction: {why}. It needs blocks built on the token seam "
                f"(layers.TokenBlock), as in ViT and DeiT (visionzoo.list_models('vit_*'), 'deit_*')")
    if getattr(model, "grad_checkpointing", False):
        return (f"{name} has gradient checkpointing on; its recomputed blocks would see the token state of a later "
                f"block. Call model.set_grad_checkpointing(False) first")
    if getattr(model, "out_indices", None) is not None:
        return (f"{name} is set to return feature maps (features_only); reduced tokens no longer form a map. Use "
                f"a model with a classifier or num_classes=0")
    return None


# --- the state one forward pass carries -----------------------------------------------------------------------
class TokenState:
    """What the blocks of one token sequence pass on during one forward pass.

    Attributes:
        size: ``(B, N, 1)`` original patches per token (ToMe, MCTF), or ``None`` (all 1).
        mask: ``(B, N)`` booleans, ``False`` for padding (ATS: the token count varies per image), or ``None``.
        source: ``(B, N, N0)`` which original tokens each token holds (``trace_source``), or ``None``.
        counts: the token count before the first block and after each block: an int, or a ``(B,)`` tensor of
            per-image counts when the sequence is padded.
    """

    def __init__(self, prop_attn: bool = False, trace_source: bool = False) -> None:
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.reset()

    def reset(self) -> None:
        self.size: Tensor | None = None
        self.mask: Tensor | None = None
        self.source: Tensor | None = None
        self.counts: list[int | Tensor] = []
        self.prefix = 0
        self.batch = 0

    def start(self, x: Tensor, prefix: int) -> None:
        self.reset()
        self.prefix = prefix
        B, N, _ = x.shape
        self.batch = B
        self.counts.append(N)
        if self.trace_source:
            self.source = torch.eye(N, device=x.device, dtype=x.dtype).expand(B, N, N)

    def count(self, x: Tensor) -> int | Tensor:
        return x.shape[1] if self.mask is None else self.mask.sum(1)

    def key_bias(self) -> Tensor | None:
        """``(B, 1, 1, N)`` to add to the attention logits: log size (proportional attention) and -inf on padding."""
        bias = None
        if self.prop_attn and self.size is not None:
            bias = self.size.log()[:, None, None, :, 0]  # (B, N, 1) -> (B, 1, 1, N)
        if self.mask is not None:
            pad = torch.zeros(self.mask.shape, device=self.mask.device).masked_fill(~self.mask, float("-inf"))
            pad = pad[:, None, None, :]  # (B, N) -> (B, 1, 1, N)
            bias = pad if bias is None else bias + pad
        return bias

    def sizes(self, x: Tensor) -> Tensor:
        return self.size if self.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)


# --- a block run through the seam -----------------------------------------------------------------------------
class TokenHook(nn.Module):
    """Runs one ``TokenBlock`` with its sequence's state; subclasses reduce in ``run``.

    The first hook of a sequence resets the state, every hook puts the key bias (token sizes, padding) on the
    block's attention core for the duration of the block, and records the token count after it.
    """

    def __init__(self, state: TokenState, index: int, num_blocks: int) -> None:
        super().__init__()
        self.state = state
        self.index = index
        self.first = index == 0
        self.last = index == num_blocks - 1

    def forward(self, block: TokenBlock, x: Tensor) -> Tensor:
        st = self.state
        if self.first:
            st.start(x, block.prefix_tokens)
        core = block.attn_core
        previous = core.extra_bias
        core.extra_bias = st.key_bias()
        try:
            x = self.run(block, x)
        finally:
            core.extra_bias = previous
        st.counts.append(st.count(x))
        if self.last and st.mask is not None:
            x = fill_padding(x, st.mask, st.prefix)
        return x

    def run(self, block: TokenBlock, x: Tensor) -> Tensor:
        """The block with nothing removed."""
        x = x + block.attn_branch(x)
        return x + block.mlp_branch(x)

    def extra_repr(self) -> str:
        return f"block={self.index}"


def fill_padding(x: Tensor, mask: Tensor, prefix: int) -> Tensor:
    """Padding tokens set to the mean of the image's real patch tokens, so a mean over all patch tokens (an
    ``avg``-pooling head) equals the mean over the real ones."""
    patches, valid = x[:, prefix:], mask[:, prefix:, None].to(x.dtype)
    mean = (patches * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp_min(1)
    return torch.cat([x[:, :prefix], torch.where(valid.bool(), patches, mean)], dim=1)


class CaptureQKV:
    """A ``qkv_observer`` that keeps what a hook needs from one attention call (the call's tensors, by reference)."""

    def __init__(self) -> None:
        self.q = self.k = self.v = self.bias = None
        self.scale = 1.0

    def __call__(self, core: AttentionCore, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                 scale: float) -> None:
        self.q, self.k, self.v, self.bias, self.scale = q, k, v, bias, scale

    def class_attention(self) -> Tensor:
        """``(B, heads, N)``: the attention of the class token (query 0) over all keys, with the call's bias."""
        logits = (self.q[..., :1, :] * self.scale) @ self.k.transpose(-2, -1)  # (B, h, 1, d) @ (B, h, d, N)
        if self.bias is not None:
            bias = self.bias if self.bias.shape[-2] == 1 else self.bias[..., :1, :]
            logits = logits + bias if bias.is_floating_point() else logits.masked_fill(~bias, float("-inf"))
        return logits.softmax(-1)[..., 0, :]  # (B, h, 1, N) -> (B, h, N)

    def clear(self) -> None:
        self.q = self.k = self.v = self.bias = None


def run_observed(block: TokenBlock, x: Tensor, capture: CaptureQKV) -> Tensor:
    """``x + attn_branch(x)`` with ``capture`` watching the block's attention call."""
    core = block.attn_core
    previous = core.qkv_observer
    core.qkv_observer = capture
    try:
        return x + block.attn_branch(x)
    finally:
        core.qkv_observer = previous


# --- merging tokens by group ----------------------------------------------------------------------------------
def scatter_groups(x: Tensor, group: Tensor, num_groups: int, dim: int = 1, reduce: str = "sum") -> Tensor:
    """Reduce the entries of ``x`` along ``dim`` into ``num_groups`` slots: entry ``i`` goes to slot ``group[:, i]``.

    ``group`` is ``(B, n)`` (n = ``x.shape[dim]``), with values in ``[0, num_groups]``; ``num_groups`` itself is a
    discard slot (dropped tokens). ``reduce`` is ``"sum"`` or ``"amax"``.
    """
    shape = [1] * x.ndim
    shape[0], shape[dim] = group.shape
    index = group.reshape(shape).expand(x.shape)
    out_shape = list(x.shape)
    out_shape[dim] = num_groups + 1
    out = x.new_zeros(out_shape)
    out = out.scatter_add(dim, index, x) if reduce == "sum" else out.scatter_reduce(dim, index, x, reduce)
    return out.narrow(dim, 0, num_groups)


def merge_weighted(x: Tensor, weight: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """The ``weight``-weighted mean ``(B, G, C)`` of the tokens ``x`` ``(B, n, C)`` in each group."""
    w = weight[..., None] if weight.ndim == 2 else weight
    num = scatter_groups(x * w, group, num_groups)
    den = scatter_groups(w, group, num_groups)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def merge_source(state: TokenState, group: Tensor, num_groups: int) -> None:
    """Carry ``state.source`` through a merge of the patch tokens (prefix rows pass unchanged)."""
    if state.source is None:
        return
    P = state.prefix
    src = scatter_groups(state.source[:, P:], group, num_groups, reduce="amax")
    state.source = torch.cat([state.source[:, :P], src], dim=1)


def gather_source(state: TokenState, index: Tensor) -> None:
    """Carry ``state.source`` through a selection ``index`` ``(B, n)`` of the patch tokens."""
    if state.source is None:
        return
    P = state.prefix
    src = state.source[:, P:].gather(1, index[..., None].expand(-1, -1, state.source.shape[-1]))
    state.source = torch.cat([state.source[:, :P], src], dim=1)


# --- parameters -----------------------------------------------------------------------------------------------
def check_blocks(method: str, blocks: Sequence[int] | None, num_blocks: int, default: Sequence[int]) -> list[int]:
    """Validated 0-based block indices (``None``: ``default``); negative indices count from the end."""
    if blocks is None:
        return sorted(set(default))
    if isinstance(blocks, int):
        blocks = [blocks]
    out = []
    for b in blocks:
        if not isinstance(b, int) or not -num_blocks <= b < num_blocks:
            raise ArgumentError(f"{method}: blocks entry {b!r} is out of range for a sequence of {num_blocks} blocks "
                             f"(valid: 0..{num_blocks - 1}, or negative from the end)")
        out.append(b % num_blocks)
    return sorted(set(out))


def check_fraction(method: str, name: str, value: Any, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1 if low_open else
                                                                              0 <= value <= 1):
        rng = "(0, 1]" if low_open else "[0, 1]"
        raise ArgumentError(f"{method}: {name} must be a number in {rng}, got {value!r}")
    return float(value)


def check_int(method: str, name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(f"{method}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


# --- the handle -----------------------------------------------------------------------------------------------
class TokenReduction:
    """A token-reduction method applied to a model; ``apply`` returns it and keeps it as ``model.token_reduction``.

    Subclasses set ``name``, ``defaults`` (every parameter and its default) and ``make_hook``; ``configure``
    validates the parameters against the model. What a user reads back: ``spec`` (``"tome:r=13"``),
    ``token_counts()``, ``source`` (with ``trace_source=True``), ``remove()``; for training, ``training_loss``
    (a loss function for ``train.fit``, or ``None``) and ``on_train_step(progress)`` (schedules).
    """

    name = ""
    defaults: dict[str, Any] = {}
    prop_attn = False

    def __init__(self, model: nn.Module, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ArgumentError(f"{self.name}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                             f"{self.name} takes {', '.join(f'{k}={v!r}' for k, v in self.defaults.items())}")
        why = refusal(model)
        if why is not None:
            raise ArgumentError(f"visionzoo.tokens.apply({self.name!r}): {why}")
        self.model = model
        self.given = dict(params)
        self.params = {**self.defaults, **params}
        self.sequences = token_sequences(model)
        self.configure()
        self.states: list[TokenState] = []
        self.hooks: list[tuple[TokenBlock, TokenHook]] = []
        for blocks in self.sequences:
            state = TokenState(prop_attn=self.prop_attn, trace_source=bool(self.params.get("trace_source", False)))
            self.states.append(state)
            for i, block in enumerate(blocks):
                self.hooks.append((block, self.make_hook(state, i, len(blocks))))

    # --- for subclasses ---
    def configure(self) -> None:
        """Validate ``self.params`` against ``self.sequences`` (raise ValueError naming the parameter)."""

    def make_hook(self, state: TokenState, index: int, num_blocks: int) -> TokenHook:
        return TokenHook(state, index, num_blocks)

    training_loss: Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def on_train_step(self, progress: float) -> None:
        """Called by ``train.fit`` after every optimiser step with the fraction of training done."""

    # --- install / remove ---
    def install(self) -> TokenReduction:
        ref = next(self.model.parameters(), None)
        for block, hook in self.hooks:
            if ref is not None:
                hook.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
            block.token_hook = hook
        self.model.token_reduction = self
        self.model.forward_intermediates = _no_intermediates(self)
        return self

    def remove(self) -> None:
        """Undo ``apply``: every block runs as before, the model's state dict is its own again."""
        for block, hook in self.hooks:
            if block.token_hook is hook:
                block.token_hook = None
        if getattr(self.model, "token_reduction", None) is self:
            self.model.token_reduction = None
            vars(self.model).pop("forward_intermediates", None)

    # --- what a user reads back ---
    @property
    def spec(self) -> str:
        """The method and the parameters given, as ``visionzoo train --tokens`` takes them."""
        args = ",".join(f"{k}={_fmt(v)}" for k, v in self.given.items())
        return f"{self.name}:{args}" if args else self.name

    def token_counts(self, per_image: bool = False) -> list[int] | Tensor:
        """Tokens of the first sequence in the last forward pass: before the first block, then after each block.

        ``per_image=True`` gives a ``(B, blocks + 1)`` tensor of each image's real tokens (ATS varies them); by
        default a list of the sequence lengths (the longest image, padding included).
        """
        state = self.states[0]
        counts = state.counts
        if not counts:
            raise ArgumentError(f"{self.name}: no forward pass has run since apply(); call the model first")
        if not per_image:
            return [int(c) if isinstance(c, int) else int(c.max()) for c in counts]
        ref = next((c for c in counts if not isinstance(c, int)), None)
        if ref is None:
            return torch.tensor([counts]).expand(state.batch, -1)
        return torch.stack([c if not isinstance(c, int) else torch.full_like(ref, c) for c in counts], dim=1)

    @property
    def source(self) -> Tensor | None:
        """``(B, N, N0)``: which input tokens each final token holds (apply with ``trace_source=True``)."""
        return self.states[0].source

    def __repr__(self) -> str:
        n = sum(len(s) for s in self.sequences)
        return f"TokenReduction({self.spec!r} on {getattr(self.model, 'name', type(self.model).__name__)}, {n} blocks)"


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        inner = ",".join(_fmt(x) for x in v)
        return f"[{inner}]" if isinstance(v, list) else f"({inner})"
    return repr(v) if isinstance(v, str) else str(v)


def _no_intermediates(handle: TokenReduction) -> Callable:
    def forward_intermediates(*args: Any, **kwargs: Any) -> list[Tensor]:
        raise ArgumentError(f"{getattr(handle.model, 'name', 'model')}: forward_intermediates returns token maps, and "
                         f"{handle.spec} merges or drops tokens so they no longer form a map; call "
                         f"visionzoo.tokens.remove(model) first")
    return forward_intermediates


def keep_count(keep: float, n: int) -> int:
    """``ceil(keep * n)``, as EViT counts kept tokens."""
    return min(n, math.ceil(keep * n))
