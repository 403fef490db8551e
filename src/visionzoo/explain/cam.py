"""Class activation maps for every family, at any stage: Grad-CAM, Grad-CAM++, LayerCAM, Score-CAM.

Grad-CAM: Selvaraju et al., ICCV 2017 (https://arxiv.org/abs/1610.02391). Grad-CAM++: Chattopadhay et al., WACV
2018 (https://arxiv.org/abs/1710.11063), the closed form for an exponential of the score, as in
jacobgil/pytorch-grad-cam (MIT). LayerCAM: Jiang et al., TIP 2021. Score-CAM: Wang et al., CVPRW 2020
(https://arxiv.org/abs/1910.01279), with the target's softmax probability on the masked input as each channel's
weight (pytorch-grad-cam's choice; the paper subtracts a baseline score, a constant for all channels).

How a stage becomes an ``(B, C, h, w)`` map without a reshape argument (the design; no family code):

1. The stage is ``model.stage_modules()[stage]`` (named by ``stage_info``). Its output can be an NCHW map, an
   NHWC map, tokens ``(B, N, C)`` with class tokens in front, or a tuple (CvT's last stage: map and class token).
2. ``forward_intermediates(x, [stage])`` gives the contract's NCHW map of that same output. One call with a hook
   on the stage records the raw output next to it, and ``StageLayout`` is the conversion (which tensor, which
   layout, how many prefix tokens) that turns the one into the other exactly; learned once per model, stage and
   input shape.
3. During the explained forward, a hook on the stage replaces its output by ``from_nchw(A)``, where ``A`` is the
   NCHW view of the output (passed through ``StageTap.nchw``, an ``nn.Identity`` that captum's layer methods can
   hook). Everything after the stage then depends on ``A``, so ``autograd.grad(score, A)`` is the gradient of the
   NCHW map, prefix tokens left out, whatever the layout: gradients flow as in the unmodified model.

Heads that read a class token (``model.head.pool_type == "token"``) give the patch tokens of the last stage's output
no gradient. There the map is taken where the gradient does reach them: the input of the attention of the stage's
first ``layers.TokenBlock`` (``TokenBlock.attn_input``, its pre-norm), the target layer pytorch-grad-cam advises
for ViTs (``blocks[-1].norm1``). A model whose last stage has no ``TokenBlock`` uses the stage before instead.
On a ViT trained here (``benchmarks/explain_acceptance.py``) the raw residual stream before the last block gives
a Grad-CAM no better than random (pointing 19.5% against 16%), the normalised attention input 49%.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.errors import ArgumentError
from visionzoo.layers import TokenBlock

__all__ = ["CAM_METHODS", "CamResult", "StageLayout", "StageTap", "cam", "default_stage", "resolve_targets"]

CAM_METHODS = ("gradcam", "gradcam++", "layercam", "scorecam")


@dataclass(frozen=True)
class StageLayout:
    """How a stage's raw output maps to the contract's NCHW map."""

    item: int  # which tensor of a tuple output (0 for a plain tensor)
    layout: str  # "nchw", "nhwc" or "tokens"
    prefix: int  # tokens ahead of the grid's ("tokens" only)
    grid: tuple[int, int]
    groups: int = 1  # "tokens" only: the map is the mean of this many consecutive grids (ChannelViT's channels)
    suffix: int = 0  # "tokens" only: tokens after the grid's (a class token placed last, as in ViR)

    def to_nchw(self, out: Tensor | Sequence[Tensor]) -> Tensor:
        t = out[self.item] if isinstance(out, (tuple, list)) else out
        if self.layout == "nchw":
            return t
        if self.layout == "nhwc":
            return t.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        B, N, C = t.shape
        t = t[:, self.prefix:N - self.suffix]  # (B, p + kHW + s, C) -> (B, kHW, C)
        if self.groups > 1:
            t = t.reshape(B, self.groups, -1, C).mean(1)  # (B, kHW, C) -> (B, HW, C)
        return t.transpose(1, 2).reshape(B, C, *self.grid)  # (B, HW, C) -> (B, C, H, W)

    def from_nchw(self, a: Tensor, out: Tensor | Sequence[Tensor]) -> Tensor | tuple:
        t = out[self.item] if isinstance(out, (tuple, list)) else out
        if self.layout == "nchw":
            new = a
        elif self.layout == "nhwc":
            new = a.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        else:
            B, N, C = t.shape
            tokens = a.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
            if self.groups > 1:  # each grid moves by the map's change, so their mean is ``a``
                grids = t[:, self.prefix:N - self.suffix].reshape(B, self.groups, -1, C)  # -> (B, k, HW, C)
                tokens = (grids + (tokens - grids.mean(1)).unsqueeze(1)).flatten(1, 2)
            new = torch.cat([t[:, :self.prefix], tokens, t[:, N - self.suffix:]], dim=1)  # -> (B, p + kHW + s, C)
        if isinstance(out, (tuple, list)):
            items = list(out)
            items[self.item] = new
            return type(out)(items) if isinstance(out, tuple) else items
        return new


def _stage(model: nn.Module, stage: int) -> tuple[int, nn.Module]:
    stages = model.stage_modules()
    n = len(stages)
    if not isinstance(stage, int) or not -n <= stage < n:
        raise ArgumentError(f"{getattr(model, 'name', type(model).__name__)}: stage must be an int in -{n}..{n - 1} "
                         f"({n} stages: {[i.module for i in model.stage_info]}), got {stage!r}")
    return stage % n, stages[stage % n]


def _reads_class_token(model: nn.Module) -> bool:
    return getattr(getattr(model, "head", None), "pool_type", "") == "token"


def attention_input(model: nn.Module, stage: int) -> nn.Module | None:
    """The attention input (``TokenBlock.attn_input``) of the first ``TokenBlock`` in ``stage``, or None."""
    _, module = _stage(model, stage)
    for m in module.modules():
        if isinstance(m, TokenBlock):
            return m.attn_input
    return None


def _taps_attention_input(model: nn.Module, stage: int) -> bool:
    """Whether the CAM of ``stage`` is taken at its attention input: the last stage of a class-token head."""
    n = len(model.stage_modules())
    return stage % n == n - 1 and _reads_class_token(model) and attention_input(model, stage) is not None


def default_stage(model: nn.Module) -> int:
    """The last stage; for a class-token head whose last stage has no ``TokenBlock``, the one before (no gradient
    reaches the last patch tokens there)."""
    n = len(model.stage_modules())
    if _reads_class_token(model) and n > 1 and attention_input(model, n - 1) is None:
        return n - 2
    return n - 1


def _learn_layout(model: nn.Module, x: Tensor, stage: int) -> StageLayout:
    idx, module = _stage(model, stage)
    seen: list = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            ref = model.forward_intermediates(x[:1], [idx])[0]
    finally:
        handle.remove()
    if not seen:
        raise ArgumentError(f"{model.name}: stage {idx} ({model.stage_info[idx].module}) did not run in "
                         f"forward_intermediates; the stage modules and the forward disagree")
    out = seen[-1]
    items = list(out) if isinstance(out, (tuple, list)) else [out]
    _, C, h, w = ref.shape
    tol = 1e-4 * (ref.abs().max().item() + 1e-6)
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            continue
        cands = []
        if t.ndim == 4:
            cands += [StageLayout(i, "nchw", 0, (h, w)), StageLayout(i, "nhwc", 0, (h, w))]
        if t.ndim == 3 and t.shape[-1] == C and t.shape[1] >= h * w:
            cands.append(StageLayout(i, "tokens", t.shape[1] - h * w, (h, w)))
            cands += [StageLayout(i, "tokens", t.shape[1] - k * h * w, (h, w), k)  # k grids averaged
                      for k in range(2, t.shape[1] // (h * w) + 1)]
            if t.shape[1] > h * w:  # the extra tokens after the grid
                cands.append(StageLayout(i, "tokens", 0, (h, w), 1, t.shape[1] - h * w))
        for lay in cands:
            try:
                a = lay.to_nchw(items if len(items) > 1 else t)
            except RuntimeError:
                continue
            if a.shape == ref.shape and (a - ref).abs().max().item() <= tol:
                return lay
    shapes = [tuple(t.shape) for t in items if isinstance(t, Tensor)]
    raise ArgumentError(f"{model.name}: the output of stage {idx} ({shapes}) matches none of NCHW, NHWC or tokens of "
                     f"forward_intermediates' map {tuple(ref.shape)}; the stage module and forward_intermediates "
                     f"disagree")


def _attention_input_layout(model: nn.Module, x: Tensor, stage: int) -> StageLayout:
    """The tokens layout of the attention input of ``stage``: the stage's grid, the tokens ahead of it as prefix."""
    seen: list = []
    handle = attention_input(model, stage).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            ref = model.forward_intermediates(x[:1], [stage])[0]
    finally:
        handle.remove()
    _, _, h, w = ref.shape
    if not seen or seen[0].ndim != 3 or seen[0].shape[1] < h * w:
        raise ArgumentError(f"{model.name}: the attention input of stage {stage} ({model.stage_info[stage].module}) is "
                         f"not (B, prefix + {h}*{w}, C) tokens; its TokenBlock and the stage's map disagree")
    return StageLayout(0, "tokens", seen[0].shape[1] - h * w, (h, w))


