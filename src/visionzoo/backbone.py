"""The model contract: a ``Backbone`` base class with default ``forward_*`` implementations.

Most families are stem -> stages -> (norm) -> head. They set ``self.stem``, ``self.stages``,
``self.feature_info`` and call ``init_head``; everything else comes from here. Families with another
layout (timm's ResNet keys, ViT's tokens) override the small hooks below rather than the public methods.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from visionzoo.errors import ArgumentError
from visionzoo.layers import ClassifierHead, LayerType, fold_conv_bn_children, is_tracing


class FeatureInfo(NamedTuple):
    """One multi-scale output: its channels, its stride (reduction) and the module that produces it."""

    channels: int
    reduction: int
    module: str


class FeatureInfoList(list):
    """A list of ``FeatureInfo`` with timm-style accessors."""

    def channels(self) -> list[int]:
        return [f.channels for f in self]

    def reduction(self) -> list[int]:
        return [f.reduction for f in self]

    def module_name(self) -> list[str]:
        return [f.module for f in self]


def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Patch tokens ``(B, H*W, D)`` in row-major order -> a ``(B, D, H, W)`` map."""
    return tokens.reshape(tokens.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)


def resolve_indices(indices: int | list[int] | tuple[int, ...] | None, n: int, who: str = "model") -> list[int]:
    """Turn ``indices`` (None = all, an int = the last k, a sequence = those, negatives allowed) into sorted ints."""
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 1 <= indices <= n:
            raise ValueError(f"{who}: indices={indices} asks for the last {indices} of {n} stages; use 1..{n}")
        return list(range(n - indices, n))
    out = []
    for i in indices:
        if not isinstance(i, int) or not -n <= i < n:
            raise ValueError(f"{who}: out_indices entry {i!r} is out of range for {n} stages "
                             f"(valid: 0..{n - 1} or -{n}..-1)")
        out.append(i % n)
    if len(set(out)) != len(out):
        raise ValueError(f"{who}: out_indices {tuple(indices)} name the same stage twice")
    return sorted(out)


def is_idle(model: nn.Module, name: str) -> bool:
    """Whether submodule or parameter ``name`` of ``model`` lies in what ``model.idle_names()`` says does not run."""
    idle = model.idle_names() if hasattr(model, "idle_names") else []
    return any(name == n or name.startswith(n + ".") for n in idle)


def require_logits(model: nn.Module, what: str) -> None:
    """Raise an ``ArgumentError`` (a ValueError) naming ``what`` (a tool, a method) when ``model`` gives no class
    logits: an image-to-image model (``output == "image"``) has no classifier head."""
    output = getattr(model, "output", "logits")
    if output != "logits":
        name = getattr(model, "name", type(model).__name__)
        raise ArgumentError(f"{what}: {name} is an image-to-image model (output={output!r}); it has no classifier head "
                         f"and gives no class logits")


