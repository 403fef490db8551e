"""ConvNeXt, from "A ConvNet for the 2020s" (Liu et al., 2022). https://arxiv.org/abs/2201.03545

Differs from the paper: none for tiny..xlarge. The atto/femto/pico/nano sizes are timm's own (not in the paper)
and compute the block MLP with 1x1 convs on NCHW maps (``conv_mlp=True``), as timm does, so their weights load.
Follows facebookresearch/ConvNeXt (MIT) and timm ``convnext.py`` (Apache-2.0); the state-dict layout is timm's,
and ``ConvNeXt.remap`` converts checkpoints of the official repository.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    ConvMlp,
    DownsampleStage,
    DropPath,
    LayerNorm,
    LayerNorm2d,
    LayerType,
    Mlp,
    drop_path_rates,
    fold_channel_scale,
    init_trunc_normal,
    is_tracing,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["ConvNeXt"]

CHUNK_ROWS = 4096  # pixels per MLP chunk in CPU inference (hidden chunk: 4096 x 4C floats)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm, MLP (4x), layer scale, residual."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 4.0, conv_mlp: bool = False,
                 ls_init: float | None = 1e-6, act_layer: LayerType = "gelu", drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        if conv_mlp:  # NCHW throughout: LayerNorm over channels, 1x1 convs
            self.norm = LayerNorm2d(dim)
            self.mlp = ConvMlp(dim, int(mlp_ratio * dim), act_layer=act_layer)
        else:  # channels-last inside: LayerNorm and Linear on (B, H, W, C)
            self.norm = LayerNorm(dim)
            self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=act_layer)
        self.gamma = nn.Parameter(torch.full((dim,), float(ls_init))) if ls_init is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def fuse(self) -> None:
        """Fold the layer scale into the MLP's last layer (``fold_channel_scale``)."""
        if self.gamma is not None:
            fold_channel_scale(self.mlp.fc2, self.gamma)
            self.gamma = None

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv_dw(x)
        if self.conv_mlp:
            x = self.mlp(self.norm(x))
            if self.gamma is not None:
                x = x * self.gamma.view(-1, 1, 1)  # (C,) -> (C, 1, 1)
        elif not is_tracing() and not torch.is_grad_enabled() and x.device.type == "cpu":
            x = self.channels_last_chunked(x)  # eager CPU inference only: a traced graph takes the plain path
        else:
            x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C), a view
            x = self.mlp(self.norm(x))
            if self.gamma is not None:
                x = x * self.gamma
            x = x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W), a view; the add below writes NCHW
        return shortcut + self.drop_path(x)

    def channels_last_chunked(self, x: Tensor) -> Tensor:
        """Inference on CPU: norm, MLP and layer scale over rows of pixels, CHUNK_ROWS at a time, so the 4x wider
        hidden activations stay in cache: convnext_tiny batch 32 on 2 cores 17.3 -> 21.3 img/s with glibc's default
        malloc, unchanged (24.1) when freed memory is kept (``visionzoo bench --malloc keep``). Same values."""
        B, C, H, W = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, C)  # (B, C, H, W) -> (B*H*W, C); free when x is channels-last
        out = torch.empty_like(rows)
        for i in range(0, rows.shape[0], CHUNK_ROWS):
            y = self.mlp(self.norm(rows[i:i + CHUNK_ROWS]))
            if self.gamma is not None:
                torch.mul(y, self.gamma, out=out[i:i + CHUNK_ROWS])
            else:
                out[i:i + CHUNK_ROWS] = y
        return out.view(B, H, W, C).permute(0, 3, 1, 2)  # (B*H*W, C) -> (B, C, H, W), channels-last strides


