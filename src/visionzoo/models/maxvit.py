"""MaxViT, from "MaxViT: Multi-Axis Vision Transformer" (Tu et al., 2022). https://arxiv.org/abs/2204.01697

Every block is an MBConv (pre-norm BN, 1x1 expand, 3x3 depthwise, squeeze-excite, 1x1 project), then block attention
(non-overlapping P x P windows) and grid attention (a G x G grid of tokens strided over the whole map), each followed
by an MLP, with a learned TF-style 2-D relative position bias per head.

Differs from the paper: none at the size a model is built for. The window and the grid are ``img_size // 32`` (7 at
224 px, 12 at 384 px), as in the official code and timm. Other input sizes (any multiple of 32) are handled by
padding, not by changing the windows: a map that is not a multiple of the window (grid) is zero-padded on the bottom
and right after the first norm, the padded tokens are masked out as keys (so they change nothing for the real
tokens, apart from where window and grid boundaries fall), and the output is cropped. timm and the official code
accept only multiples of the window there. Building a model for another ``img_size`` changes the windows;
checkpoint tables of another window size are then resampled bilinearly on load (``adapt_state_dict``; timm uses a
geometric-progression interpolation instead). Convolutions with stride 2 pad like TensorFlow's "SAME" (bottom and
right), as the ported weights need. Weight init is simpler than timm's (truncated normal for linear layers).

Follows timm's ``maxxvit.py`` (Apache-2.0, its ``maxvit_*_tf_*`` configs), whose state-dict keys we keep, so timm
checkpoints of these models load as they are; those are ports of google-research/maxvit (Apache-2.0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    PARTITIONS,
    Attention,
    DropPath,
    LayerType,
    Mlp,
    drop_path_rates,
    fold_bn_into_conv,
    get_act,
    is_meta,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["MaxViT"]

BN_EPS = 1e-3  # TF's BatchNorm epsilon, which the ported weights were trained with
LN_EPS = 1e-5


@trace_leaf
def pad_same(x: Tensor, kernel: int, stride: int) -> Tensor:
    """Zero-pad an NCHW map like TensorFlow's "SAME" for a ``kernel`` / ``stride`` conv (the extra pixel goes last)."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x




@trace_leaf
def pad_to_multiple(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-pad an NHWC map on the bottom and right to a multiple of ``size``; ``x`` itself when it is one."""
    pad_h, pad_w = -x.shape[1] % size[0], -x.shape[2] % size[1]
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x  # (B, H, W, C) -> (B, Hp, Wp, C)


@trace_leaf
def partition_key_mask(x: Tensor, padded: Tensor, partition: str, size: tuple[int, int]) -> Tensor | None:
    """``(nW, 1, 1, N)``, additive: 0 for the real tokens of ``x``, -inf for the padding of ``padded``, grouped like
    the partition (``"block"`` or ``"grid"``); ``None`` when nothing was padded. Follows the input's dtype/device."""
    (H, W), (Hp, Wp) = x.shape[1:3], padded.shape[1:3]
    if (H, W) == (Hp, Wp):
        return None
    valid = torch.zeros(1, Hp, Wp, 1, device=x.device, dtype=x.dtype)
    valid[:, :H, :W] = 1.0
    valid = PARTITIONS[partition][0](valid, size)[..., 0]  # (1, Hp, Wp, 1) -> (nW, N)
    mask = torch.zeros_like(valid).masked_fill(valid == 0, float("-inf"))
    return mask[:, None, None, :]


@trace_leaf
def masked_bias(bias: Tensor, key_mask: Tensor | None, windows: int) -> Tensor:
    """The position bias ``(1, heads, N, N)`` plus a per-window key mask ``(nW, 1, 1, N)`` for all ``windows``
    (batch x nW) partitions: ``(windows, heads, N, N)``; the bias as it is without a mask."""
    if key_mask is None:
        return bias
    nW, N = key_mask.shape[0], bias.shape[-1]
    mask = (bias + key_mask).expand(windows // nW, -1, -1, -1, -1)  # (B, nW, heads, N, N)
    return mask.reshape(-1, bias.shape[1], N, N)  # -> (B * nW, heads, N, N)


class MaxViTStem(nn.Module):
    """3x3/2 conv (TF "SAME" padding), BN, GELU, 3x3 conv: stride 2."""

    fuse_pairs = (("conv1", "norm1"),)

    def __init__(self, in_chans: int, width: int, act_layer: LayerType = "gelu_tanh") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=2)
        self.norm1 = nn.BatchNorm2d(width, eps=BN_EPS)
        self.act1 = get_act(act_layer)()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.norm1(self.conv1(pad_same(x, 3, 2))))
        return self.conv2(x)


