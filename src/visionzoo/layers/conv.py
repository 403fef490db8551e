"""Convolution helpers: BatchNorm and layer-scale folding for deploy forms."""
from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a conv with bias that computes ``bn(conv(x))`` in eval mode."""
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_(beta + (bias - bn.running_mean) * scale)
    return fused


@torch.no_grad()
def fold_channel_scale(layer: nn.Module, scale: Tensor) -> None:
    """Fold a per-output-channel ``scale`` (a layer scale ``gamma``, any shape with ``out`` elements) into the
    ``nn.Linear`` or ``nn.Conv2d`` whose output it multiplies, in place: ``layer(x) * scale`` becomes ``layer(x)``.
    A block's ``fuse()`` calls it and drops its ``gamma``, which saves a multiply per block and leaves graph
    compilers (oneDNN Graph) a plain linear/conv."""
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"fold_channel_scale: expected nn.Linear or nn.Conv2d, got {type(layer).__name__}")
    out = layer.weight.shape[0]
    s = scale.detach().reshape(-1).to(layer.weight.dtype)
    if s.numel() != out:
        raise ValueError(f"fold_channel_scale: {s.numel()} scales for a layer with {out} output channels")
    layer.weight.mul_(s.view(-1, *([1] * (layer.weight.dim() - 1))))
    if layer.bias is not None:
        layer.bias.mul_(s)


def fold_conv_bn_children(m: nn.Module) -> int:
    """Fold each Conv2d followed by a BatchNorm2d among ``m``'s direct children, in place; returns how many.

    Pairs are adjacent children of an ``nn.Sequential``, and attribute pairs that a module declares in a
    ``fuse_pairs`` class attribute, e.g. ``(("conv1", "bn1"), ("conv2", "bn2"))``. The BatchNorm becomes
    ``nn.Identity``.
    """
    count = 0
    for conv_name, bn_name in getattr(m, "fuse_pairs", ()):
        conv, bn = getattr(m, conv_name, None), getattr(m, bn_name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(m, conv_name, fold_bn(conv, bn))
            setattr(m, bn_name, nn.Identity())
            count += 1
    if isinstance(m, nn.Sequential):
        keys = list(m._modules)
        for a, b in zip(keys, keys[1:]):
            conv, bn = m._modules[a], m._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                m._modules[a] = fold_bn(conv, bn)
                m._modules[b] = nn.Identity()
                count += 1
    return count


def fuse_conv_bn_pairs(module: nn.Module) -> int:
    """``fold_conv_bn_children`` on ``module`` and every module below it; returns how many pairs were folded."""
    return sum(fold_conv_bn_children(m) for m in list(module.modules()))


@torch.no_grad()
def fold_bn_into_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """Return a conv with bias that computes ``conv(bn(x))`` in eval mode; ``conv`` must have no padding."""
    pad = conv.padding
    if not (pad == "valid" or (isinstance(pad, tuple) and all(p == 0 for p in pad))):
        raise ValueError(f"fold_bn_into_conv: the conv has padding {conv.padding}; a BatchNorm before a padded "
                         f"conv does not fold exactly (only padding 0, e.g. a 1x1 conv)")
    if bn.num_features != conv.in_channels:
        raise ValueError(f"fold_bn_into_conv: BatchNorm has {bn.num_features} channels, the conv takes "
                         f"{conv.in_channels}")
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    shift = beta - bn.running_mean * scale
    out_ch, in_per_group = conv.out_channels, conv.in_channels // conv.groups
    # the input channel that weight[o, j] reads: group(o) * in_per_group + j
    scale_w = scale.view(conv.groups, 1, in_per_group).expand(-1, out_ch // conv.groups, -1).reshape(out_ch, -1)
    shift_w = shift.view(conv.groups, 1, in_per_group).expand(-1, out_ch // conv.groups, -1).reshape(out_ch, -1)
    fused = nn.Conv2d(conv.in_channels, out_ch, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale_w[:, :, None, None])
    bias = conv.bias if conv.bias is not None else torch.zeros_like(fused.bias)
    fused.bias.copy_(bias + (conv.weight.sum((2, 3)) * shift_w).sum(1))
    return fused
