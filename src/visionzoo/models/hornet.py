"""HorNet, from "HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions"
(Rao et al., NeurIPS 2022). https://arxiv.org/abs/2207.14284

Differs from the paper: none. Follows raoyongming/HorNet ``hornet.py`` (MIT) and keeps its state-dict layout
(``downsample_layers``, ``stages.i.j``, ``gnconv``, ``pwconv1``, ``norm``, ``head``); timm has no HorNet.

Input sizes: the GF variants learn a complex filter on a fixed frequency grid. As in the official code the grid is
set by the build resolution (``img_size``: ``img_size/16`` x ``img_size/32 + 1`` in stage 3, half in stage 4, so
14x8 and 7x4 at 224, 24x13 and 12x7 at 384). Any other input size works: the filter is resized bilinearly (with
``align_corners=True``, as the official ``GlobalLocalFilter`` does on a mismatch) to the input's grid on the fly.
Building with another ``img_size`` resizes checkpoint filters the same way once, at load time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import DropPath, LayerNorm, LayerNorm2d, LayerType, drop_path_rates, get_act, init_trunc_normal
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["HorNet"]


def resize_filter(weight: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize a ``(C, h, w, 2)`` real-view complex filter to ``(C, *size, 2)`` (align_corners=True)."""
    if tuple(weight.shape[1:3]) == tuple(size):
        return weight
    weight = weight.permute(3, 0, 1, 2)  # (C, h, w, 2) -> (2, C, h, w): real/imag as the batch
    weight = F.interpolate(weight, size=tuple(size), mode="bilinear", align_corners=True)
    return weight.permute(1, 2, 3, 0)  # (2, C, H, W) -> (C, H, W, 2)


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
        H, W = x_global.shape[-2:]
        # NOTE: the FFT runs in float32 (as the official code), also under autocast.
        x_global = torch.fft.rfft2(x_global.float(), dim=(2, 3), norm="ortho")  # (B, C, H, W) -> (B, C, H, W//2+1)
        weight = resize_filter(self.complex_weight, x_global.shape[-2:])
        x_global = x_global * torch.view_as_complex(weight.contiguous())  # (C, H, W//2+1, 2) -> (C, H, W//2+1)
        x_global = torch.fft.irfft2(x_global, s=(H, W), dim=(2, 3), norm="ortho")
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
        for pw, gate in zip(self.pws, gates[1:]):
            x = pw(x) * gate
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

    def forward(self, x: Tensor) -> Tensor:
        y = self.gnconv(self.norm1(x))
        if self.gamma1 is not None:
            y = y * self.gamma1.view(-1, 1, 1)  # (C,) -> (C, 1, 1)
        x = x + self.drop_path(y)
        y = self.pwconv2(self.act(self.pwconv1(self.norm2(x.permute(0, 2, 3, 1)))))  # (B, C, H, W) -> (B, H, W, C)
        if self.gamma2 is not None:
            y = y * self.gamma2
        return x + self.drop_path(y.permute(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)


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
    first_conv = "downsample_layers.0.0"
    classifier = "head"

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
        self.downsample_layers = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0]))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        self.stages = nn.ModuleList()
        for i in range(4):
            side = img_size // (4 * 2**i)  # the stage's map side at the build resolution
            gf_size = (side, side // 2 + 1) if global_filter[i] else None  # rfft2 grid of a side x side map
            self.stages.append(nn.Sequential(*[
                HorNetBlock(dims[i], orders[i], gnconv_scale, kernel_size, gf_size, mlp_ratio, ls_init, act_layer,
                            dpr[i][j])
                for j in range(depths[i])]))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.init_linear_head(dims[-1], num_classes, drop_rate)
        self.set_feature_info([FeatureInfo(d, 4 * 2**i, f"stages.{i}") for i, d in enumerate(dims)])
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.downsample_layers[0](x)

    def stage_modules(self) -> list[nn.Module]:
        # The official layout keeps downsampling apart from the blocks; a stage here is (downsample, blocks).
        return [self.stages[0]] + [nn.Sequential(self.downsample_layers[i], self.stages[i]) for i in range(1, 4)]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.norm(x.mean((2, 3))))  # (B, C, H, W) -> (B, C)
        return x if pre_logits else self.head(x)

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resize global filters saved on another frequency grid (another build ``img_size``) to ours."""
        own = self.state_dict()
        out = dict(state_dict)
        for k, v in state_dict.items():
            if k.endswith("complex_weight") and k in own and v.ndim == 4 and v.shape != own[k].shape \
                    and v.shape[0] == own[k].shape[0]:
                out[k] = resize_filter(v, own[k].shape[1:3])
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