def stage_layout(model: nn.Module, x: Tensor, stage: int) -> StageLayout:
    """The ``StageLayout`` of ``stage`` (of its output, or of its attention input where the CAM is taken there) for
    inputs shaped like ``x`` (cached on the model per stage and shape)."""
    idx, _ = _stage(model, stage)
    cache = model.__dict__.setdefault("_explain_stage_layouts", {})
    at_input = _taps_attention_input(model, idx)
    key = (idx, at_input, tuple(x.shape[1:]))
    if key not in cache:
        cache[key] = _attention_input_layout(model, x, idx) if at_input else _learn_layout(model, x, idx)
    return cache[key]


class StageTap(nn.Module):
    """While active, the output of stage ``stage`` flows through its NCHW view ``A`` (kept in ``self.maps``); for the
    last stage of a class-token head, its attention input does (``where`` says which).

    ``nchw`` is an ``nn.Identity`` on that path: a layer for captum's ``LayerGradCam`` and the like.
    """

    def __init__(self, model: nn.Module, stage: int) -> None:
        super().__init__()
        self.model = [model]  # not a submodule: the tap does not own the model
        self.stage, self.module = _stage(model, stage)
        self.where = "output"
        if _taps_attention_input(model, self.stage):
            self.module, self.where = attention_input(model, self.stage), "attention input"
        self.nchw = nn.Identity()
        self.maps: list[Tensor] = []
        self.layout: StageLayout | None = None
        self._handle = None

    def prepare(self, x: Tensor) -> StageTap:
        self.layout = stage_layout(self.model[0], x, self.stage)
        return self

    def _hook(self, module: nn.Module, args: tuple, out: Tensor | tuple) -> Tensor | tuple:
        a = self.nchw(self.layout.to_nchw(out))
        self.maps.append(a)
        return self.layout.from_nchw(a, out)

    def __enter__(self) -> StageTap:
        if self.layout is None:
            raise RuntimeError("StageTap: call prepare(x) before entering")
        self.maps.clear()
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def require_logits(model: nn.Module, what: str) -> None:
    """Refuse a model whose output is not class logits (an image-to-image model, ``output == "image"``)."""
    if getattr(model, "output", "logits") != "logits":
        name = getattr(model, "name", type(model).__name__)
        raise ArgumentError(f"{what}: {name} is an image-to-image model (output={model.output!r}); it gives no class "
                            f"logits to explain")


