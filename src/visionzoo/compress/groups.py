"""Finding what structured pruning can remove, in one forward pass of any family (see ``prune``'s docstring):
channel groups by tracing which module consumes which tensor, head groups by probing the attention seam."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from visionzoo.layers import AttentionCore

__all__ = ["PruneGroup", "find_groups"]

_LAYERS = (nn.Linear, nn.Conv2d, nn.Conv1d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, _LAYERS) and (isinstance(m, nn.Linear) or m.groups == 1)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Conv1d)) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def _axis(m: nn.Module) -> int:
    return -1 if isinstance(m, nn.Linear) else 1


@dataclass
class PruneGroup:
    """Channels that are removed together.

    ``producers``: ``[(module name, {unit: [output channel indices]})]``; ``consumers``: the same for input
    channels; ``through``: per-channel modules in between (BatchNorm, depthwise conv), indexed like the producer;
    ``params``: ``[(parameter name, axis)]`` indexed by unit (heads); ``owner``/``attr``: an attribute to set to
    the number of units kept (``num_heads``).
    """

    kind: str  # "channels" or "heads"
    units: int
    producers: list[tuple[str, dict[int, list[int]]]]
    consumers: list[tuple[str, dict[int, list[int]]]]
    through: list[str] = field(default_factory=list)
    params: list[tuple[str, int]] = field(default_factory=list)
    owner: str | None = None
    attr: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.producers[0][0]}" if self.kind == "channels" else f"heads:{self.owner}"


# --- discovery -------------------------------------------------------------------------------------------------
class _Trace:
    """One forward pass: which module call produced and consumed which tensor."""

    def __init__(self, model: nn.Module, x: Tensor) -> None:
        self.calls: dict[str, int] = {}
        self.out: dict[str, int] = {}
        self.users: dict[int, list[str]] = {}
        self.same_shape: dict[str, bool] = {}
        keep: list[object] = []
        handles = []
        for name, m in model.named_modules():
            if name and not list(m.children()):
                handles.append(m.register_forward_hook(self._hook(name, keep)))
        try:
            with torch.enable_grad():  # eager-inference-only fast paths (chunked MLPs) stay out of the way
                model(x)
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str, keep: list):  # noqa: ANN202
        def hook(m: nn.Module, args: tuple, out: object) -> None:
            keep.append((args, out))
            self.calls[name] = self.calls.get(name, 0) + 1
            if args and isinstance(args[0], Tensor):
                self.users.setdefault(id(args[0]), []).append(name)
            if isinstance(out, Tensor):
                self.out[name] = id(out)
                self.same_shape[name] = bool(args) and isinstance(args[0], Tensor) and args[0].shape == out.shape
        return hook


def _channel_groups(model: nn.Module, trace: _Trace) -> list[PruneGroup]:
    mods = dict(model.named_modules())
    groups = []
    for name, m in mods.items():
        if not _is_layer(m) or trace.calls.get(name) != 1 or name not in trace.out:
            continue
        n = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        through: list[str] = []
        t = trace.out[name]
        while True:
            users = [u for u in trace.users.get(t, []) if trace.out.get(u) != t]  # identity modules pass t on
            if len(users) != 1 or trace.calls.get(users[0]) != 1:
                break
            u, um = users[0], mods[users[0]]
            if _is_layer(um):
                n_in = um.in_features if isinstance(um, nn.Linear) else um.in_channels
                if n_in == n and _axis(um) == _axis(m):
                    unit = {c: [c] for c in range(n)}
                    groups.append(PruneGroup("channels", n, [(name, unit)], [(u, unit)], through))
                break
            # parameter-free and shape-preserving (activations, dropout): elementwise unless the check says otherwise
            elementwise = trace.same_shape.get(u, False) and not any(True for _ in um.parameters()) \
                and not any(True for _ in um.buffers())
            if isinstance(um, _BN) and um.num_features == n or _is_depthwise(um) and um.out_channels == n \
                    or elementwise:
                if not elementwise:
                    through.append(u)
                t = trace.out.get(u)
                if t is None:
                    break
                continue
            break
    return groups


def _encode(shape: torch.Size, axis: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A tensor of ``shape`` holding ``index + 1`` along ``axis`` (the same value along every other axis)."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return (torch.arange(shape[axis], dtype=dtype, device=device) + 1).view(view).expand(shape).clone()


def _decode(t: Tensor, axes: tuple[int, ...], limit: int) -> Tensor | None:
    """If ``t`` holds one integer in 1..limit per index of ``axes`` (constant over the other axes), those minus 1."""
    moved = t.detach().movedim(axes, tuple(range(len(axes))))
    lead = moved.shape[:len(axes)]
    flat = moved.reshape(*lead, -1)
    first = flat[..., :1]
    if not torch.equal(flat, first.expand_as(flat)):
        return None
    vals = first[..., 0]
    if not torch.equal(vals, vals.round()) or vals.min() < 1 or vals.max() > limit:
        return None
    return vals.long() - 1


def _head_group(model: nn.Module, x: Tensor, core_name: str) -> PruneGroup | None:
    mods = dict(model.named_modules())
    owner_name = core_name.rpartition(".")[0]
    owner = mods[owner_name]
    h = getattr(owner, "num_heads", None)
    if not isinstance(h, int) or h < 2:
        return None
    core = mods[core_name]
    seen: dict[str, object] = {}

    def grab(m: nn.Module, args: tuple, kwargs: dict) -> None:
        if "qkv" not in seen:
            seen["qkv"] = args[:3]
            seen["bias"] = args[3] if len(args) > 3 else kwargs.get("bias")

    def run(extra: list) -> tuple:  # noqa: ANN001
        seen.clear()
        handles = [core.register_forward_pre_hook(grab, with_kwargs=True), *extra]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for hd in handles:
                hd.remove()
        return seen.get("qkv"), seen.get("bias")

    qkv, _ = run([])
    if qkv is None or any(t.ndim < 3 or t.shape[-3] != h for t in qkv):
        return None
    d = [t.shape[-1] for t in qkv]
    candidates = {n: m for n, m in owner.named_modules(prefix=owner_name) if _is_layer(m)}
    producers, covered = [], [set() for _ in range(3)]
    for n, m in candidates.items():
        size = m.out_features if isinstance(m, nn.Linear) else m.out_channels

        def replace(mod: nn.Module, args: tuple, out: Tensor, axis: int = _axis(m)) -> Tensor:
            return _encode(out.shape, axis, out.dtype, out.device)
        got, _ = run([m.register_forward_hook(replace)])
        if got is None:
            continue
        units: dict[int, list[int]] = {}
        for i, t in enumerate(got):
            idx = _decode(t, (-3, -1), size)  # (heads, d) -> producer channel
            if idx is None:
                continue
            covered[i].add(n)
            for j in range(h):
                units.setdefault(j, []).extend(idx[j].tolist())
        if units:
            producers.append((n, units))
    if not all(covered):
        return None
    # the consumer: the core's output replaced by (head, dim) indices
    out_probe: dict[str, Tensor] = {}

    def core_out(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
        moved = out.movedim(-3, 0)  # (..., h, N, d) -> (h, ..., N, d)
        code = (torch.arange(h, dtype=out.dtype, device=out.device).view(-1, *[1] * (moved.ndim - 1)) * out.shape[-1]
                + torch.arange(out.shape[-1], dtype=out.dtype, device=out.device) + 1)
        return code.expand(moved.shape).movedim(0, -3).contiguous()

    def reader(name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple) -> None:
            out_probe.setdefault(name, args[0])
        return hook
    run([core.register_forward_hook(core_out)] + [m.register_forward_pre_hook(reader(n))
                                                   for n, m in candidates.items()])
    consumers = []
    dv = d[2]
    for n, t in out_probe.items():
        m = candidates[n]
        size = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        if size != h * dv:
            continue
        idx = _decode(t, (_axis(m),), h * dv)
        if idx is None or sorted(idx.tolist()) != list(range(h * dv)):
            continue
        inv = torch.empty_like(idx)
        inv[idx] = torch.arange(len(idx))
        consumers.append((n, {j: inv[j * dv:(j + 1) * dv].tolist() for j in range(h)}))
    if len(consumers) != 1:
        return None
    # parameters with a head axis that reach the attention bias
    params = []
    for pname, p in owner.named_parameters(prefix=owner_name):
        mod_name = pname.rpartition(".")[0]
        if mod_name in candidates or h not in p.shape:
            continue
        for axis in [a for a, s in enumerate(p.shape) if s == h]:
            saved = p.data.clone()
            p.data.copy_(_encode(p.shape, axis, p.dtype, p.device))
            try:
                _, bias = run([])
            finally:
                p.data.copy_(saved)
            if bias is not None and bias.ndim >= 3 and bias.shape[-3] == h:
                got = _decode(bias, (-3,), h)
                if got is not None and torch.equal(got, torch.arange(h)):
                    params.append((pname, axis))
                    break
        else:
            return None  # a parameter sized like the heads that we cannot place: leave this attention alone
    return PruneGroup("heads", h, producers, consumers, [], params, owner_name, "num_heads")


def find_groups(model: nn.Module, x: Tensor, heads: bool = True, channels: bool = True) -> list[PruneGroup]:
    """The prunable groups of ``model`` (see the module docstring), found on example input ``x`` (one image)."""
    model.eval()
    groups = []
    if channels:
        groups += _channel_groups(model, _Trace(model, x))
    if heads:
        for name, m in model.named_modules():
            if isinstance(m, AttentionCore):
                g = _head_group(model, x, name)
                if g is not None:
                    groups.append(g)
    # a layer in two groups (e.g. a head group's producer that is also a channel group's producer) keeps only the
    # head group: heads first, then the channel groups that touch none of their layers
    taken = {n for g in groups if g.kind == "heads" for n, _ in g.producers + g.consumers}
    return [g for g in groups if g.kind == "heads" or not ({n for n, _ in g.producers + g.consumers} & taken)]
