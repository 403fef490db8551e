"""MAXIM, from "MAXIM: Multi-Axis MLP for Image Processing" (Tu et al., CVPR 2022). https://arxiv.org/abs/2201.02973

An image-to-image restoration network (``output = "image"``): ``model(x)`` returns the restored image, of the size
and channels of ``x``; it has no classifier head (``num_classes`` is ignored, ``reset_classifier`` refuses).
``num_stages`` UNets run one after the other, each refining the last (supervised attention modules and cross-gating
blocks pass features between them); ``forward_all`` gives every stage's image at every supervision scale (the
training targets), ``forward_features`` the last decoder's full-resolution map, ``features_only`` one full-resolution
map per UNet stage. Its multi-axis gated MLP mixes tokens within blocks and across a strided grid, the groups of
MaxViT's block/grid attention (``layers.window``), with a gMLP spatial gating unit in place of attention: a fixed
``block_size``/``grid_size`` token count per group, so inputs must be multiples of 64 (the official evaluation pads
them). No softmax attention.

Differs from the paper: none. Follows google-research/maxim (JAX/Flax, Apache-2.0), ``maxim/models/maxim.py``, with
the evaluation configuration of ``run_eval.py`` (three supervision scales, 3 output channels); only its default
``use_cross_gating=True``/``use_global_mlp=True`` path is ported. Its 1x1 convolutions are ``nn.Linear`` here (the
tensors stay channels-last between blocks); ``remap`` translates the Flax parameter tree (flattened with ".").
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from visionzoo.backbone import Backbone, FeatureInfo, resolve_indices
from visionzoo.layers import PARTITIONS, trace_leaf
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["MAXIM"]

LN_EPS = 1e-6  # Flax's LayerNorm default


def gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")  # jax.nn.gelu's default


def conv_nhwc(conv: nn.Module, x: Tensor) -> Tensor:
    """A torch conv applied to a channels-last ``(B, H, W, C)`` map."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C) -> (B, C, H, W) -> (B, H', W', C')


@trace_leaf
def resize(x: Tensor, ratio: float) -> Tensor:
    """Bilinear resize of ``(B, H, W, C)`` by ``ratio`` (antialiased when shrinking, as ``jax.image.resize``)."""
    if ratio == 1:
        return x
    y = x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
    if ratio < 1 and y.dtype in (torch.bfloat16, torch.float16):
        y = y.float()  # NOTE: the antialiased CPU kernel has no half-precision version
    y = F.interpolate(y, scale_factor=ratio, mode="bilinear", align_corners=False, antialias=ratio < 1)
    return y.to(x.dtype).permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


class MaximSpatialMix(nn.Module):
    """A dense layer over the tokens of each block (``"block"``) or strided grid (``"grid"``) group of a map."""

    def __init__(self, partition: str, size: tuple[int, int]) -> None:
        super().__init__()
        self.partition, self.size = partition, size
        n = size[0] * size[1]
        self.mix = nn.Linear(n, n)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        part, reverse = PARTITIONS[self.partition]
        groups = part(x, self.size)  # (B, H, W, C) -> (B * G, N, C)
        groups = self.mix(groups.transpose(1, 2)).transpose(1, 2)  # mix the N tokens of each group
        return reverse(groups, self.size, H, W)


