"""Structured pruning (channels of ConvNets, heads and MLP widths of ViTs and hybrids) and 2:4 sparsity.

Our own engine finds what can be removed from one forward pass of any family, with no per-family code:

- **channel groups**: a conv or linear whose output tensor flows, through modules only (parameter-free
  shape-preserving ones such as activations and dropout, BatchNorm, depthwise convs), into exactly one other conv
  or linear: an MLP's hidden width, a bottleneck's inner channels. Its output rows, the BatchNorm/depthwise
  channels on the way and the consumer's input columns go together.
- **head groups**: every ``AttentionCore`` (the attention seam) whose owner has ``num_heads``. Which output channels
  of which conv/linear become head ``j`` of q, k and v, and which input channels of which conv/linear read head
  ``j`` of the output, are found by probing: the tool replaces a layer's output by its channel indices and reads
  where they arrive (reshapes, permutes and splits move values without changing them). Parameters with a head axis
  that reach the attention bias (relative-position tables) are found the same way.

Every group is then checked: the pruned model must give the same output as the unpruned one with the removed
channels zeroed (OTOv2's zero-invariant groups); a group that fails is left alone. What stays unpruned is the
residual stream (embedding widths), which every block shares: ``engine="torch-pruning"`` (Torch-Pruning's
DepGraph, MIT, ``pip install torch-pruning``) prunes that too, as its ViT example does, where it handles the
family. Importance: ``magnitude`` (L2 norm of the group's weights) or ``taylor`` (|w * dL/dw| summed over the
group, Molchanov et al. 2019), uniform ``ratio`` per group.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.compress.groups import _BN, PruneGroup, _is_depthwise, find_groups
from visionzoo.errors import ArgumentError

__all__ = ["PruneGroup", "PruneResult", "find_groups", "prune", "semi_structured_2_4", "sparsity"]

IMPORTANCES = ("magnitude", "taylor")
ENGINES = ("visionzoo", "torch-pruning")
# --- importance ------------------------------------------------------------------------------------------------
def _unit_score(model: nn.Module, g: PruneGroup, grads: bool) -> Tensor:
    mods = dict(model.named_modules())
    params = dict(model.named_parameters())
    score = torch.zeros(g.units, dtype=torch.float64)

    def term(w: Tensor) -> Tensor:
        if grads:
            if w.grad is None:
                return torch.zeros_like(w, dtype=torch.double)
            return (w.detach() * w.grad).abs().double()
        return w.detach().double().pow(2)

    for names, dim_of in ((g.producers, lambda m: 0), (g.consumers, lambda m: 1)):
        for n, units in names:
            m = mods[n]
            t = term(m.weight).movedim(dim_of(m), 0).reshape(m.weight.shape[dim_of(m)], -1).sum(1)
            if dim_of(m) == 0 and m.bias is not None:
                t = t + term(m.bias)
            for j, chans in units.items():
                score[j] += t[chans].sum()
    for n in g.through:
        m = mods[n]
        for w in (m.weight, m.bias):
            if w is not None:
                t = term(w).reshape(w.shape[0], -1).sum(1)
                for j, chans in g.producers[0][1].items():
                    score[j] += t[chans].sum()
    for pname, axis in g.params:
        t = term(params[pname]).movedim(axis, 0).reshape(g.units, -1).sum(1)
        score += t
    return score if grads else score.sqrt()


def _taylor_grads(model: nn.Module, calib: list[Tensor], labels: list[Tensor] | None) -> None:
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for i, x in enumerate(calib):
            logits = model(x)
            y = labels[i] if labels is not None else logits.argmax(-1).detach()
            F.cross_entropy(logits, y).backward()


# --- surgery ---------------------------------------------------------------------------------------------------
def _select(p: nn.Parameter | Tensor | None, axis: int, idx: Tensor) -> None:
    if p is None:
        return
    p.data = p.data.index_select(axis, idx.to(p.device)).contiguous()
    if isinstance(p, nn.Parameter) and p.grad is not None:
        p.grad = None


def _prune_out(m: nn.Module, idx: Tensor) -> None:
    if isinstance(m, _BN):
        for t in (m.weight, m.bias, m.running_mean, m.running_var):
            _select(t, 0, idx)
        m.num_features = len(idx)
        return
    _select(m.weight, 0, idx)
    _select(m.bias, 0, idx)
    if isinstance(m, nn.Linear):
        m.out_features = len(idx)
    else:
        m.out_channels = len(idx)
        if _is_depthwise(m):
            m.in_channels = m.groups = len(idx)


def _prune_in(m: nn.Module, idx: Tensor) -> None:
    _select(m.weight, 1, idx)
    if isinstance(m, nn.Linear):
        m.in_features = len(idx)
    else:
        m.in_channels = len(idx)


def _apply(model: nn.Module, g: PruneGroup, keep: list[int]) -> None:
    mods = dict(model.named_modules())
    params = dict(model.named_parameters())
    keep_t = torch.tensor(sorted(keep))
    for names, fn in ((g.producers, _prune_out), (g.consumers, _prune_in)):
        for n, units in names:
            m = mods[n]
            size = m.weight.shape[0 if fn is _prune_out else 1]
            dropped = {c for j, chans in units.items() if j not in keep for c in chans}
            fn(m, torch.tensor([c for c in range(size) if c not in dropped]))
    chans = torch.tensor(sorted(c for j in keep for c in g.producers[0][1][j]))
    for n in g.through:
        _prune_out(mods[n], chans)
    for pname, axis in g.params:
        _select(params[pname], axis, keep_t)
    if g.owner is not None and g.attr:
        setattr(mods[g.owner], g.attr, len(keep))


def _zero(model: nn.Module, g: PruneGroup, drop: list[int]) -> None:
    """Zero what ``drop`` removes, so an unpruned copy computes what the pruned model should."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        if g.kind == "heads":  # a head whose v rows are zero outputs zero (q, k then do not matter)
            for n, units in g.consumers:
                cols = [c for j in drop for c in units[j]]
                mods[n].weight[:, cols] = 0
            return
        for n, units in g.producers:
            rows = [c for j in drop for c in units[j]]
            mods[n].weight[rows] = 0
            if mods[n].bias is not None:
                mods[n].bias[rows] = 0
        for n in g.through:
            m = mods[n]
            rows = [c for j in drop for c in g.producers[0][1][j]]
            if isinstance(m, _BN):
                m.running_mean[rows] = 0
                m.running_var[rows] = 1
            for t in (m.weight, m.bias):
                if t is not None:
                    t[rows] = 0
        for n, units in g.consumers:
            mods[n].weight[:, [c for j in drop for c in units[j]]] = 0