def resolve_targets(model: nn.Module, logits: Tensor, target: int | Sequence[int] | Tensor | None) -> Tensor:
    """``(B,)`` class indices: the prediction when ``target`` is None, else ``target`` (checked against the head)."""
    require_logits(model, "explain")
    B, K = logits.shape
    if target is None:
        return logits.argmax(1)
    t = torch.as_tensor(target, dtype=torch.long).flatten()
    if t.numel() == 1:
        t = t.expand(B)
    if t.numel() != B:
        raise ArgumentError(f"target: give one class or one per image ({B}), got {t.numel()}")
    bad = t[(t < 0) | (t >= K)]
    if bad.numel():
        raise ArgumentError(f"target class {bad[0].item()} is out of range: {getattr(model, 'name', 'the model')} has "
                         f"{K} classes (0..{K - 1})")
    return t.to(logits.device)


def _weights(method: str, a: Tensor, g: Tensor) -> Tensor:
    """The CAM before ReLU, ``(B, h, w)``, from activations ``a`` and gradients ``g`` ``(B, C, h, w)``."""
    if method == "gradcam":
        return (g.mean((2, 3), keepdim=True) * a).sum(1)
    if method == "gradcam++":
        g2, g3 = g.pow(2), g.pow(3)
        denom = 2 * g2 + a.sum((2, 3), keepdim=True) * g3
        alpha = torch.where(g != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
        return ((alpha * g.clamp_min(0)).sum((2, 3), keepdim=True) * a).sum(1)
    if method == "layercam":
        return (g.clamp_min(0) * a).sum(1)
    raise AssertionError(method)


def _finish(raw: Tensor, size: tuple[int, int], normalize: bool) -> Tensor:
    m = F.interpolate(F.relu(raw)[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    if normalize:
        lo = m.flatten(1).amin(1)[:, None, None]
        hi = m.flatten(1).amax(1)[:, None, None]
        m = (m - lo) / (hi - lo).clamp_min(1e-12)
    return m


@dataclass
class CamResult:
    """``maps`` ``(B, H, W)`` (input size, >= 0, in [0, 1] when normalised), ``targets`` ``(B,)``, the stage used,
    and the stage's map size ``grid``."""

    maps: Tensor
    targets: Tensor
    stage: int
    grid: tuple[int, int]
    method: str
    where: str = "output"


def cam(model: nn.Module, x: Tensor, method: str = "gradcam", stage: int | None = None,
        target: int | Sequence[int] | Tensor | None = None, normalize: bool = True, batch_size: int = 32
        ) -> CamResult:
    """A class activation map of ``model`` for ``x`` ``(B, C, H, W)`` (normalised input) at ``stage``.

    ``target``: a class, one per image, or None for the predicted class. ``batch_size``: masked images per
    forward for Score-CAM. The model is run in its current mode (use ``model.eval()``).
    """
    if method not in CAM_METHODS:
        raise ArgumentError(f"cam: method must be one of {CAM_METHODS}, got {method!r}")
    require_logits(model, "cam")
    if x.ndim != 4:
        raise ArgumentError(f"cam: x must be a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    stage = default_stage(model) if stage is None else stage
    tap = StageTap(model, stage).prepare(x)
    size = tuple(x.shape[-2:])
    if method == "scorecam":
        with torch.no_grad(), tap:
            logits = model(x)
        targets = resolve_targets(model, logits, target)
        a = tap.maps[-1].detach()
        return CamResult(_finish(_score_cam(model, x, a, targets, batch_size), size, normalize), targets.cpu(),
                         tap.stage, tuple(a.shape[-2:]), method, tap.where)
    with torch.enable_grad(), tap:
        logits = model(x.detach().requires_grad_(True))
    targets = resolve_targets(model, logits, target)
    a = tap.maps[-1]
    score = logits.gather(1, targets[:, None]).sum()
    (g,) = torch.autograd.grad(score, a)
    if not g.abs().amax().item() > 0:
        raise ArgumentError(f"{model.name}: the target's score has no gradient at stage {tap.stage} "
                         f"({model.stage_info[tap.stage].module}); the head reads only the class token after it. "
                         f"Use an earlier stage (the default, stage={default_stage(model)}, does this)")
    raw = _weights(method, a.detach().float(), g.float())
    return CamResult(_finish(raw, size, normalize), targets.cpu(), tap.stage, tuple(a.shape[-2:]), method, tap.where)


def _score_cam(model: nn.Module, x: Tensor, a: Tensor, targets: Tensor, batch_size: int) -> Tensor:
    """Score-CAM: each channel, upsampled and scaled to [0, 1], masks the input; the target's softmax probability
    on the masked input weights the channel."""
    B, C, h, w = a.shape
    up = F.interpolate(a.float(), size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)  # (B, C, H, W)
    lo, hi = up.flatten(2).amin(2)[..., None, None], up.flatten(2).amax(2)[..., None, None]
    masks = (up - lo) / (hi - lo).clamp_min(1e-12)
    weights = torch.empty(B, C)
    with torch.no_grad():
        for b in range(B):
            for c0 in range(0, C, batch_size):
                m = masks[b, c0:c0 + batch_size, None]  # (c, 1, H, W)
                probs = model(x[b:b + 1] * m.to(x.dtype)).softmax(1)  # (c, classes)
                weights[b, c0:c0 + m.shape[0]] = probs[:, targets[b]].float().cpu()
    return (weights[:, :, None, None].to(a.device) * a.float()).sum(1)
