"""Optimisers: parameter groups (no weight decay, layer-wise lr decay), AdamW / SGD, and SAM.

SAM is "Sharpness-Aware Minimization for Efficiently Improving Generalization" (Foret et al., 2021,
https://arxiv.org/abs/2010.01412), the optimiser "When Vision Transformers Outperform ResNets without
Pre-training or Strong Data Augmentations" (Chen et al., 2022, https://arxiv.org/abs/2106.01548) trains ViTs
with. Layer ids for lr decay are read from the model contract (``stage_info`` module paths), so one function
serves every family.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.errors import ArgumentError

__all__ = ["SAM", "TrAct", "create_optimizer", "layer_ids", "param_groups"]

OPTIMIZERS = ("adamw", "sgd")


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """A layer id per parameter name, and the number of ids.

    The stem (everything registered before the first stage: ``stem``, ``conv1``, ``patch_embed``, tokens,
    position tables) is 0; the j-th block of the stages, counted across stages, is ``1 + j`` (a stage's
    downsample goes with its first block); everything after the last stage (final norm, head) is the last id.
    Stages are the ``stage_info`` module paths of the contract (``stages.i``, ``layers.i``, ``layer1``,
    ``blocks.i``); a block is the first numbered child inside a stage.
    """
    model = _unwrap(model)
    infos = getattr(model, "stage_info", None) or getattr(model, "feature_info", None)
    if not infos:
        raise ArgumentError(f"layer_ids: {type(model).__name__} has no stage_info/feature_info to read stages from")
    stages = [f.module for f in infos]
    names = [n for n, _ in model.named_parameters()]
    blocks_in: list[int] = [1] * len(stages)
    place: dict[str, tuple[int, int]] = {}
    for n in names:
        for s, prefix in enumerate(stages):
            if n.startswith(prefix + "."):
                m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", n[len(prefix) + 1:])
                j = int(m.group(1)) if m else 0
                place[n] = (s, j)
                blocks_in[s] = max(blocks_in[s], j + 1)
                break
    if not place:
        raise ArgumentError(f"layer_ids: no parameter of {type(model).__name__} lies under its stages {stages}")
    offset = [1 + sum(blocks_in[:s]) for s in range(len(stages))]
    last = 1 + sum(blocks_in)
    ids: dict[str, int] = {}
    seen_stage = False
    for n in names:  # registration order: the stem comes before the stages, the head after them
        if n in place:
            s, j = place[n]
            ids[n] = offset[s] + j
            seen_stage = True
        else:
            ids[n] = last if seen_stage else 0
    return ids, last + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 no_decay_1d: bool = True) -> list[dict[str, Any]]:
    """Parameter groups: no weight decay for ``model.no_weight_decay()`` names (and biases / norm weights when
    ``no_decay_1d``), and ``lr_scale = layer_decay ** (num_layers - 1 - layer_id)`` when ``layer_decay`` is set.

    Schedulers multiply each group's lr by its ``lr_scale``.
    """
    model = _unwrap(model)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ArgumentError(f"layer_decay must be in (0, 1], got {layer_decay}")
    ids, n_layers = layer_ids(model) if layer_decay is not None else ({}, 1)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = n in skip or (no_decay_1d and p.ndim <= 1)
        lid = ids.get(n, n_layers - 1)
        g = groups.setdefault((lid, no_wd), {
            "params": [], "names": [], "weight_decay": 0.0 if no_wd else weight_decay, "layer_id": lid,
            "lr_scale": layer_decay ** (n_layers - 1 - lid) if layer_decay is not None else 1.0})
        g["params"].append(p)
        g["names"].append(n)
    return [groups[k] for k in sorted(groups)]


class SAM:
    """Sharpness-aware minimisation around a base optimiser: ascend to ``w + rho g / |g|``, take the gradient
    there, come back to ``w`` and let the base optimiser step with it.

    Use ``first_step()`` after the first backward and ``second_step()`` after the second, or ``step(closure)``
    with a closure that zeroes the grads, runs forward and backward and returns the loss. ``param_groups``
    and the state are the base optimiser's, so schedulers and checkpoints see one optimiser.
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False) -> None:
        if rho <= 0:
            raise ArgumentError(f"SAM: rho must be > 0, got {rho}")
        self.base, self.rho, self.adaptive = base, rho, adaptive
        self.param_groups = base.param_groups
        self._e: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def _grad_norm(self) -> Tensor:
        norms = [((p.abs() if self.adaptive else 1.0) * p.grad).norm(2) for g in self.param_groups for p in g["params"]
                 if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms), 2) if norms else torch.zeros(())

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        scale = self.rho / (self._grad_norm() + 1e-12)
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                e = (p.pow(2) if self.adaptive else 1.0) * p.grad * scale.to(p)
                p.add_(e)
                self._e[p] = e
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        for p, e in self._e.items():
            p.sub_(e)
        self._e = {}
        self.base.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        loss = closure()
        self.first_step()
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state)


