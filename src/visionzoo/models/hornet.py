"""HorNet, from "HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions"
(Rao et al., NeurIPS 2022). https://arxiv.org/abs/2207.14284

Differs from the paper: none. Follows raoyongming/HorNet ``hornet.py`` (MIT); timm has no HorNet. The state-dict
layout is ConvNeXt's (``stem``, ``stages.i.downsample``, ``stages.i.blocks.j``, ``head.norm``, ``head.fc``) with the
official block names (``gnconv``, ``pwconv1``, ...); ``HorNet.remap`` converts official checkpoints
(``downsample_layers``, ``stages.i.j``, ``norm``, ``head``).

Input sizes: the GF variants learn a complex filter on a fixed frequency grid. As in the official code the grid is
set by the build resolution (``img_size``: ``img_size/16`` x ``img_size/32 + 1`` in stage 3, half in stage 4, so
14x8 and 7x4 at 224, 24x13 and 12x7 at 384). Any other input size works: the filter is resized bilinearly (with
``align_corners=True``, as the official ``GlobalLocalFilter`` does on a mismatch) to the input's grid on the fly.
Building with another ``img_size`` resizes checkpoint filters the same way once, at load time.

Export: eager runs the global filter with ``torch.fft``; while tracing (FX, torch.export, compile, ONNX) it runs the
same transform as real DFT matrix products at the traced size (``dft_filter``), which exporters and onnxruntime
handle (no complex dtype). The two agree to float rounding (about 1e-6).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    DownsampleStage,
    DropPath,
    LayerNorm,
    LayerNorm2d,
    LayerType,
    drop_path_rates,
    fold_channel_scale,
    get_act,
    init_trunc_normal,
    is_tracing,
    trace_leaf,
)
from visionzoo.layers.spectral import dft_bases, upcast
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["HorNet"]


def resize_filter(weight: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize a ``(C, h, w, 2)`` real-view complex filter to ``(C, *size, 2)`` (align_corners=True)."""
    if tuple(weight.shape[1:3]) == tuple(size):
        return weight
    weight = weight.permute(3, 0, 1, 2)  # (C, h, w, 2) -> (2, C, h, w): real/imag as the batch
    weight = F.interpolate(weight, size=tuple(size), mode="bilinear", align_corners=True)
    return weight.permute(1, 2, 3, 0)  # (2, C, H, W) -> (C, H, W, 2)