@dataclass
class PruneResult:
    """What ``prune`` did: groups pruned (name -> units kept of units), and groups it left alone and why."""

    pruned: dict[str, tuple[int, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    engine: str = "visionzoo"


def prune(model: nn.Module, ratio: float, *, importance: str = "magnitude",
          calib: Tensor | Iterable[Tensor] | None = None, labels: Iterable[Tensor] | None = None, heads: bool = True,
          channels: bool = True, engine: str = "visionzoo", example: Tensor | None = None, inplace: bool = False,
          check: bool = True) -> nn.Module:
    """A structurally pruned copy of ``model``: ``ratio`` of every prunable group's units removed (at least one kept).

    ``importance``: ``magnitude`` or ``taylor`` (needs ``calib`` images; ``labels`` or the model's own predictions).
    ``engine``: ``visionzoo`` (ours; internal widths: heads, MLP widths, inner channels) or ``torch-pruning``
    (DepGraph; also embedding widths). ``example``: one input for the discovery pass (the model's input size when
    ``None``). The result has ``prune_result`` (a ``PruneResult``); save it with ``visionzoo.compress.save``.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ArgumentError(f"prune ratio must be a number in [0, 1), got {ratio!r}")
    if importance not in IMPORTANCES:
        raise ArgumentError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if engine not in ENGINES:
        raise ArgumentError(f"engine must be one of {ENGINES}, got {engine!r}")
    batches = None
    if calib is not None:
        from visionzoo.compress.quantize import _batches

        batches = _batches(calib)
    if importance == "taylor" and batches is None:
        raise ArgumentError("importance='taylor' needs calibration images (calib=...)")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    x = example if example is not None else _example(model)
    if engine == "torch-pruning":
        from visionzoo.compress.tp import prune_with_torch_pruning

        return prune_with_torch_pruning(model, ratio, importance, batches, labels, x)
    groups = find_groups(model, x, heads=heads, channels=channels)
    if batches is not None and importance == "taylor":
        _taylor_grads(model, batches, list(labels) if labels is not None else None)
    plan = []
    for g in groups:
        score = _unit_score(model, g, grads=importance == "taylor")
        n_drop = min(int(round(ratio * g.units)), g.units - 1)
        order = torch.argsort(score, stable=True).tolist()
        drop = sorted(order[:n_drop])
        plan.append((g, drop))
    model.zero_grad(set_to_none=True)
    result = PruneResult()
    if check:
        plan = _checked(model, plan, x, result)
    for g, drop in plan:
        if drop:
            _apply(model, g, [j for j in range(g.units) if j not in drop])
        result.pruned[g.name] = (g.units - len(drop), g.units)
    model.prune_result = result
    return model


def _checked(model: nn.Module, plan: list, x: Tensor, result: PruneResult) -> list:
    """The plan minus groups whose pruning does not match zeroing (their discovery missed a user of the channels)."""
    def ok(part: list) -> bool:
        zeroed, pruned = copy.deepcopy(model), copy.deepcopy(model)
        for g, drop in part:
            if drop:
                _zero(zeroed, g, drop)
                _apply(pruned, g, [j for j in range(g.units) if j not in drop])
        try:
            with torch.no_grad():
                a, b = zeroed(x), pruned(x)
        except Exception:  # noqa: BLE001  (a shape error: a user of the channels was missed)
            return False
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + a.abs().max().item()))

    active = [(g, d) for g, d in plan if d]
    if not active or ok(active):
        return plan
    good = []
    for g, d in active:
        if ok([(g, d)]):
            good.append((g, d))
        else:
            result.skipped[g.name] = ("the pruned model fails or differs from the model with those channels zeroed: "
                                      "the family uses these channels elsewhere (e.g. a reshape to the input width)")
    return good + [(g, d) for g, d in plan if not d]


def _example(model: nn.Module) -> Tensor:
    size = getattr(model, "data_config", {}).get("input_size", (3, 224, 224))
    ref = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, *size, generator=g).to(ref.device, ref.dtype)


# --- 2:4 semi-structured sparsity (LPViT) --------------------------------------------------------------------------
@torch.no_grad()
def semi_structured_2_4(model: nn.Module, inplace: bool = False, skip: Iterable[str] = ()) -> nn.Module:
    """Zero the 2 smallest-magnitude weights of every 4 consecutive input weights of each linear (and 1x1 conv), the
    2:4 pattern sparse tensor cores accelerate; a simulation (the zeros stay stored). LPViT's block-sparse Taylor
    ranking is replaced by magnitude within each group of four, the pattern NVIDIA's ASP uses."""
    if not inplace:
        model = copy.deepcopy(model)
    skip = set(skip)
    for name, m in model.named_modules():
        if name in skip or not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        w = m.weight.data
        if isinstance(m, nn.Conv2d) and (m.kernel_size != (1, 1) or m.groups != 1):
            continue
        flat = w.reshape(w.shape[0], -1)
        if flat.shape[1] % 4:
            continue
        groups = flat.reshape(flat.shape[0], -1, 4)
        idx = groups.abs().argsort(-1)[..., :2]
        groups.scatter_(-1, idx, 0.0)
        m.weight.data = groups.reshape(w.shape)
    return model


def sparsity(model: nn.Module) -> tuple[int, int]:
    """``(nonzero, total)`` parameters of ``model`` (2:4 leaves half of the pruned weights non-zero)."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    return nonzero, total