def create_optimizer(model: nn.Module | Iterable[dict[str, Any]], opt: str = "adamw", lr: float = 1e-3,
                     weight_decay: float = 0.05, momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999),
                     layer_decay: float | None = None, sam: bool = False, sam_rho: float = 0.05
                     ) -> torch.optim.Optimizer | SAM:
    """AdamW or SGD (Nesterov) over ``param_groups(model, ...)``, wrapped in ``SAM`` when ``sam=True``."""
    if opt not in OPTIMIZERS:
        raise ArgumentError(f"opt must be one of {OPTIMIZERS}, got {opt!r}")
    if lr <= 0:
        raise ArgumentError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ArgumentError(f"weight_decay must be >= 0, got {weight_decay}")
    groups = param_groups(model, weight_decay, layer_decay) if isinstance(model, nn.Module) else list(model)
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g.setdefault("initial_lr", lr)
    if opt == "adamw":
        base = torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    else:
        base = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    return SAM(base, sam_rho) if sam else base


class TrAct:
    """TrAct's first-layer update as a gradient preconditioner: ``grad_W <- grad_W (A^T A / n + lambda I)^-1``.

    "TrAct: Making First-layer Pre-Activations Trainable" (Petersen et al., NeurIPS 2024,
    https://arxiv.org/abs/2410.23970; Felix-Petersen/tract, MIT): the step on the first layer's weights is the
    closed-form one that moves its activations (pre-activations) by the gradient step, so high-contrast images no
    longer dominate it. ``A`` holds the layer's input patches (rows: batch x output positions; columns: the
    ``in/groups x kh x kw`` inputs of one output, ``unfold``), gathered in training forwards since the last step;
    ``lambda=0.1`` is the paper's default. The layer is the model contract's ``first_conv`` (a Conv2d or Linear),
    so every family takes it. Call ``precondition()`` after the backward(s) and before the optimiser step.
    """

    def __init__(self, model: nn.Module, lam: float = 0.1) -> None:
        if lam <= 0:
            raise ArgumentError(f"tract: lambda must be > 0, got {lam}")
        model = _unwrap(model)
        path = getattr(model, "first_conv", None)
        try:
            layer = model.get_submodule(path) if path else None
        except AttributeError:
            layer = None
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or (isinstance(layer, nn.Conv2d) and layer.groups != 1):
            raise ArgumentError(f"tract: the model's first layer ({path!r}) must be a Conv2d without groups or a "
                                f"Linear, got {type(layer).__name__}")
        self.layer, self.lam = layer, lam
        self.gram: Tensor | None = None
        self.rows = self.rows_seen = 0
        self._handle = layer.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if not (module.training and torch.is_grad_enabled()):  # training forwards only
            return
        with torch.no_grad():
            self._accumulate(module, args[0].detach().float())

    def _accumulate(self, module: nn.Module, x: Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            padding = module.padding
            if module.padding_mode != "zeros":
                x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
                padding = 0
            elif isinstance(padding, str):
                padding = _same_padding(module)
            a = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)  # (B, k, L)
            a = a.transpose(1, 2).reshape(-1, a.shape[1])  # (B L, k)
        else:
            a = x.reshape(-1, x.shape[-1])
        g = a.t() @ a
        self.gram = g if self.gram is None else self.gram + g
        self.rows += a.shape[0]

    @torch.no_grad()
    def precondition(self) -> None:
        w, gram = self.layer.weight, self.gram
        self.gram, self.rows_seen, self.rows = None, self.rows, 0
        if w.grad is None or gram is None:  # a frozen first layer (e.g. PEFT): nothing to precondition
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rows = torch.tensor([float(self.rows_seen)], device=gram.device)
            torch.distributed.all_reduce(gram)
            torch.distributed.all_reduce(rows)
            n = float(rows)
        else:
            n = float(self.rows_seen)
        k = gram.shape[0]
        inv = torch.linalg.inv(gram / n + self.lam * torch.eye(k, device=gram.device, dtype=gram.dtype))
        g = w.grad.reshape(w.shape[0], -1).float() @ inv
        w.grad.copy_(g.reshape(w.shape).to(w.grad.dtype))

    def remove(self) -> None:
        self._handle.remove()


def _same_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if any(s != 1 for s in conv.stride):
        raise ArgumentError("tract: padding='same' with a stride is not supported")
    return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