@trace_leaf
def filter_for(weight: Tensor, x: Tensor) -> Tensor:
    """The ``(C, h, w, 2)`` filter on the rfft2 grid of ``x`` ``(B, C, H, W)``: ``(C, H, W//2 + 1, 2)``, x's dtype."""
    H, W = x.shape[-2:]
    return resize_filter(weight, (H, W // 2 + 1)).to(x.dtype)


def fft_filter(x: Tensor, weight: Tensor) -> Tensor:
    """rfft2, times the complex filter ``weight`` ``(C, H, W//2+1, 2)``, irfft2 (both ``norm="ortho"``)."""
    H, W = x.shape[-2:]
    x = torch.fft.rfft2(x, dim=(2, 3), norm="ortho")  # (B, C, H, W) -> (B, C, H, W//2+1), complex
    x = x * torch.view_as_complex(weight.contiguous())  # (C, H, W//2+1, 2) -> (C, H, W//2+1), complex
    return torch.fft.irfft2(x, s=(H, W), dim=(2, 3), norm="ortho")


def dft_filter(x: Tensor, weight: Tensor) -> Tensor:
    """``fft_filter`` as real matrix products at the size of ``x`` (what exporters and onnxruntime run)."""
    cos_h, sin_h, cos_w, sin_w, icos_w, isin_w = dft_bases(x)
    w_re, w_im = weight.unbind(-1)  # (C, H, W//2+1, 2) -> 2 x (C, H, W//2+1)
    re, im = x @ cos_w, -(x @ sin_w)  # rfft along W: (B, C, H, W) -> (B, C, H, W//2+1)
    re, im = cos_h @ re + sin_h @ im, cos_h @ im - sin_h @ re  # DFT along H: (H, H) @ (B, C, H, W//2+1)
    re, im = re * w_re - im * w_im, re * w_im + im * w_re  # times the complex filter
    re, im = cos_h @ re - sin_h @ im, cos_h @ im + sin_h @ re  # inverse DFT along H
    return re @ icos_w - im @ isin_w  # irfft along W: (B, C, H, W//2+1) -> (B, C, H, W)


class HorNetGlobalLocalFilter(nn.Module):
    """LayerNorm; half the channels through a depthwise 3x3, half through a learnable global filter; LayerNorm.

    The two halves are interleaved channel by channel (local 0, global 0, local 1, ...), as the official code does.
    """

    def __init__(self, dim: int, h: int = 14, w: int = 8) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"hornet: the global filter splits its {dim} channels in two halves; need an even count")
        self.dw = nn.Conv2d(dim // 2, dim // 2, 3, padding=1, bias=False, groups=dim // 2)
        self.complex_weight = nn.Parameter(torch.empty(dim // 2, h, w, 2))
        self.pre_norm = LayerNorm2d(dim)
        self.post_norm = LayerNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre_norm(x)
        x_local, x_global = x.chunk(2, dim=1)
        x_local = self.dw(x_local)
        # NOTE: the filter runs in float32 for half/bfloat16 inputs (as the official code, also under autocast)
        x_global = upcast(x_global)
        weight = filter_for(self.complex_weight, x_global)
        x_global = (dft_filter if is_tracing() else fft_filter)(x_global, weight).type_as(x)
        x = torch.stack((x_local, x_global), dim=2).flatten(1, 2)  # (B, C, 2, H, W) -> (B, 2C, H, W), interleaved
        return self.post_norm(x)


class HorNetGnConv(nn.Module):
    """Recursive gated convolution of order n (gnConv).

    A 1x1 conv makes ``2*dim`` channels, split into ``p`` (``dim / 2**(n-1)``) and ``q`` (``dim/2**(n-1) + ... +
    dim``). ``q`` goes through a depthwise conv (or a global filter), times ``scale``, and is split per order;
    then ``p <- pw_k(p) * q_k`` doubles the width each step up to ``dim``, and a 1x1 conv projects out.
    """

    def __init__(self, dim: int, order: int = 5, scale: float = 1.0, kernel_size: int = 7,
                 gf_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if order < 1 or dim % 2 ** (order - 1):
            raise ValueError(f"hornet: gnConv of order {order} halves dim {order - 1} times; dim={dim} must be a "
                             f"multiple of {2 ** max(order - 1, 0)} (and order >= 1)")
        self.order = order
        self.dims = [dim // 2**i for i in range(order)][::-1]  # e.g. order 3, dim 256: [64, 128, 256]
        self.scale = scale
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        width = sum(self.dims)
        if gf_size is None:
            self.dwconv = nn.Conv2d(width, width, kernel_size, padding=kernel_size // 2, groups=width)
        else:
            self.dwconv = HorNetGlobalLocalFilter(width, *gf_size)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.pws = nn.ModuleList([nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1)])

    def forward(self, x: Tensor) -> Tensor:
        p, q = torch.split(self.proj_in(x), (self.dims[0], sum(self.dims)), dim=1)
        gates = torch.split(self.dwconv(q) * self.scale, self.dims, dim=1)
        x = p * gates[0]
        for i, pw in enumerate(self.pws):  # indexed: under FX ``gates`` is one node that cannot be iterated
            x = pw(x) * gates[i + 1]
        return self.proj_out(x)


class HorNetBlock(nn.Module):
    """x + gamma1 * gnConv(LN(x)), then x + gamma2 * MLP(LN(x)) on channels-last maps."""

    def __init__(self, dim: int, order: int, scale: float, kernel_size: int = 7, gf_size: tuple[int, int] | None = None,
                 mlp_ratio: float = 4.0, ls_init: float | None = 1e-6, act_layer: LayerType = "gelu",
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(dim)
        self.gnconv = HorNetGnConv(dim, order, scale, kernel_size, gf_size)
        self.norm2 = LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, int(mlp_ratio * dim))
        self.act = get_act(act_layer)()
        self.pwconv2 = nn.Linear(int(mlp_ratio * dim), dim)
        self.gamma1 = nn.Parameter(torch.full((dim,), float(ls_init))) if ls_init else None
        self.gamma2 = nn.Parameter(torch.full((dim,), float(ls_init))) if ls_init else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def fuse(self) -> None:
        """Fold the layer scales into the last layer of the gnConv (``proj_out``) and of the MLP (``pwconv2``)."""
        if self.gamma1 is not None:
            fold_channel_scale(self.gnconv.proj_out, self.gamma1)
            self.gamma1 = None
        if self.gamma2 is not None:
            fold_channel_scale(self.pwconv2, self.gamma2)
            self.gamma2 = None

    def forward(self, x: Tensor) -> Tensor:
        y = self.gnconv(self.norm1(x))
        if self.gamma1 is not None:
            y = y * self.gamma1.view(-1, 1, 1)  # (C,) -> (C, 1, 1)
        x = x + self.drop_path(y)
        y = self.pwconv2(self.act(self.pwconv1(self.norm2(x.permute(0, 2, 3, 1)))))  # (B, C, H, W) -> (B, H, W, C)
        if self.gamma2 is not None:
            y = y * self.gamma2
        return x + self.drop_path(y.permute(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)


class HorNetStage(DownsampleStage):
    """Optional downsample (LayerNorm, 2x2 stride-2 conv), then ``depth`` HorNetBlocks."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, stride: int = 2, drop_path: list[float] | None = None,
                 **block_args) -> None:
        drop_path = drop_path or [0.0] * depth
        super().__init__(in_dim, out_dim, depth, lambda i: HorNetBlock(out_dim, drop_path=drop_path[i], **block_args),
                         stride)


class HorNet(Backbone):
    """HorNet: a ConvNeXt-like 4-stage network whose spatial mixing is gnConv of order 2..5.

    Args:
        orders: gnConv order per stage.
        global_filter: per stage, use the GlobalLocalFilter (GF variants) instead of a depthwise ``kernel_size`` conv.
        gnconv_scale: the factor on the depthwise/filter output (1/3 in every official variant).
        img_size: build resolution; fixes the global filters' frequency grid (other inputs resize it on the fly).
    """

    kind = "convnet"
    takes_img_size = True
    first_conv = "stem.0"

    def __init__(self, depths: tuple[int, ...] = (2, 3, 18, 2), dims: tuple[int, ...] = (64, 128, 256, 512),
                 orders: tuple[int, ...] = (2, 3, 4, 5), global_filter: tuple[bool, ...] = (False,) * 4,
                 gnconv_scale: float = 1 / 3, kernel_size: int = 7, mlp_ratio: float = 4.0,
                 ls_init: float | None = 1e-6, act_layer: LayerType = "gelu", *, img_size: int = 224,
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not len(depths) == len(dims) == len(orders) == len(global_filter) == 4:
            raise ValueError(f"hornet: depths, dims, orders and global_filter need 4 entries (one per stage), got "
                             f"{tuple(depths)}, {tuple(dims)}, {tuple(orders)}, {tuple(global_filter)}")
        if img_size < 32 or img_size % 32:
            raise ValueError(f"hornet: img_size must be a multiple of 32 (>= 32), got {img_size}")
        self.in_chans = in_chans
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        self.stages = nn.ModuleList()
        for i in range(4):
            side = img_size // (4 * 2**i)  # the stage's map side at the build resolution
            gf_size = (side, side // 2 + 1) if global_filter[i] else None  # rfft2 grid of a side x side map
            self.stages.append(HorNetStage(dims[max(i - 1, 0)], dims[i], depths[i], stride=2 if i > 0 else 1,
                                           drop_path=dpr[i], order=orders[i], scale=gnconv_scale,
                                           kernel_size=kernel_size, gf_size=gf_size, mlp_ratio=mlp_ratio,
                                           ls_init=ls_init, act_layer=act_layer))
        self.set_feature_info([FeatureInfo(d, 4 * 2**i, f"stages.{i}") for i, d in enumerate(dims)])
        self.init_head(dims[-1], num_classes, drop_rate, norm_layer="ln")
        # NOTE: initialised in the official module order (every downsampling layer, then the blocks, then the
        # head), so a seeded build draws the same weights as before the stage modules existed.
        for m in (self.stem, *(s.downsample for s in self.stages), *(s.blocks for s in self.stages), self.head):
            m.apply(_init_weights)

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resize global filters saved on another frequency grid (another build ``img_size``) to ours."""
        own = self.state_dict()
        out = dict(state_dict)
        for k, v in state_dict.items():
            if k.endswith("complex_weight") and k in own and v.ndim == 4 and v.shape != own[k].shape \
                    and v.shape[0] == own[k].shape[0]:
                out[k] = resize_filter(v, own[k].shape[1:3])
        return out

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official raoyongming/HorNet keys (also visionzoo checkpoints before stage modules) -> ours."""
        out = {}
        for k, v in state_dict.items():
            k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
            k = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", k)
            k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
            k = re.sub(r"^norm\.", "head.norm.", k)
            k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
            out[k] = v
        return out


def _init_weights(m: nn.Module) -> None:
    init_trunc_normal(m)
    if isinstance(m, HorNetGlobalLocalFilter) and not m.complex_weight.is_meta:
        nn.init.trunc_normal_(m.complex_weight, std=0.02)


_README = "official README ImageNet-1K table (224; the paper's Table 1 gives the same)"
_GF = (False, False, True, True)
_FVCORE = ("gmacs: fvcore on the official file at 224. visionzoo.profile gives {ours}: it skips the LayerNorms "
           "that fvcore counts (5 per element of the channels-last ones, about -{ln} G)")
_NOTE_77 = _FVCORE + "."
_NOTE_GF = _FVCORE + (" and adds the rfft2/irfft2 of the global filters that fvcore cannot see (+{fft} G at "
                      "5 N log2 N FLOPs per complex transform, half for real ones). Filter grid 14x8 / 7x4.")

VARIANTS = {
    "hornet_test":      Variant(dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), global_filter=_GF),
                                params_m=0.440560, input_size=64,
                                notes="tiny config for tests (global filters in stages 3-4, grids 4x3 / 2x2)"),
    "hornet_tiny_7x7":  Variant(dict(dims=(64, 128, 256, 512)), params_m=22.409512, gmacs=3.977,
                                paper=Paper(22, 4.0, 82.8, _README),
                                notes=_NOTE_77.format(ours=3.968, ln=0.008)),
    "hornet_tiny_gf":   Variant(dict(dims=(64, 128, 256, 512), global_filter=_GF), params_m=22.991848, gmacs=3.897,
                                paper=Paper(23, 3.9, 83.0, _README),
                                notes=_NOTE_GF.format(ours=3.906, ln=0.008, fft=0.017)),
    "hornet_small_7x7": Variant(dict(dims=(96, 192, 384, 768)), params_m=49.528264, gmacs=8.826,
                                paper=Paper(50, 8.8, 83.8, _README),
                                notes=_NOTE_77.format(ours=8.814, ln=0.012)),
    "hornet_small_gf":  Variant(dict(dims=(96, 192, 384, 768), global_filter=_GF), params_m=50.401768, gmacs=8.707,
                                paper=Paper(50, 8.7, 84.0, _README),
                                notes=_NOTE_GF.format(ours=8.720, ln=0.012, fft=0.025)),
    "hornet_base_7x7":  Variant(dict(dims=(128, 256, 512, 1024)), params_m=87.256680, gmacs=15.584,
                                paper=Paper(87, 15.6, 84.2, _README),
                                notes=_NOTE_77.format(ours=15.567, ln=0.017)),
    "hornet_base_gf":   Variant(dict(dims=(128, 256, 512, 1024), global_filter=_GF), params_m=88.421352,
                                gmacs=15.424, paper=Paper(88, 15.5, 84.3, _README),
                                notes=_NOTE_GF.format(ours=15.441, ln=0.017, fft=0.034)),
}
register_family(HorNet, VARIANTS, paper="arXiv:2207.14284", kind="convnet", family="hornet")