class MaximGmlp(nn.Module):
    """Block or grid gMLP: LN, dense x factor, GELU, spatial gating ``u * (mix(LN(v)) + 1)``, dense back; residual."""

    def __init__(self, dim: int, partition: str, size: tuple[int, int], factor: int = 2) -> None:
        super().__init__()
        self.norm = layer_norm(dim)
        self.in_proj = nn.Linear(dim, dim * factor)
        self.gate_norm = layer_norm(dim * factor // 2)
        self.gate = MaximSpatialMix(partition, size)
        self.out_proj = nn.Linear(dim * factor // 2, dim)

    def forward(self, x: Tensor) -> Tensor:
        u, v = gelu(self.in_proj(self.norm(x))).chunk(2, dim=-1)
        y = u * (self.gate(self.gate_norm(v)) + 1.0)
        return x + self.out_proj(y)


class MaximMultiAxisBlock(nn.Module):
    """The multi-axis gated MLP block: half the channels mixed over a global grid, half within local blocks."""

    def __init__(self, dim: int, block_size: tuple[int, int], grid_size: tuple[int, int], factor: int = 2,
                 input_proj_factor: int = 2) -> None:
        super().__init__()
        half = dim * input_proj_factor // 2
        self.norm = layer_norm(dim)
        self.in_proj = nn.Linear(dim, dim * input_proj_factor)
        self.grid = MaximGmlp(half, "grid", grid_size, factor)
        self.block = MaximGmlp(half, "block", block_size, factor)
        self.out_proj = nn.Linear(dim * input_proj_factor, dim)

    def forward(self, x: Tensor) -> Tensor:
        u, v = gelu(self.in_proj(self.norm(x))).chunk(2, dim=-1)
        return x + self.out_proj(torch.cat([self.grid(u), self.block(v)], dim=-1))


class MaximChannelAttention(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(W2 relu(W1 mean_HW(x)))``."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        self.reduce = nn.Linear(dim, dim // reduction)
        self.expand = nn.Linear(dim // reduction, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((1, 2), keepdim=True)))))


class MaximRCAB(nn.Module):
    """Residual channel attention block: LN, 3x3 conv, leaky ReLU, 3x3 conv, channel attention; residual."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        self.norm = layer_norm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.ca = MaximChannelAttention(dim, reduction)

    def forward(self, x: Tensor) -> Tensor:
        y = F.leaky_relu(conv_nhwc(self.conv1, self.norm(x)), 0.2)
        return x + self.ca(conv_nhwc(self.conv2, y))


class MaximRDCAB(nn.Module):
    """Residual dense channel attention block (bottleneck): LN, channel MLP, channel attention; residual."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        self.norm = layer_norm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.ca = MaximChannelAttention(dim, reduction)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ca(self.fc2(gelu(self.fc1(self.norm(x)))))


class MaximGroup(nn.Module):
    """One multi-axis gated MLP block followed by a channel attention block."""

    def __init__(self, mab: nn.Module, cab: nn.Module) -> None:
        super().__init__()
        self.mab, self.cab = mab, cab

    def forward(self, x: Tensor) -> Tensor:
        return self.cab(self.mab(x))


class MaximSpatialGating(nn.Module):
    """Cross-gating weights: LN, dense x2, GELU, then grid mixing on one half and block mixing on the other."""

    def __init__(self, dim: int, block_size: tuple[int, int], grid_size: tuple[int, int],
                 input_proj_factor: int = 2) -> None:
        super().__init__()
        self.norm = layer_norm(dim)
        self.in_proj = nn.Linear(dim, dim * input_proj_factor)
        self.grid_mix = MaximSpatialMix("grid", grid_size)
        self.block_mix = MaximSpatialMix("block", block_size)
        self.out_proj = nn.Linear(dim * input_proj_factor, dim)

    def forward(self, x: Tensor) -> Tensor:
        u, v = gelu(self.in_proj(self.norm(x))).chunk(2, dim=-1)
        return self.out_proj(torch.cat([self.grid_mix(u), self.block_mix(v)], dim=-1))


class MaximCrossGating(nn.Module):
    """Cross-gating block: two streams ``x`` and ``y`` gate each other with multi-axis spatial weights."""

    def __init__(self, x_dim: int, y_dim: int, dim: int, block_size: tuple[int, int], grid_size: tuple[int, int],
                 upsample_y: bool, input_proj_factor: int = 2) -> None:
        super().__init__()
        self.up_y = nn.ConvTranspose2d(y_dim, dim, 2, stride=2) if upsample_y else None
        self.proj_x = nn.Linear(x_dim, dim)
        self.proj_y = nn.Linear(dim if upsample_y else y_dim, dim)
        self.norm_x, self.norm_y = layer_norm(dim), layer_norm(dim)
        self.in_proj_x, self.in_proj_y = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gate_x = MaximSpatialGating(dim, block_size, grid_size, input_proj_factor)
        self.gate_y = MaximSpatialGating(dim, block_size, grid_size, input_proj_factor)
        self.out_proj_x, self.out_proj_y = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.up_y is not None:
            y = conv_nhwc(self.up_y, y)
        x, y = self.proj_x(x), self.proj_y(y)
        shortcut_x, shortcut_y = x, y
        x = gelu(self.in_proj_x(self.norm_x(x)))
        y = gelu(self.in_proj_y(self.norm_y(y)))
        gx, gy = self.gate_x(x), self.gate_y(y)
        y = self.out_proj_y(y * gx) + shortcut_y
        x = self.out_proj_x(x * gy) + y + shortcut_x
        return x, y


class MaximEncoder(nn.Module):
    """UNet encoder block: 1x1 projection of ``[x, skip]``, groups of (multi-axis MLP, RCAB) with a long residual,
    optional cross-gating with the previous stage's features, optional 4x4/2 downsampling."""

    def __init__(self, in_dim: int, dim: int, num_groups: int, block_size: tuple[int, int],
                 grid_size: tuple[int, int], cross_gate: bool = False, downsample: bool = True, **kw) -> None:
        super().__init__()
        f, ipf, red = kw["factor"], kw["input_proj_factor"], kw["reduction"]
        self.proj = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(MaximGroup(MaximMultiAxisBlock(dim, block_size, grid_size, f, ipf),
                                               MaximRCAB(dim, red)) for _ in range(num_groups))
        self.cross_gate = MaximCrossGating(dim, dim, dim, block_size, grid_size, False, ipf) if cross_gate else None
        self.down = nn.Conv2d(dim, dim, 4, stride=2, padding=1) if downsample else None

    def forward(self, x: Tensor, skip: Tensor | None = None, enc: Tensor | None = None,
                dec: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if skip is not None:
            x = torch.cat([x, skip], dim=-1)
        x = self.proj(x)
        shortcut = x
        for block in self.blocks:
            x = block(x)
        x = x + shortcut
        if self.cross_gate is not None:
            x, _ = self.cross_gate(x, enc + dec)
        return (conv_nhwc(self.down, x) if self.down is not None else x), x


class MaximBottleneck(nn.Module):
    """1x1 projection, groups of (multi-axis MLP, RDCAB), long residual."""

    def __init__(self, dim: int, num_groups: int, size: tuple[int, int], **kw) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(
            MaximGroup(MaximMultiAxisBlock(dim, size, size, kw["factor"], kw["input_proj_factor"]),
                       MaximRDCAB(dim, kw["reduction"])) for _ in range(num_groups))

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        shortcut = x
        for block in self.blocks:
            x = block(x)
        return x + shortcut


class MaximDecoder(nn.Module):
    """2x2/2 transposed conv, then an encoder block (no downsampling) with the skip signal."""

    def __init__(self, in_dim: int, dim: int, skip_dim: int, num_groups: int, block_size: tuple[int, int],
                 grid_size: tuple[int, int], **kw) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_dim, dim, 2, stride=2)
        self.block = MaximEncoder(dim + skip_dim, dim, num_groups, block_size, grid_size, downsample=False, **kw)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.block(conv_nhwc(self.up, x), skip)[1]


class MaximResize(nn.Module):
    """Bilinear resize by ``ratio``, then a 1x1 projection."""

    def __init__(self, in_dim: int, dim: int, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(resize(x, self.ratio))


class MaximSAM(nn.Module):
    """Supervised attention module: the stage's image (3x3 conv + input) and features gated by it."""

    def __init__(self, dim: int, out_chans: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv_img = nn.Conv2d(dim, out_chans, 3, padding=1)
        self.conv2 = nn.Conv2d(out_chans, dim, 3, padding=1)

    def forward(self, x: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        image = conv_nhwc(self.conv_img, x) + image
        x1 = conv_nhwc(self.conv1, x) * torch.sigmoid(conv_nhwc(self.conv2, image))
        return x1 + x, image


class MaximStage(nn.Module):
    """One UNet of MAXIM: multi-scale inputs, encoder, bottleneck, cross-gated skips, decoder, per-scale images."""

    def __init__(self, in_chans: int, features: int, depth: int, num_groups: int, num_bottleneck_blocks: int,
                 scales: int, sizes: list[tuple[tuple[int, int], tuple[int, int]]], lr_size: tuple[int, int],
                 first: bool, last: bool, **kw) -> None:
        super().__init__()
        dims = [features * 2**i for i in range(depth)]
        ipf = kw["input_proj_factor"]
        self.input_convs = nn.ModuleList(nn.Conv2d(in_chans, dims[i], 3, padding=1) for i in range(scales))
        self.input_fuse = None if first else nn.ModuleList(
            MaximCrossGating(dims[i], dims[i], dims[i], *sizes[i], False, ipf) for i in range(scales))
        self.encoders = nn.ModuleList(
            MaximEncoder((dims[i - 1] if i else dims[0]) + (dims[i] if i < scales else 0), dims[i], num_groups,
                         *sizes[i], cross_gate=not first, **kw) for i in range(depth))
        self.bottleneck = nn.ModuleList(MaximBottleneck(dims[-1], num_groups, lr_size, **kw)
                                        for _ in range(num_bottleneck_blocks))
        self.skip_resize = nn.ModuleList(
            nn.ModuleList(MaximResize(dims[j], dims[i], 2.0 ** (j - i)) for j in range(depth)) for i in range(depth))
        self.skip_gates = nn.ModuleList(
            MaximCrossGating(depth * dims[i], dims[min(i + 1, depth - 1)], dims[i], *sizes[i], True, ipf)
            for i in range(depth))
        levels = list(reversed(range(depth)))  # the skip features come deepest first
        self.dec_resize = nn.ModuleList(
            nn.ModuleList(MaximResize(dims[lv], dims[i], 2.0 ** (lv - i)) for lv in levels) for i in range(depth))
        self.decoders = nn.ModuleList(
            MaximDecoder(dims[min(i + 1, depth - 1)], dims[i], depth * dims[i], num_groups, *sizes[i], **kw)
            for i in range(depth))
        self.sams = None if last else nn.ModuleList(MaximSAM(dims[i], in_chans) for i in range(scales))
        self.output_convs = nn.ModuleList(nn.Conv2d(dims[i], in_chans, 3, padding=1)
                                          for i in range(scales)) if last else None

    def forward(self, shortcuts: list[Tensor], sams_prev: list[Tensor], encs_prev: list[Tensor],
                decs_prev: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], Tensor]:
        """Channels-last maps per level (0 = full resolution) in and out: images, SAM features, encoder and decoder
        features, and the last decoder's full-resolution map."""
        depth = len(self.encoders)
        x_scales = []
        for i, conv in enumerate(self.input_convs):
            xs = conv_nhwc(conv, shortcuts[i])
            if self.input_fuse is not None:
                xs = self.input_fuse[i](xs, sams_prev[i])[0]
            x_scales.append(xs)
        x, encs = x_scales[0], []
        for i, encoder in enumerate(self.encoders):
            skip = x_scales[i] if i < len(x_scales) else None
            if self.input_fuse is None:
                x, bridge = encoder(x, skip)
            else:
                x, bridge = encoder(x, skip, encs_prev[i], decs_prev[i])
            encs.append(bridge)
        for block in self.bottleneck:
            x = block(x)
        y, skips = x, [x] * depth
        for i in reversed(range(depth)):
            signal = torch.cat([r(e) for r, e in zip(self.skip_resize[i], encs)], dim=-1)
            skips[i], y = self.skip_gates[i](signal, y)
        deep_first = skips[::-1]
        images, sams, decs = [x] * len(self.input_convs), [x] * len(self.input_convs), [x] * depth
        for i in reversed(range(depth)):
            signal = torch.cat([r(s) for r, s in zip(self.dec_resize[i], deep_first)], dim=-1)
            x = self.decoders[i](x, signal)
            decs[i] = x
            if i < len(self.input_convs):
                if self.sams is not None:
                    sams[i], images[i] = self.sams[i](x, shortcuts[i])
                else:
                    images[i] = conv_nhwc(self.output_convs[i], x) + shortcuts[i]
        return images, sams, encs, decs, x


class MAXIM(Backbone):
    """MAXIM: ``num_stages`` UNets of multi-axis gated MLP and channel-attention blocks; the output is an image.

    Args:
        features: width at full resolution (doubled per level, ``depth`` levels).
        num_stages: UNets in sequence (MAXIM-2S, -3S); num_groups: (MLP, channel attention) pairs per block.
        num_supervision_scales: scales (full, 1/2, 1/4) that take a resized copy of the input and give an image.
        block_size_hr, grid_size_hr: block and grid of the first ``high_res_stages`` levels; the lower levels and
            the bottleneck use ``block_size_lr`` for both (as the official code does).
        num_classes, drop_rate, drop_path_rate: taken for the common ``create_model`` interface and ignored (no
            classifier, no dropout in the published models).
    """

    output = "image"
    kind = "hybrid"
    min_input_size = 64  # for the published block and grid sizes; set per instance
    input_multiple = 64
    first_conv = "stages.0.input_convs.0"
    classifier = ()  # no classifier modules

    def __init__(self, features: int = 32, depth: int = 3, num_stages: int = 3, num_groups: int = 2,
                 num_bottleneck_blocks: int = 2, num_supervision_scales: int = 3, high_res_stages: int = 2,
                 block_size_hr: tuple[int, int] = (16, 16), block_size_lr: tuple[int, int] = (8, 8),
                 grid_size_hr: tuple[int, int] = (16, 16), factor: int = 2, input_proj_factor: int = 2,
                 channels_reduction: int = 4, *, in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not 1 <= num_supervision_scales <= depth:
            raise ValueError(f"maxim: num_supervision_scales must be in 1..depth={depth}, got {num_supervision_scales}")
        self.in_chans = in_chans
        # every level's map must hold whole blocks and grids: level i has stride 2**i, the bottleneck 2**depth
        sides = [s * 2**i for i in range(depth) for s in (*(block_size_hr if i < high_res_stages else block_size_lr),
                                                          *(grid_size_hr if i < high_res_stages else block_size_lr))]
        self.min_input_size = self.input_multiple = math.lcm(*sides, *(s * 2**depth for s in block_size_lr))
        self.num_supervision_scales = num_supervision_scales
        sizes = [(block_size_hr, grid_size_hr) if i < high_res_stages else (block_size_lr, block_size_lr)
                 for i in range(depth)]
        kw = dict(factor=factor, input_proj_factor=input_proj_factor, reduction=channels_reduction)
        self.stages = nn.ModuleList(
            MaximStage(in_chans, features, depth, num_groups, num_bottleneck_blocks, num_supervision_scales, sizes,
                       block_size_lr, s == 0, s == num_stages - 1, **kw) for s in range(num_stages))
        self.num_features = features
        self.set_feature_info([FeatureInfo(features, 1, f"stages.{s}") for s in range(num_stages)])
        self.apply(_init_weights)
        for m in self.modules():
            if isinstance(m, MaximSpatialGating) and not m.grid_mix.mix.bias.is_meta:
                nn.init.ones_(m.grid_mix.mix.bias)  # as the official cross-gating weights start
                nn.init.ones_(m.block_mix.mix.bias)

    def _run(self, x: Tensor, upto: int | None = None) -> tuple[list[list[Tensor]], list[Tensor]]:
        """Images of every stage and scale, and each stage's last decoder map, all channels-last."""
        x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        shortcuts = [x] + [F.interpolate(x.permute(0, 3, 1, 2), scale_factor=0.5**i, mode="nearest-exact")
                           .permute(0, 2, 3, 1) for i in range(1, self.num_supervision_scales)]
        sams, encs, decs, images, feats = [], [], [], [], []
        for stage in self.stages[:upto]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                out = checkpoint(stage, shortcuts, sams, encs, decs, use_reentrant=False)
            else:
                out = stage(shortcuts, sams, encs, decs)
            imgs, sams, encs, decs, feat = out
            images.append(imgs)
            feats.append(feat)
        return images, feats

    def forward_all(self, x: Tensor) -> list[list[Tensor]]:
        """``[stage][scale]`` NCHW images (scale 0 = full resolution), the multi-stage, multi-scale training targets."""
        self.check_input(x)
        images, _ = self._run(x)
        return [[img.permute(0, 3, 1, 2) for img in stage] for stage in images]  # (B, H, W, C) -> (B, C, H, W)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last UNet's full-resolution decoder map ``(B, features, H, W)``."""
        self.check_input(x)
        return self._run(x)[1][-1].permute(0, 3, 1, 2)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """The full-resolution decoder map of each chosen UNet stage, NCHW."""
        idx = resolve_indices(indices, len(self.stages), self.name)
        self.check_input(x)
        feats = self._run(x, idx[-1] + 1)[1]
        return [feats[i].permute(0, 3, 1, 2) for i in idx]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """The restored image ``(B, in_chans, H, W)``: the last stage's full-resolution output."""
        if self.out_indices is not None:
            return self.forward_intermediates(x, self.out_indices)
        self.check_input(x)
        return self._run(x)[0][-1][0].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)

    # --- checkpoints ------------------------------------------------------------------------------------
    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """The official Flax parameter tree, flattened with "." (``stage_0_encoder_block_1.Conv_0.kernel``), to our
        keys and layouts (Dense/1x1 kernels transposed, conv kernels to OIHW, transposed-conv kernels to IOHW and
        flipped, LayerNorm ``scale`` -> ``weight``). Keys already in our layout pass unchanged."""
        if not any(k.endswith((".kernel", ".scale")) for k in state_dict):
            return dict(state_dict)
        depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"stage_\d+_encoder_block_(\d+)\.", k)))
        out = {}
        for key, value in state_dict.items():
            path, leaf = _flax_path(key.split(".")[:-1], depth), key.split(".")[-1]
            if leaf == "kernel":
                if value.ndim == 2:
                    value = value.T
                elif value.shape[0] == value.shape[1] == 1 and not path.endswith((".up", ".up_y")):
                    value = value[0, 0].T  # a 1x1 conv is an nn.Linear here
                elif path.endswith((".up", ".up_y")):
                    value = value.permute(2, 3, 0, 1).flip(2, 3)  # (kh, kw, in, out) -> (in, out, kh, kw)
                else:
                    value = value.permute(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
            out[f"{path}.{'bias' if leaf == 'bias' else 'weight'}"] = value.contiguous()
        return out


_TOP = [(r"stage_(\d+)_input_conv_(\d+)", r"stages.\1.input_convs.\2", "conv"),
        (r"stage_(\d+)_input_fuse_sam_(\d+)", r"stages.\1.input_fuse.\2", "cgb"),
        (r"stage_(\d+)_encoder_block_(\d+)", r"stages.\1.encoders.\2", "enc"),
        (r"stage_(\d+)_global_block_(\d+)", r"stages.\1.bottleneck.\2", "bottleneck"),
        (r"stage_(\d+)_cross_gating_block_(\d+)", r"stages.\1.skip_gates.\2", "cgb"),
        (r"stage_(\d+)_decoder_block_(\d+)", r"stages.\1.decoders.\2", "dec"),
        (r"stage_(\d+)_supervised_attention_module_(\d+)", r"stages.\1.sams.\2", "sam"),
        (r"stage_(\d+)_output_conv_(\d+)", r"stages.\1.output_convs.\2", "conv")]
# (parent kind, Flax child name pattern) -> (our child name, child kind)
_CHILD = {
    "enc": [(r"Conv_0", "proj", "leaf"), (r"Conv_1", "down", "leaf"), (r"cross_gating_block", "cross_gate", "cgb"),
            (r"SplitHeadMultiAxisGmlpLayer_(\d+)", r"blocks.\1.mab", "mab"),
            (r"channel_attention_block_1(\d+)", r"blocks.\1.cab", "rcab")],
    "bottleneck": [(r"input_proj", "proj", "leaf"), (r"SplitHeadMultiAxisGmlpLayer_(\d+)", r"blocks.\1.mab", "mab"),
                   (r"channel_attention_block_1_(\d+)", r"blocks.\1.cab", "rdcab")],
    "dec": [(r"ConvTranspose_0", "up", "leaf"), (r"UNetEncoderBlock_0", "block", "enc")],
    "mab": [(r"LayerNorm_in", "norm", "leaf"), (r"in_project", "in_proj", "leaf"), (r"out_project", "out_proj", "leaf"),
            (r"GridGmlpLayer", "grid", "gmlp"), (r"BlockGmlpLayer", "block", "gmlp")],
    "gmlp": [(r"LayerNorm", "norm", "leaf"), (r"in_project", "in_proj", "leaf"), (r"out_project", "out_proj", "leaf"),
             (r"(Grid|Block)GatingUnit", "", "gate")],
    "gate": [(r"intermediate_layernorm", "gate_norm", "leaf"), (r"Dense_0", "gate.mix", "leaf")],
    "rcab": [(r"LayerNorm", "norm", "leaf"), (r"conv1", "conv1", "leaf"), (r"conv2", "conv2", "leaf"),
             (r"channel_attention", "ca", "ca")],
    "rdcab": [(r"LayerNorm", "norm", "leaf"), (r"channel_mixing", "", "mlp"), (r"channel_attention", "ca", "ca")],
    "mlp": [(r"Dense_0", "fc1", "leaf"), (r"Dense_1", "fc2", "leaf")],
    "ca": [(r"Conv_0", "reduce", "leaf"), (r"Conv_1", "expand", "leaf")],
    "cgb": [(r"ConvTranspose_0", "up_y", "leaf"), (r"Conv_0", "proj_x", "leaf"), (r"Conv_1", "proj_y", "leaf"),
            (r"LayerNorm_(x|y)", r"norm_\1", "leaf"), (r"in_project_(x|y)", r"in_proj_\1", "leaf"),
            (r"out_project_(x|y)", r"out_proj_\1", "leaf"), (r"SplitHeadMultiAxisGating_(x|y)", r"gate_\1", "sgw")],
    "sgw": [(r"LayerNorm_in", "norm", "leaf"), (r"in_project", "in_proj", "leaf"), (r"out_project", "out_proj", "leaf"),
            (r"Dense_0", "grid_mix.mix", "leaf"), (r"Dense_1", "block_mix.mix", "leaf")],
    "sam": [(r"Conv_0", "conv1", "leaf"), (r"Conv_1", "conv_img", "leaf"), (r"Conv_2", "conv2", "leaf")],
}


def _flax_path(parts: list[str], depth: int) -> str:
    """Our module path for a Flax module path (its names, outermost first)."""
    head, rest = parts[0], parts[1:]
    if m := re.fullmatch(r"UpSampleRatio_(\d+)", head):  # numbered in creation order: per stage, skips then decoder
        stage, r = divmod(int(m.group(1)), 2 * depth * depth)
        section, r = divmod(r, depth * depth)
        level, j = depth - 1 - r // depth, r % depth
        return f"stages.{stage}.{'dec_resize' if section else 'skip_resize'}.{level}.{j}.proj"
    match = next(((p, r, k) for p, r, k in _TOP if re.fullmatch(p, head)), None)
    if match is None:
        raise ValueError(f"maxim.remap: unknown Flax module {head!r}")
    path, kind = re.sub(match[0], match[1], head), match[2]
    for name in rest:
        for pattern, repl, child in _CHILD.get(kind, []):
            if re.fullmatch(pattern, name):
                sub = re.sub(pattern, repl, name) if repl else ""
                path, kind = (f"{path}.{sub}" if sub else path), child
                break
        else:
            raise ValueError(f"maxim.remap: unknown Flax module {name!r} under {path!r}")
    return path


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear) and not m.weight.is_meta:
        nn.init.normal_(m.weight, std=0.02)  # the official Dense init
        nn.init.zeros_(m.bias)


_README = ("official README results table (PSNR on the task's test set); the README's FLOPs (216 G for 2S, 339 G "
           "for 3S; counting convention not stated) are not MACs: ours at 256 px: 96.7 / 152.1 GMACs")
_IMG = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0, input_size=256)
_S2, _S3 = dict(num_stages=2), dict(num_stages=3)


def _paper(params_m: float, psnr: str) -> Paper:
    return Paper(params_m, None, None, f"{_README}: {psnr}")


VARIANTS = {
    "maxim_test":         Variant(dict(features=8, depth=2, num_stages=2, num_groups=1, num_bottleneck_blocks=1,
                                       num_supervision_scales=1, block_size_hr=(2, 2), block_size_lr=(2, 2),
                                       grid_size_hr=(2, 2)),
                                  params_m=0.08731, input_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                  crop_pct=1.0),
    "maxim_s3_denoise":   Variant(_S3, params_m=22.212795, paper=_paper(22.2, "SIDD 39.96 dB"),
                                  notes="MAXIM-3S, SIDD denoising weights", **_IMG),
    "maxim_s3_deblur":    Variant(_S3, params_m=22.212795, paper=_paper(22.2, "GoPro 32.86 dB"),
                                  notes="MAXIM-3S, GoPro deblurring weights", **_IMG),
    "maxim_s2_derain":    Variant(_S2, params_m=14.176178, paper=_paper(14.1, "Rain13k 33.24 dB"),
                                  notes="MAXIM-2S, Rain13k deraining weights", **_IMG),
    "maxim_s2_dehaze":    Variant(_S2, params_m=14.176178,
                                  paper=_paper(14.1, "RESIDE-Indoor 38.11 dB"),
                                  notes="MAXIM-2S, SOTS-Indoor dehazing weights", **_IMG),
    "maxim_s2_enhance":   Variant(_S2, params_m=14.176178, paper=_paper(14.1, "LOL 23.43 dB"),
                                  notes="MAXIM-2S, LOL low-light enhancement weights", **_IMG),
}
register_family(MAXIM, VARIANTS, paper="arXiv:2201.02973", kind="hybrid",
                code="google-research/maxim@3c8265171ffccc80c3c9124844aef0d381609956 maxim/models/maxim.py")