class ConvNeXtStage(DownsampleStage):
    """Optional downsample (LayerNorm, 2x2 stride-2 conv), then ``depth`` ConvNeXtBlocks."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, stride: int = 2, drop_path: list[float] | None = None,
                 **block_args) -> None:
        drop_path = drop_path or [0.0] * depth
        super().__init__(in_dim, out_dim, depth, lambda i: ConvNeXtBlock(out_dim, drop_path=drop_path[i], **block_args),
                         stride)


class ConvNeXt(Backbone):
    """ConvNeXt: a 4x4 patchify stem, then four stages of ConvNeXtBlocks, then pool -> LayerNorm -> fc.

    Args:
        conv_mlp: compute the block MLP with 1x1 convs on NCHW maps (timm's small variants) instead of Linear
            layers on channels-last maps; same function, different weight shapes (``(O, I, 1, 1)`` vs ``(O, I)``).
        ls_init: initial layer-scale value; ``None`` builds blocks without ``gamma``.
    """

    kind = "convnet"
    cpu_channels_last = True  # with the chunked MLP: batch 32, 2 cores, about +3%
    cpu_channels_last_min_batch = 2
    first_conv = "stem.0"
    classifier = "head.fc"
    no_weight_decay_keys = ("gamma",)

    def __init__(self, depths: tuple[int, ...] = (3, 3, 9, 3), dims: tuple[int, ...] = (96, 192, 384, 768),
                 kernel_size: int = 7, mlp_ratio: float = 4.0, conv_mlp: bool = False, ls_init: float | None = 1e-6,
                 act_layer: LayerType = "gelu", *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"convnext: depths and dims need 4 entries (one per stage), got depths={tuple(depths)} "
                             f"dims={tuple(dims)}")
        if kernel_size % 2 == 0:
            raise ValueError(f"convnext: kernel_size must be odd (same padding), got {kernel_size}")
        self.in_chans = in_chans
        self.conv_mlp = conv_mlp
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        block_args = dict(kernel_size=kernel_size, mlp_ratio=mlp_ratio, conv_mlp=conv_mlp, ls_init=ls_init,
                          act_layer=act_layer)
        self.stages = nn.ModuleList([
            ConvNeXtStage(dims[max(i - 1, 0)], dims[i], depths[i], stride=2 if i > 0 else 1, drop_path=dpr[i],
                          **block_args)
            for i in range(4)])
        self.set_feature_info([FeatureInfo(d, 4 * 2**i, f"stages.{i}") for i, d in enumerate(dims)])
        self.init_head(dims[-1], num_classes, drop_rate, norm_layer="ln")
        self.apply(init_trunc_normal)

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Reshape MLP weights between Linear ``(O, I)`` and 1x1-conv ``(O, I, 1, 1)`` to fit ``conv_mlp``."""
        own = self.state_dict()
        out = {}
        for k, v in state_dict.items():
            if ".mlp.fc" in k and k.endswith(".weight") and k in own and v.ndim != own[k].ndim \
                    and v.numel() == own[k].numel():
                v = v.reshape(own[k].shape)  # (O, I) <-> (O, I, 1, 1)
            out[k] = v
        return out

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official facebookresearch/ConvNeXt keys -> ours (timm's)."""
        out = {}
        for k, v in state_dict.items():
            k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
            k = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", k)
            k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
            k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
            k = re.sub(r"^norm\.", "head.norm.", k)
            k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
            out[k] = v
        return out


_README = "official README, ImageNet-1K trained table"
_README22K = "official README, ImageNet-22K trained table (22K pre-train -> 1K fine-tune)"
_TIMM = "timm-original size (not in the paper): top-1 from timm results-imagenet.csv ({tag}, 224, crop {crop}); " \
        "params/GMACs from the timm model card"
# atto..nano: gmacs is timm's code counted with torch.utils.flop_counter (the model card rounds to 0.1)
_SMALL = dict(conv_mlp=True)

VARIANTS = {
    "convnext_test":   Variant(dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)), params_m=0.15748,
                               input_size=64, notes="tiny config for tests"),
    "convnext_atto":   Variant(dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), **_SMALL), params_m=3.695520,
                               gmacs=0.547, paper=Paper(3.7, 0.6, 75.672, _TIMM.format(tag="d2_in1k", crop=0.875)),
                               notes="timm weights convnext_atto.d2_in1k"),
    "convnext_femto":  Variant(dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), **_SMALL), params_m=5.217784,
                               gmacs=0.780, paper=Paper(5.2, 0.8, 77.498, _TIMM.format(tag="d1_in1k", crop=0.875)),
                               notes="timm weights convnext_femto.d1_in1k"),
    "convnext_pico":   Variant(dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), **_SMALL), params_m=9.045672,
                               gmacs=1.367, paper=Paper(9.0, 1.4, 79.516, _TIMM.format(tag="d1_in1k", crop=0.875)),
                               notes="timm weights convnext_pico.d1_in1k"),
    "convnext_nano":   Variant(dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), **_SMALL), params_m=15.593560,
                               gmacs=2.446, paper=Paper(15.6, 2.5, 80.762, _TIMM.format(tag="d1h_in1k", crop=0.95)),
                               crop_pct=0.95, notes="timm weights convnext_nano.d1h_in1k"),
    "convnext_tiny":   Variant(dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)), params_m=28.589128, gmacs=4.466,
                               paper=Paper(28, 4.5, 82.1, _README), notes="weights convnext_tiny.fb_in1k"),
    "convnext_small":  Variant(dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)), params_m=50.223688, gmacs=8.701,
                               paper=Paper(50, 8.7, 83.1, _README), notes="weights convnext_small.fb_in1k"),
    "convnext_base":   Variant(dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)), params_m=88.591464,
                               gmacs=15.378, paper=Paper(89, 15.4, 83.8, _README),
                               notes="weights convnext_base.fb_in1k"),
    "convnext_large":  Variant(dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)), params_m=197.767336,
                               gmacs=34.396, paper=Paper(198, 34.4, 84.3, _README),
                               notes="weights convnext_large.fb_in1k"),
    "convnext_xlarge": Variant(dict(depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048)), params_m=350.196968,
                               gmacs=60.9, paper=Paper(350, 60.9, 87.0, _README22K),
                               notes="no ImageNet-1K-only result; weights convnext_xlarge.fb_in22k_ft_in1k"),
}
register_family(ConvNeXt, VARIANTS, paper="arXiv:2201.03545", kind="convnet", family="convnext")