class Backbone(nn.Module):
    """Base class of every visionzoo model; see STYLE.md section 3 for the contract.

    Class attributes a family may set:
        kind: ``"convnet"``, ``"vit"`` or ``"hybrid"``.
        min_input_size, input_multiple: the smallest input side and the multiple every side must be.
        no_weight_decay_keys: parameter-name endings excluded from weight decay.
        position_keys: parameter-name endings of the absolute position tables (learned positions added to the
            tokens); ``position_tables()`` names them. Default ``("pos_embed",)``, the library's name for them.
        first_conv: state-dict prefix of the first conv (adapted when ``in_chans`` differs).
        cpu_channels_last: run on a channels-last (NHWC) copy of the input on CPU. oneDNN's convolutions are
            much faster on NHWC there (resnet50 eager at batch 32 on 2 cores: 14.7 -> 19.3 img/s); every later
            layer keeps that layout. Outputs have the same values and shapes, only their strides differ. A
            choice for eager runs only: it is skipped while tracing (bench and deploy set the layout up once).
        has_attention: the family computes softmax attention (through ``layers.AttentionCore``); ``False``
            declares that it has none, so attention tools refuse it with a reason.
        takes_img_size: the constructor takes ``img_size`` (position tables or windows built for one size);
            ``create_model`` then passes the variant's input size when the caller gives none.
        takes_patch_size: the constructor takes ``patch_size`` (training recipes set it for such families).
        output: what ``forward`` returns: ``"logits"`` (default; a classifier head at ``self.head``) or ``"image"``
            (an image-to-image model such as MAXIM: ``forward(x)`` is an image of ``x``'s shape, there is no head,
            ``num_classes`` is ignored and ``reset_classifier``/``get_classifier``/``forward_head`` refuse;
            ``forward_features`` and ``features_only`` still give NCHW maps). Tools that need logits check
            ``require_logits``.

    The seams every tool uses (STYLE.md section 3): attention through ``AttentionCore``; ``stage_modules()``
    returns registered modules named by ``stage_info``; one ``ClassifierHead`` at ``self.head``; ``fuse()``
    here, calling each submodule's ``fuse()``; nothing in ``forward`` branches on batch size, device or grad
    mode while tracing.
    """

    kind: str = "convnet"
    min_input_size: int = 32
    input_multiple: int = 32
    no_weight_decay_keys: tuple[str, ...] = ()
    position_keys: tuple[str, ...] = ("pos_embed",)
    first_conv: str = "stem.0"
    classifier: str = "head.fc"
    cpu_channels_last: bool = False
    cpu_channels_last_min_batch: int = 1
    has_attention: bool = False
    spiking: bool = False  # activations are hard thresholds (spikes): a small input change flips them
    takes_img_size: bool = False
    takes_patch_size: bool = False
    fixed_input_size: bool = False  # only the size it was built for runs (token-mixing MLPs over a fixed patch count)
    output: str = "logits"

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.num_classes = 0
        self.in_chans = 3
        self.num_features = 0
        self.head_hidden_size = 0
        self.out_indices: list[int] | None = None
        self.feature_info: FeatureInfoList = FeatureInfoList()
        self.stage_info: FeatureInfoList = FeatureInfoList()
        self.variant: tuple[str, dict] | None = None

    # --- construction helpers -------------------------------------------------------------------
    def set_feature_info(self, infos: list[FeatureInfo]) -> None:
        self.stage_info = FeatureInfoList(infos)
        self.feature_info = FeatureInfoList(infos)

    def init_head(self, num_features: int, num_classes: int, drop_rate: float = 0.0,
                  norm_layer: LayerType | None = None, pool_type: str = "avg", pre_logits: nn.Module | None = None,
                  hidden_size: int | None = None, prefix_tokens: int = 0, head: ClassifierHead | None = None
                  ) -> None:
        """Set ``num_features``, ``head_hidden_size``, ``num_classes`` and the one ``ClassifierHead`` at ``self.head``.

        ``pre_logits``/``hidden_size``: a head's hidden layer and its width (see ``ClassifierHead``). ``head``: a
        ready ``ClassifierHead`` subclass instance instead (e.g. DeiT's two-token head).
        """
        self.num_features = num_features
        self.num_classes = num_classes
        self.head = head if head is not None else ClassifierHead(
            num_features, num_classes, pool_type, drop_rate, norm_layer, pre_logits, hidden_size, prefix_tokens)
        self.classifier = tuple(f"head.{n}" for n in self.head.fc_names)
        if len(self.classifier) == 1:
            self.classifier = self.classifier[0]

    @property
    def head_hidden_size(self) -> int:
        """The width the classifier reads (``head.hidden_size``): ``num_features`` unless the head has a hidden
        layer; it follows the head through ``reset_classifier`` and ``fuse()``."""
        head = self._modules.get("head")
        return head.hidden_size if isinstance(head, ClassifierHead) else self._head_hidden_size

    @head_hidden_size.setter
    def head_hidden_size(self, value: int) -> None:
        self._head_hidden_size = value  # used only before a head exists

    @property
    def name(self) -> str:
        return self.variant[0] if self.variant else type(self).__name__

    # --- hooks a family may override --------------------------------------------------------------
    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def stage_modules(self) -> list[nn.Module]:
        return list(self.stages)

    def stage_to_nchw(self, x: Tensor) -> Tensor:
        """A stage's output as an NCHW map (families that keep NHWC or tokens inside convert here)."""
        return x

    def forward_norm(self, x: Tensor) -> Tensor:
        """The final norm on the last stage's output: NCHW for map families, tokens for token families."""
        return x

    # --- the contract -----------------------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        """Raise a ValueError that names the size and the allowed multiple when ``x`` does not fit.

        Skipped while tracing: a traced graph keeps no Python checks (they stay in eager mode)."""
        if is_tracing():
            return
        if x.ndim != 4:
            raise ValueError(f"{self.name}: expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"{self.name}: input has {x.shape[1]} channels but the model was built with "
                             f"in_chans={self.in_chans}; pass in_chans={x.shape[1]} to create_model")
        H, W = x.shape[-2:]
        m, lo = self.input_multiple, self.min_input_size
        if H < lo or W < lo or H % m or W % m:
            raise ValueError(f"{self.name}: input {H}x{W} must be at least {lo}x{lo} and a multiple of {m} "
                             f"on each side (the model's total stride); resize or pad, e.g. to "
                             f"{max(lo, -(-H // m) * m)}x{max(lo, -(-W // m) * m)}")

    def prepare_input(self, x: Tensor) -> Tensor:
        """Check ``x`` and, in eager mode, put it in the layout this family runs fastest in."""
        self.check_input(x)
        if is_tracing():
            return x
        if self.cpu_channels_last and x.device.type == "cpu" and x.shape[0] >= self.cpu_channels_last_min_batch:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def run_stage(self, stage: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.prepare_input(x)
        x = self.forward_stem(x)
        for stage in self.stage_modules():
            x = self.run_stage(stage, x)
        return self.forward_norm(x)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """NCHW outputs of the chosen stages (all when ``indices`` is None), before the final norm."""
        stages = self.stage_modules()
        idx = resolve_indices(indices, len(stages), self.name)
        x = self.prepare_input(x)
        x = self.forward_stem(x)
        outs = []
        for i, stage in enumerate(stages[:idx[-1] + 1]):
            x = self.run_stage(stage, x)
            if i in idx:
                outs.append(self.stage_to_nchw(x))
        return outs

    def token_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None,
                            to_map: Callable[[Any], Tensor]) -> list[Tensor]:
        """``forward_intermediates`` for families whose blocks pass a token sequence (plain ViTs): the stem, then
        the stages up to the last chosen one, each chosen stage's output given to ``to_map`` (the family's own
        tokens -> ``(B, D, H, W)``: which tokens are the patch grid is the family's)."""
        stages = self.stage_modules()
        idx = resolve_indices(indices, len(stages), self.name)
        self.check_input(x)
        x = self.forward_stem(x)
        outs = []
        for i, stage in enumerate(stages[:idx[-1] + 1]):
            x = self.run_stage(stage, x)
            if i in idx:
                outs.append(to_map(x))
        return outs

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        self.require_logits("forward_head")
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.out_indices is not None:
            return self.forward_intermediates(x, self.out_indices)
        return self.forward_head(self.forward_features(x))

    def require_logits(self, what: str) -> None:
        """Raise a ValueError naming ``what`` when this model gives no class logits (``output != "logits"``)."""
        require_logits(self, what)

    def get_classifier(self) -> nn.Module:
        self.require_logits("get_classifier")
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one of ``num_classes`` outputs (0 = none), on the model's device and
        in its dtype, with the library's init; the rest of the state dict is unchanged."""
        if num_classes < 0:
            raise ValueError(f"{self.name}: num_classes must be >= 0, got {num_classes}")
        self.require_logits("reset_classifier")
        ref = next(self.parameters(), None)
        like = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        self.head.reset(num_classes, **like)
        self.num_classes = num_classes

    def set_features_only(self, out_indices: int | list[int] | tuple[int, ...] | None = None) -> None:
        """Make ``forward`` return the list of NCHW maps of ``out_indices`` and drop the classifier."""
        idx = resolve_indices(out_indices, len(self.stage_modules()), self.name)
        self.out_indices = idx
        self.feature_info = FeatureInfoList(self.stage_info[i] for i in idx)
        if self.output == "logits":
            self.reset_classifier(0)

    def idle_names(self) -> list[str]:
        """Dotted names of the submodules and parameters that the current configuration does not run (the other
        routes of a supernet such as SN-Net); empty for a fixed network. Tools leave them out (quantization, token
        reduction), and a backward pass gives them no gradient (``is_idle``)."""
        return []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that should get no weight decay (position tables, tokens, bias tables)."""
        keys = self.no_weight_decay_keys
        return {n for n, _ in self.named_parameters() if keys and n.rsplit(".", 1)[-1] in keys}

    def position_tables(self) -> list[str]:
        """Names of the absolute position tables (parameters whose name ends in one of ``position_keys``); empty for a
        model that has none (relative bias tables and fixed sin-cos buffers are not among them)."""
        keys = self.position_keys
        return [n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in keys]

    def fuse(self) -> Backbone:
        """Re-parameterise for inference, in place; returns ``self``.

        Walks the submodules bottom-up (children before parents). At each one it folds BatchNorms into the convs
        before them (adjacent ``nn.Sequential`` children, and the pairs a module lists in ``fuse_pairs``), then
        calls the module's own ``fuse()`` if it has one, which so sees its children already fused. Families add
        branch merges and the like only as ``fuse()`` methods of their blocks, never here.
        """
        for m in reversed(list(self.modules())):
            fold_conv_bn_children(m)
            if m is not self and not isinstance(m, Backbone) and callable(getattr(m, "fuse", None)):
                m.fuse()
        return self

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fit a checkpoint in our key layout to this instance (e.g. resize position tables); default: as is."""
        return state_dict