class MaxViTSqueezeExcite(nn.Module):
    """Channel gate: global mean, 1x1 conv, SiLU, 1x1 conv, sigmoid."""

    def __init__(self, dim: int, rd_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, rd_dim, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(rd_dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class MaxViTDownsample(nn.Module):
    """Shortcut of a strided MBConv: 2x2 average pool, then a 1x1 conv when the width changes."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.expand = nn.Conv2d(dim, out_dim, 1) if dim != out_dim else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.expand(self.pool(x))


class MaxViTMBConv(nn.Module):
    """Pre-norm inverted bottleneck: BN, 1x1 expand, BN/GELU, 3x3 depthwise (strided), BN/GELU, SE, 1x1 project."""

    fuse_pairs = (("conv1_1x1", "norm1"), ("conv2_kxk", "norm2"))  # folded by Backbone.fuse before fuse() below

    def __init__(self, dim: int, out_dim: int, stride: int = 1, expand_ratio: float = 4.0, se_ratio: float = 0.25,
                 drop_path: float = 0.0, act_layer: LayerType = "gelu_tanh") -> None:
        super().__init__()
        mid = int(out_dim * expand_ratio)
        self.stride = stride
        if stride > 1:
            self.shortcut = MaxViTDownsample(dim, out_dim)
        else:
            assert dim == out_dim, "an MBConv without stride keeps its width"
            self.shortcut = nn.Identity()
        act = get_act(act_layer)
        self.pre_norm = nn.BatchNorm2d(dim, eps=BN_EPS)
        self.conv1_1x1 = nn.Conv2d(dim, mid, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.act1 = act()
        # NOTE: padded in forward (TF "SAME") when strided, so that fuse() can fold norm2 into a plain conv
        self.conv2_kxk = nn.Conv2d(mid, mid, 3, stride=stride, padding=0 if stride > 1 else 1, groups=mid, bias=False)
        self.norm2 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.act2 = act()
        self.se = MaxViTSqueezeExcite(mid, int(out_dim * se_ratio))
        self.conv3_1x1 = nn.Conv2d(mid, out_dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def fuse(self) -> None:
        """Fold the pre-norm BN into the 1x1 expansion conv that follows it (exact: a 1x1 conv has no padding)."""
        if isinstance(self.pre_norm, nn.BatchNorm2d):
            self.conv1_1x1 = fold_bn_into_conv(self.pre_norm, self.conv1_1x1)
            self.pre_norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.shortcut(x)
        x = self.act1(self.norm1(self.conv1_1x1(self.pre_norm(x))))
        if self.stride > 1:
            x = pad_same(x, 3, self.stride)
        x = self.act2(self.norm2(self.conv2_kxk(x)))
        x = self.conv3_1x1(self.se(x))
        return self.drop_path(x) + shortcut


class MaxViTRelPosBias(nn.Module):
    """TF-style relative position bias: a ``(heads, 2*wh-1, 2*ww-1)`` table indexed by (key - query) offsets."""

    def __init__(self, window: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        wh, ww = window
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_heads, 2 * wh - 1, 2 * ww - 1))
        coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
        rel = coords[:, None, :] - coords[:, :, None]  # key - query: (2, 1, N) - (2, N, 1) -> (2, N, N)
        index = (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)
        self.register_buffer("index", index, persistent=False)

    def forward(self) -> Tensor:
        N = self.index.shape[0]
        bias = self.relative_position_bias_table.flatten(1).index_select(1, self.index.view(-1))  # (heads, N * N)
        return bias.view(1, -1, N, N)  # -> (1, heads, N, N)


class MaxViTAttention(Attention):
    """Multi-head attention inside each window (or grid group), plus the relative position bias and a key mask."""

    def __init__(self, dim: int, window: tuple[int, int], dim_head: int = 32, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__(dim, dim // dim_head, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
        self.window = window
        self.rel_pos = MaxViTRelPosBias(window, self.num_heads)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``x``: ``(B * nW, N, C)``; ``key_mask``: ``(nW, 1, 1, N)``, additive, -inf on padded tokens, or None."""
        bias = masked_bias(self.rel_pos(), key_mask, x.shape[0])
        return super().forward(x, attn_mask=bias, grid=self.window)  # queries: a window (grid group) of wh x ww


class MaxViTPartitionAttention(nn.Module):
    """Pre-norm block on an NHWC map: attention within windows (``"block"``) or grid groups (``"grid"``), then MLP."""

    def __init__(self, dim: int, partition: str, size: tuple[int, int], dim_head: int = 32, mlp_ratio: float = 4.0,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: LayerType = "gelu_tanh") -> None:
        super().__init__()
        assert partition in PARTITIONS, partition
        self.size = size
        self.kind = partition
        self.partition, self.reverse = PARTITIONS[partition]
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = MaxViTAttention(dim, size, dim_head, attn_drop, proj_drop)
        self.attn.core.partition = partition  # where recorded maps sit on the image (visionzoo.explain)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attend(self, x: Tensor) -> Tensor:
        H, W = x.shape[1], x.shape[2]
        padded = pad_to_multiple(x, self.size)  # (B, H, W, C) -> (B, Hp, Wp, C); x itself when H, W fit
        key_mask = partition_key_mask(x, padded, self.kind, self.size)  # None when nothing was padded
        x = self.attn(self.partition(padded, self.size), key_mask)  # (B * nW, N, C)
        return self.reverse(x, self.size, padded.shape[1], padded.shape[2])[:, :H, :W]  # -> (B, H, W, C)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attend(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MaxViTBlock(nn.Module):
    """MBConv (NCHW), then block attention and grid attention (NHWC)."""

    def __init__(self, dim: int, out_dim: int, stride: int, window: tuple[int, int], grid: tuple[int, int],
                 dim_head: int = 32, mlp_ratio: float = 4.0, expand_ratio: float = 4.0, se_ratio: float = 0.25,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: LayerType = "gelu_tanh") -> None:
        super().__init__()
        self.conv = MaxViTMBConv(dim, out_dim, stride, expand_ratio, se_ratio, drop_path, act_layer)
        kw = dict(dim_head=dim_head, mlp_ratio=mlp_ratio, attn_drop=attn_drop, proj_drop=proj_drop,
                  drop_path=drop_path, act_layer=act_layer)
        self.attn_block = MaxViTPartitionAttention(out_dim, "block", window, **kw)
        self.attn_grid = MaxViTPartitionAttention(out_dim, "grid", grid, **kw)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        x = self.attn_grid(self.attn_block(x))
        return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


class MaxViTStage(nn.Module):
    """``depth`` MaxViT blocks; the first one halves the map (strided depthwise conv, pooled shortcut)."""

    def __init__(self, dim: int, out_dim: int, depth: int, drop_path: list[float], **kw) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[
            MaxViTBlock(dim if i == 0 else out_dim, out_dim, 2 if i == 0 else 1, drop_path=drop_path[i], **kw)
            for i in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class MaxViT(Backbone):
    """MaxViT: a stride-2 conv stem, then four stages of MBConv + block attention + grid attention blocks.

    Args:
        img_size: the input size the windows are fixed for (window = grid = img_size // 32 unless given);
            other multiples of 32 work by padding.
        dims: channels of each stage.
        stem_width: channels of the stem.
        dim_head: channels per attention head (heads = stage width // dim_head).
        window_size, grid_size: the block-attention window and the grid-attention grid side.
        head_hidden_size: width of the pre-logits layer in the head (the last stage width when None).
    """

    kind = "hybrid"
    has_attention = True
    takes_img_size = True
    cpu_channels_last = True  # oneDNN convs are faster on NHWC (see Backbone)
    min_input_size = 32
    input_multiple = 32
    no_weight_decay_keys = ("relative_position_bias_table",)
    first_conv = "stem.conv1"

    def __init__(self, depths: tuple[int, ...] = (2, 2, 5, 2), dims: tuple[int, ...] = (64, 128, 256, 512),
                 stem_width: int = 64, dim_head: int = 32, img_size: int = 224, window_size: int | None = None,
                 grid_size: int | None = None, mlp_ratio: float = 4.0, expand_ratio: float = 4.0,
                 se_ratio: float = 0.25, head_hidden_size: int | None = None, act_layer: LayerType = "gelu_tanh", *,
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"maxvit: depths {tuple(depths)} and dims {tuple(dims)} must be non-empty and of equal "
                             f"length (one entry per stage)")
        if any(d % dim_head for d in dims):
            raise ValueError(f"maxvit: every stage width in dims {tuple(dims)} must be a multiple of dim_head "
                             f"{dim_head}")
        partition = img_size // 32
        window_size, grid_size = window_size or partition, grid_size or partition
        if window_size < 1 or grid_size < 1:
            raise ValueError(f"maxvit: window_size and grid_size must be >= 1 (img_size // 32 by default), got "
                             f"{window_size} and {grid_size} for img_size={img_size}")
        self.in_chans = in_chans
        self.window_size, self.grid_size = (window_size, window_size), (grid_size, grid_size)
        self.stem = MaxViTStem(in_chans, stem_width, act_layer)
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        kw = dict(window=self.window_size, grid=self.grid_size, dim_head=dim_head, mlp_ratio=mlp_ratio,
                  expand_ratio=expand_ratio, se_ratio=se_ratio, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate,
                  act_layer=act_layer)
        stages, infos, in_dim = [], [], stem_width
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            stages.append(MaxViTStage(in_dim, dim, depth, dpr[i], **kw))
            infos.append(FeatureInfo(dim, 4 * 2**i, f"stages.{i}"))
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.set_feature_info(infos)
        # timm's NormMlpClassifierHead: average pool, LayerNorm, Linear + tanh (pre-logits), dropout, Linear
        hidden = head_hidden_size or dims[-1]
        pre_logits = nn.Sequential()
        pre_logits.add_module("fc", nn.Linear(dims[-1], hidden))
        pre_logits.add_module("act", nn.Tanh())
        self.init_head(dims[-1], num_classes, drop_rate, norm_layer=nn.LayerNorm, pre_logits=pre_logits,
                       hidden_size=hidden)  # nn.LayerNorm: eps = LN_EPS
        self.apply(_init_weights)

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resample relative position tables made for another window (grid) size, bilinearly."""
        own = self.state_dict()
        out = dict(state_dict)
        for k, v in state_dict.items():
            if k.endswith("relative_position_bias_table") and k in own and v.shape != own[k].shape and v.ndim == 3:
                out[k] = F.interpolate(v[None].float(), size=own[k].shape[-2:], mode="bilinear",
                                       align_corners=True)[0].to(v.dtype)
        return out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, MaxViTRelPosBias):
        if not m.relative_position_bias_table.is_meta:
            nn.init.normal_(m.relative_position_bias_table, std=0.02)
    elif is_meta(m):
        return
    elif isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_README = "official README ImageNet-1K table (google-research/maxvit), 224 px, TF"
_TIMM = dict(crop_pct=0.95, interpolation="bicubic")  # timm's pretrained cfg for maxvit_*_tf_224.in1k
_MACS = "gmacs: timm 1.0.31 counted by visionzoo.profile (SDPA included; its one-hot einsum bias lookup adds ~0.1%)"

VARIANTS = {
    "maxvit_test": Variant(dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), stem_width=16, dim_head=16),
                           input_size=64, notes="tiny config for tests (window = grid = 2 at 64 px)"),
    "maxvit_tiny_tf_224": Variant(dict(depths=(2, 2, 5, 2), dims=(64, 128, 256, 512), stem_width=64),
                                  params_m=30.916528, gmacs=5.552, paper=Paper(31, 5.6, 83.62, _README), **_TIMM,
                                  notes=f"timm maxvit_tiny_tf_224.in1k (TF port) evaluates to 83.426; {_MACS}"),
    "maxvit_small_tf_224": Variant(dict(depths=(2, 2, 5, 2), dims=(96, 192, 384, 768), stem_width=64),
                                   params_m=68.927956, gmacs=11.589, paper=Paper(69, 11.7, 84.45, _README), **_TIMM,
                                   notes=f"timm maxvit_small_tf_224.in1k (TF port) evaluates to 84.452; {_MACS}"),
    "maxvit_base_tf_224": Variant(dict(depths=(2, 6, 14, 2), dims=(96, 192, 384, 768), stem_width=64),
                                  params_m=119.467708, gmacs=23.922, paper=Paper(119, 24.2, 84.95, _README), **_TIMM,
                                  notes=f"timm maxvit_base_tf_224.in1k (TF port) evaluates to 84.884; {_MACS}"),
    "maxvit_large_tf_224": Variant(dict(depths=(2, 6, 14, 2), dims=(128, 256, 512, 1024), stem_width=128),
                                   params_m=211.78556, gmacs=43.520, paper=Paper(212, 43.9, 85.17, _README), **_TIMM,
                                   notes=f"timm maxvit_large_tf_224.in1k (TF port) evaluates to 84.938; {_MACS}"),
}
register_family(MaxViT, VARIANTS, paper="arXiv:2204.01697", kind="hybrid", family="maxvit")
