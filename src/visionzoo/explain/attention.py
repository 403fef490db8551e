"""Attention maps from any family, through the attention seam (``layers.AttentionCore``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from visionzoo.errors import ArgumentError
from visionzoo.layers import AttentionCore


@dataclass
class AttentionMap:
    """One attention call's probabilities and what maps them back to the image.

    Attributes:
        name: the module path of the ``AttentionCore`` (its parent is the attention block).
        probs: ``(B', heads, N_q, N_k)``; ``B'`` is the batch times the number of windows for windowed
            attention (and may carry more leading dims for per-query key sets).
        grid: the ``(H, W)`` layout of the non-prefix queries: the window for windowed attention, the token
            grid otherwise (inferred from the input size when the block did not say).
        prefix_tokens: class/distillation tokens ahead of the patch tokens among the queries.
        batch: the batch size of the model's input (``B' / batch`` windows per image).
        image_size: the ``(H, W)`` of the model's input.
        partition, shift: how windows tile the token map (``AttentionCore.partition`` / ``.shift``).
        unfold: ``(kernel, stride, padding)`` when the windows are overlapping ``kernel x kernel`` neighbourhoods,
            one per ``stride`` step (``AttentionCore.unfold``, VOLO's outlook attention); ``None`` otherwise.
    """

    name: str
    probs: Tensor
    grid: tuple[int, int] | None
    prefix_tokens: int
    batch: int | None = None
    image_size: tuple[int, int] | None = None
    partition: str = "block"
    shift: tuple[int, int] = (0, 0)
    unfold: tuple[int, int, int] | None = None

    @property
    def heads(self) -> int:
        return self.probs.shape[-3]

    @property
    def windows(self) -> int:
        """Attention calls per image: 1 for global attention, the number of windows (rows, stripes) otherwise."""
        lead = self.probs.numel() // (self.probs.shape[-3] * self.probs.shape[-2] * self.probs.shape[-1])
        return lead // self.batch if self.batch else lead

    @property
    def self_attention(self) -> bool:
        """Keys are the queries (``N_k == N_q``), as in global and windowed self-attention."""
        return self.probs.shape[-1] == self.probs.shape[-2]


class AttentionRecorder:
    """Collects an ``AttentionMap`` for every attention call while active; see ``record_attention``."""

    def __init__(self, model: nn.Module, detach: bool = True) -> None:
        self.model = model
        self.detach = detach
        self.maps: list[AttentionMap] = []
        self._input_hw: tuple[int, int] | None = None
        self._batch: int | None = None
        self._cores = [(n, m) for n, m in model.named_modules() if isinstance(m, AttentionCore)]
        if not self._cores:
            name = getattr(model, "name", type(model).__name__)
            raise ArgumentError(f"{name} has no softmax attention (it declares has_attention=False), so there are no "
                             f"attention maps to record; use a CAM method (visionzoo.explain) for this model")
        self._handle = None

    def __enter__(self) -> AttentionRecorder:
        for name, core in self._cores:
            core.observer = self._observer(name)
        self._handle = self.model.register_forward_pre_hook(self._remember_input)
        return self

    def __exit__(self, *exc: object) -> None:
        for _, core in self._cores:
            core.observer = None
        if self._handle is not None:
            self._handle.remove()

    def clear(self) -> None:
        self.maps.clear()

    def _remember_input(self, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor) and args[0].ndim == 4:
            self._input_hw = tuple(args[0].shape[-2:])
            self._batch = args[0].shape[0]

    def _observer(self, name: str):  # noqa: ANN202
        def observe(core: AttentionCore, probs: Tensor, grid: tuple[int, int] | None) -> None:
            if grid is None:
                grid = self._infer_grid(probs.shape[-2] - core.prefix_tokens)
            self.maps.append(AttentionMap(name, probs.detach() if self.detach else probs,
                                          None if grid is None else (int(grid[0]), int(grid[1])), core.prefix_tokens,
                                          self._batch, self._input_hw, getattr(core, "partition", "block"),
                                          tuple(getattr(core, "shift", (0, 0))), getattr(core, "unfold", None)))
        return observe

    def _infer_grid(self, n: int) -> tuple[int, int] | None:
        """The ``(H, W)`` token grid of ``n`` tokens covering the input image at one stride, if there is one."""
        if self._input_hw is None or n <= 0:
            return None
        H, W = self._input_hw
        stride = math.sqrt(H * W / n)
        for s in (math.floor(stride), math.ceil(stride)):
            if s > 0 and math.ceil(H / s) * math.ceil(W / s) == n:
                return math.ceil(H / s), math.ceil(W / s)
        return None


def record_attention(model: nn.Module, detach: bool = True) -> AttentionRecorder:
    """``with record_attention(model) as rec: model(x)``; then ``rec.maps`` lists an ``AttentionMap`` per call.

    Recording switches every attention to the explicit softmax path, which gives the same output as the
    fused kernel (to float rounding). ``detach=False`` keeps the maps in the autograd graph.
    """
    return AttentionRecorder(model, detach)


# --- from recorded calls back to the image ---------------------------------------------------------------------
def _strides(reduction: int | None) -> list[int]:
    out = [reduction] if reduction else []
    return out + [s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s != reduction]


def token_layout(amap: AttentionMap, reduction: int | None = None) -> tuple[int, int, int, int]:
    """``(Ht, Wt, nWh, nWw)``: the token map a call's queries cover and how many windows tile it per side.

    Global attention (one call per image) covers its ``grid``. Windowed calls cover the map at the stride whose
    windows (``grid``-sized, padded at the bottom/right) number ``amap.windows``; ``reduction`` (the stage's, from
    ``stage_info``) is tried first.
    """
    if amap.grid is None:
        raise ArgumentError(f"{amap.name}: the attention call did not say its query grid, and none could be inferred")
    gh, gw = amap.grid
    nW = amap.windows
    if nW == 1 and gh * gw == 0 and key_grid(amap) is not None:  # class attention: the keys give the map
        return (*key_grid(amap), 1, 1)
    if nW == 1:
        return gh, gw, 1, 1
    if amap.image_size is None or amap.batch is None:
        raise ArgumentError(f"{amap.name}: a windowed call ({nW} calls) recorded without the input size; record "
                            f"it with "
                         f"record_attention(model) around model(x)")
    H, W = amap.image_size
    step = (gh, gw) if amap.unfold is None else (amap.unfold[1],) * 2  # overlapping windows: one per stride step
    for s in _strides(reduction):
        Ht, Wt = -(-H // s), -(-W // s)
        nWh, nWw = -(-Ht // step[0]), -(-Wt // step[1])
        if nWh * nWw == nW:
            return Ht, Wt, nWh, nWw
    raise ArgumentError(f"{amap.name}: {nW} windows of {gh}x{gw} tile no token map of a {H}x{W} input at any stride; "
                     f"the call's batch dims are not batch x windows")


def place_windows(values: Tensor, amap: AttentionMap, reduction: int | None = None) -> Tensor:
    """Per-query values ``(B', heads, gh * gw)`` of windowed (or global) calls -> ``(B, heads, Ht, Wt)`` on the map.

    Windows are put back by the core's ``partition`` (``"block"`` or ``"grid"``), padding is cropped, and the
    cyclic ``shift`` is undone.
    """
    Ht, Wt, nWh, nWw = token_layout(amap, reduction)
    gh, gw = amap.grid
    heads = values.shape[-2]
    if amap.unfold is not None:  # overlapping windows: fold back, each token the mean over the windows holding it
        k, stride, pad = amap.unfold
        v = values.reshape(-1, nWh * nWw, heads * gh * gw).transpose(1, 2)  # -> (B, h * k * k, windows)
        fold = dict(output_size=(Ht, Wt), kernel_size=k, padding=pad, stride=stride)
        count = torch.nn.functional.fold(torch.ones_like(v[:1, : gh * gw]), **fold)  # (1, 1, Ht, Wt)
        return torch.nn.functional.fold(v, **fold) / count.clamp_min(1)
    v = values.reshape(-1, nWh, nWw, heads, gh, gw)  # (B * nW, h, N) -> (B, nWh, nWw, h, gh, gw)
    if amap.partition == "grid":  # token (a, b) of group (p, q) sits at (a * nWh + p, b * nWw + q)
        v = v.permute(0, 3, 4, 1, 5, 2).reshape(-1, heads, gh * nWh, gw * nWw)
    elif amap.partition == "block":
        v = v.permute(0, 3, 1, 4, 2, 5).reshape(-1, heads, nWh * gh, nWw * gw)  # -> (B, h, Hp, Wp)
    else:
        raise ArgumentError(f"{amap.name}: AttentionCore.partition must be 'block' or 'grid', got {amap.partition!r}")
    v = v[..., :Ht, :Wt]
    if any(amap.shift):
        v = torch.roll(v, shifts=tuple(amap.shift), dims=(-2, -1))
    return v


def key_grid(amap: AttentionMap) -> tuple[int, int] | None:
    """The ``(h, w)`` grid of the non-prefix keys when they cover the whole input at one stride (global calls)."""
    n = amap.probs.shape[-1] - amap.prefix_tokens
    if amap.windows != 1 or amap.image_size is None or n <= 0:
        return None
    if amap.self_attention:
        return amap.grid
    H, W = amap.image_size
    stride = math.sqrt(H * W / n)
    for s in sorted({math.floor(stride), math.ceil(stride), round(stride)}):
        if s > 0 and math.ceil(H / s) * math.ceil(W / s) == n:
            return math.ceil(H / s), math.ceil(W / s)
    return None


MAP_KINDS = ("auto", "cls", "received", "entropy")


def head_maps(amap: AttentionMap, kind: str = "auto", reduction: int | None = None) -> tuple[Tensor, str]:
    """One map per head of one attention call, on the image's token layout: ``((B, heads, h, w), kind)``.

    kinds:
        ``"cls"``: what the prefix (class) tokens attend to among the patch tokens (global calls with a prefix);
        ``"received"``: how much attention each token receives, averaged over the queries that see it (self-
        attention, windowed or global; or global calls whose keys are a pooled grid of the image);
        ``"entropy"``: each query's attention entropy over its keys, divided by log(N_k) (0 = one key, 1 =
        uniform); defined for every call. ``"auto"`` picks the first that applies in that order.
    """
    if kind not in MAP_KINDS:
        raise ArgumentError(f"head_maps: kind must be one of {MAP_KINDS}, got {kind!r}")
    probs = amap.probs.float()
    heads, Nq, Nk = probs.shape[-3:]
    probs = probs.reshape(-1, heads, Nq, Nk)
    p = amap.prefix_tokens
    kgrid = key_grid(amap)
    if kind == "auto":
        kind = "cls" if p and kgrid is not None else (
            "received" if amap.self_attention or kgrid is not None else "entropy")
    B = amap.batch or probs.shape[0]
    if kind == "entropy":
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(max(Nk, 2))  # (B', h, Nq)
        return place_windows(ent[..., p:], amap, reduction), kind
    if kind == "cls" and not p:
        raise ArgumentError(f"{amap.name}: kind='cls' needs prefix (class) tokens; this call has none")
    if kgrid is None and not amap.self_attention:
        raise ArgumentError(f"{amap.name}: its {Nk} keys are not the queries ({Nq}) and not a grid over the image, so "
                         f"kind={kind!r} has no place to put them; use kind='entropy'")
    rows = probs[:, :, :p] if kind == "cls" else probs[:, :, p:]
    recv = rows.mean(2)[..., p:]  # (B', h, Nk) -> (B', h, keys without the prefix keys)
    if amap.windows == 1:
        return recv.reshape(B, heads, *kgrid), kind
    return place_windows(recv, amap, reduction), kind


@dataclass
class HeadMaps:
    """The per-head maps of one attention call: ``maps`` ``(B, heads, h, w)`` on the token layout."""

    name: str
    maps: Tensor
    kind: str


def stage_reduction(model: nn.Module, name: str) -> int | None:
    """The reduction of the stage (``model.stage_info``) whose module holds ``name``, if the model names one.

    An attention core whose queries live at another stride than their stage's output (TNT's words, at stride 4
    inside stride-16 blocks) says so in its ``query_reduction`` attribute, which then wins."""
    try:
        own = getattr(model.get_submodule(name), "query_reduction", None)
    except AttributeError:
        own = None
    if own:
        return own
    best = None
    for info in getattr(model, "stage_info", ()) or ():
        if name.startswith(info.module + "."):
            best = info.reduction
    return best


def attention_maps(model: nn.Module, x: Tensor, kind: str = "auto") -> list[HeadMaps]:
    """Per-block, per-head maps of every attention call of ``model`` on ``x`` (see ``head_maps`` for ``kind``).

    No reshape argument: the grid of every call comes from the attention seam and the stage's stride."""
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    out = []
    for amap in rec.maps:
        maps, k = head_maps(amap, kind, stage_reduction(model, amap.name))
        out.append(HeadMaps(amap.name, maps, k))
    return out


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``(..., h, w)`` maps -> ``(..., H, W)``, bilinear (each token covers its cell of the image)."""
    lead = maps.shape[:-2]
    m = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    m = torch.nn.functional.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
    return m.reshape(*lead, *size)
