"""Swin Transformer, from "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (Liu et al.,
2021). https://arxiv.org/abs/2103.14030

Differs from the paper: none at the size a model is built for. Each stage's window and shift are fixed at
construction from ``img_size``, as in the official code: a stage whose map is not larger than the window uses one
window covering the whole map and no shift. Other input sizes (any multiple of 32) are handled by padding, not by
interpolating the relative position tables: each block rolls its map, zero-pads it on the bottom and right to a
multiple of its window, builds the shifted-window mask for the padded size (cached per size) and crops back. This
is what timm's ``SwinTransformer`` does with ``dynamic_img_size=True``, and the outputs match it; note that the
padded tokens are not masked out and that the mask's wrap-around regions sit at the padded border, as in timm.

Follows timm's ``swin_transformer.py`` (Apache-2.0), whose state-dict keys we keep: patch merging sits at the start
of stages 1..3 (``layers.i.downsample``) and the classifier is ``head.fc``. Checkpoints of the official code
(microsoft/Swin-Transformer, MIT), which merges at the end of each stage and names the classifier ``head``, load
through ``SwinTransformer.remap``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    Attention,
    DropPath,
    LayerType,
    Mlp,
    PatchEmbed,
    drop_path_rates,
    get_norm,
    init_linear,
    is_tracing,
    trace_leaf,
    window_partition,
    window_reverse,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["SwinTransformer", "shifted_window_mask"]

MASK_VALUE = -100.0  # the official code's value for "other region"; exp(-100) underflows to 0 in the softmax


def relative_position_index(window_size: tuple[int, int]) -> Tensor:
    """``(N, N)`` index into a ``(2*wh-1) * (2*ww-1)`` bias table for every pair of tokens of a window."""
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, 1) - (2, 1, N) -> (2, N, N)
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def shifted_window_mask(size: tuple[int, int], window_size: tuple[int, int], shift_size: tuple[int, int],
                        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive mask ``(nW, N, N)`` for a map of ``size`` rolled by ``-shift_size``: 0 inside a region, -100 across.

    Along each axis of length S the rolled map has three regions, [0, S - w), [S - w, S - s) and [S - s, S) (the
    last one holds the tokens that wrapped around); tokens of one window attend only within their region.
    """
    def regions(n: int, w: int, s: int) -> Tensor:
        idx = torch.arange(n, device=device)
        if s == 0:
            return torch.zeros_like(idx)
        return (idx >= n - w).long() + (idx >= n - s).long()

    H, W = size
    wh, ww = window_size
    label = regions(H, wh, shift_size[0])[:, None] * 3 + regions(W, ww, shift_size[1])[None, :]  # (H, W)
    label = window_partition(label[None, :, :, None], window_size).reshape(-1, wh * ww)  # -> (nW, N)
    other = label[:, None, :] != label[:, :, None]  # (nW, N, N)
    return torch.zeros(other.shape, device=device, dtype=dtype).masked_fill(other, MASK_VALUE)


@trace_leaf
def shifted_window_mask_like(x: Tensor, window_size: tuple[int, int], shift_size: tuple[int, int]) -> Tensor:
    """``shifted_window_mask`` for the (padded) NHWC map ``x``, on its device and in its dtype (one node under FX)."""
    return shifted_window_mask(tuple(x.shape[1:3]), window_size, shift_size, x.device, x.dtype)


@trace_leaf
def pad_to_multiple(x: Tensor, multiple: tuple[int, int]) -> Tensor:
    """Zero-pad an NHWC map at the bottom and right to a multiple of ``multiple``: ``(B, H, W, C) -> (B, Hp, Wp, C)``.

    One node under FX (the padding depends on the concrete size)."""
    pad_h, pad_w = -x.shape[1] % multiple[0], -x.shape[2] % multiple[1]
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class SwinWindowAttention(Attention):
    """Multi-head attention inside each window, plus a learned relative position bias (and the shift mask)."""

    def __init__(self, dim: int, num_heads: int, window_size: tuple[int, int], qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.window_size = window_size
        wh, ww = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x``: ``(B * nW, N, C)`` windows; ``mask``: ``(nW, N, N)`` additive shift mask or None."""
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, N, 3, h, d) -> 3 x (B*nW, h, N, d)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N * N, heads)
        bias = bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)  # (N, N, heads) -> (1, heads, N, N)
        if mask is not None:
            nW = mask.shape[0]
            bias = bias + mask.unsqueeze(1)  # (nW, heads, N, N)
            bias = bias.expand(B_ // nW, -1, -1, -1, -1).reshape(-1, self.num_heads, N, N)  # -> (B*nW, heads, N, N)
        drop = self.attn_drop.p if self.training else 0.0
        x = self.core(q, k, v, bias, scale=self.scale, dropout_p=drop, grid=self.window_size)
        x = x.transpose(1, 2)  # (B*nW, h, N, d) -> (B*nW, N, h, d)
        x = x.reshape(B_, N, -1)  # (B*nW, N, h, d) -> (B*nW, N, h * d)
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(nn.Module):
    """Pre-norm block on an NHWC map: (shifted) window attention, then an MLP, each residual."""

    def __init__(self, dim: int, num_heads: int, window_size: tuple[int, int], shift_size: tuple[int, int],
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: LayerType = "gelu", norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        norm = get_norm(norm_layer)
        self.norm1 = norm(dim)
        self.attn = SwinWindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop)
        self.attn.core.shift = shift_size  # the seam: tools put the shifted windows back on the map
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self._masks: dict[tuple, Tensor] = {}  # shift masks by (Hp, Wp, device, dtype); not state

    def shift_mask(self, x: Tensor) -> Tensor:
        """The shift mask for the padded NHWC map ``x``: cached per size, device and dtype in eager mode, built in the
        graph while tracing (a traced graph keeps no Python cache)."""
        if is_tracing():
            return shifted_window_mask_like(x, self.window_size, self.shift_size)
        key = (x.shape[1], x.shape[2], x.device, x.dtype)
        if key not in self._masks:
            with torch.inference_mode(False):  # a mask made under inference_mode must still serve training
                self._masks[key] = shifted_window_mask_like(x, self.window_size, self.shift_size)
        return self._masks[key]

    def window_attention(self, x: Tensor) -> Tensor:
        _, H, W, C = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        shifted = sh > 0 or sw > 0
        if shifted:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        # NOTE: roll, then pad bottom/right, as timm does; the zero tokens are not masked
        x = pad_to_multiple(x, self.window_size)  # (B, H, W, C) -> (B, Hp, Wp, C)
        Hp, Wp = x.shape[1], x.shape[2]
        windows = window_partition(x, self.window_size).reshape(-1, wh * ww, C)  # -> (B * nW, N, C)
        windows = self.attn(windows, self.shift_mask(x) if shifted else None)
        x = window_reverse(windows.reshape(-1, wh, ww, C), self.window_size, Hp, Wp)  # -> (B, Hp, Wp, C)
        x = x[:, :H, :W]
        if shifted:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.window_attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SwinPatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (4C), normalise, project to ``out_dim``: halves H and W."""

    def __init__(self, dim: int, out_dim: int, norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        self.norm = get_norm(norm_layer)(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_to_multiple(x, (2, 2))  # (B, H, W, C) -> (B, H + H % 2, W + W % 2, C)
        B, H, W, C = x.shape
        # channel order (x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]), as the official code
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5)  # -> (B, H/2, W/2, dw, dh, C)
        x = x.flatten(3)  # -> (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


def stage_window(resolution: tuple[int, int], window_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Window and shift of a stage built for ``resolution``: a map no larger than the window is one unshifted window."""
    window = tuple(min(r, window_size) for r in resolution)
    shift = tuple(0 if r <= window_size else window_size // 2 for r in resolution)
    return window, shift


class SwinTransformerStage(nn.Module):
    """Optional patch merging (stages after the first), then ``depth`` blocks alternating plain and shifted windows."""

    def __init__(self, dim: int, out_dim: int, resolution: tuple[int, int], depth: int, num_heads: int,
                 window_size: int, downsample: bool, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, drop_path: list[float] | None = None,
                 act_layer: LayerType = "gelu", norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        self.downsample = SwinPatchMerging(dim, out_dim, norm_layer) if downsample else nn.Identity()
        window, shift = stage_window(resolution, window_size)
        self.window_size, self.shift_size = window, shift
        drop_path = drop_path or [0.0] * depth
        self.blocks = nn.Sequential(*[
            SwinTransformerBlock(out_dim, num_heads, window, shift if i % 2 else (0, 0), mlp_ratio, qkv_bias,
                                 attn_drop, proj_drop, drop_path[i], act_layer, norm_layer)
            for i in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class SwinTransformer(Backbone):
    """Swin Transformer: 4x4 patch embedding, then four stages of (shifted) window attention with patch merging.

    Args:
        img_size: the input size the windows and shifts are fixed for; other multiples of 32 work by padding.
        embed_dim: channels of the first stage; each later stage doubles them.
        window_size: the window side (7 for 224 px, 12 for 384 px models); shifts are half of it.
        norm_layer: LayerNorm with the torch default eps 1e-5, as the official code (not the library's 1e-6 "ln").
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    takes_patch_size = True
    min_input_size = 32
    input_multiple = 32
    no_weight_decay_keys = ("relative_position_bias_table",)
    first_conv = "patch_embed.proj"

    def __init__(self, img_size: int = 224, patch_size: int = 4, embed_dim: int = 96,
                 depths: tuple[int, ...] = (2, 2, 6, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True, *, in_chans: int = 3,
                 num_classes: int = 1000, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0, act_layer: LayerType = "gelu",
                 norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"swin: depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry "
                             f"per stage")
        dims = [embed_dim * 2**i for i in range(len(depths))]
        for d, h in zip(dims, num_heads, strict=True):
            if d % h:
                raise ValueError(f"swin: stage width {d} is not divisible by its num_heads {h}; "
                                 f"choose num_heads dividing {dims}")
        if window_size < 1:
            raise ValueError(f"swin: window_size must be >= 1, got {window_size}")
        self.in_chans = in_chans
        # the total stride: inputs must be multiples of it so that every stage's map halves exactly
        self.min_input_size = self.input_multiple = patch_size * 2 ** (len(depths) - 1)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer=norm_layer,
                                      output_fmt="NHWC")
        grid = self.patch_embed.grid_size
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        stages, infos, in_dim = [], [], dims[0]
        for i, (depth, heads, dim) in enumerate(zip(depths, num_heads, dims, strict=True)):
            scale = 2 ** i
            resolution = (-(-grid[0] // scale), -(-grid[1] // scale))
            stages.append(SwinTransformerStage(in_dim, dim, resolution, depth, heads, window_size, i > 0, mlp_ratio,
                                               qkv_bias, attn_drop_rate, proj_drop_rate, dpr[i], act_layer,
                                               norm_layer))
            infos.append(FeatureInfo(dim, patch_size * scale, f"layers.{i}"))
            in_dim = dim
        self.layers = nn.Sequential(*stages)
        self.set_feature_info(infos)
        self.norm = get_norm(norm_layer)(dims[-1])
        self.init_head(dims[-1], num_classes, drop_rate)
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.patch_embed(x)  # (B, C, H, W) -> (B, H/4, W/4, embed_dim)

    def stage_modules(self) -> list[nn.Module]:
        return list(self.layers)

    def stage_to_nchw(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)

    def forward_norm(self, x: Tensor) -> Tensor:
        return self.norm(x).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official microsoft/Swin-Transformer keys -> ours (= timm's).

        The official code merges patches at the end of stage i (``layers.i.downsample``), we at the start of stage
        i + 1; its classifier is ``head``, ours ``head.fc``; its index tables and shift masks are persistent buffers,
        ours are not. The merged-channel order is the same, so no weight is permuted.
        """
        official = any(k.startswith("layers.0.downsample.") for k in state_dict)
        out = {}
        for k, v in state_dict.items():
            if k.endswith(("relative_position_index", "attn_mask")):
                continue
            parts = k.split(".")
            if official and len(parts) > 2 and parts[0] == "layers" and parts[2] == "downsample":
                k = ".".join(["layers", str(int(parts[1]) + 1), *parts[2:]])
            elif k in ("head.weight", "head.bias"):
                k = "head.fc." + parts[1]
            out[k] = v
        return out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, SwinWindowAttention) and not m.relative_position_bias_table.is_meta:
        nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
    init_linear(m, std=0.02)


_HUB = "official MODELHUB.md, Swin-V1 table"
_1K = "timm weights: .ms_in1k (also .ms_in22k_ft_in1k, .ms_in22k)"
_22K = "timm weights: .ms_in22k_ft_in1k (also .ms_in22k); ImageNet-22K pre-training only"
_SIZES = "other multiples of 32 pad each stage to its window (timm dynamic_img_size behaviour), no interpolation"

# params_m: exact count of timm's and of the official model (equal). gmacs: the official code's SwinTransformer.flops()
# at input_size (it counts LayerNorms too; timm's table has 4.51 / 8.77 / 15.47 / 47.19 / 34.53 / 104.08)

VARIANTS = {
    "swin_test":                      Variant(dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8),
                                                   window_size=4), params_m=0.451433, input_size=64, crop_pct=0.9),
    "swin_tiny_patch4_window7_224":   Variant(dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
                                              params_m=28.288354, gmacs=4.494, crop_pct=0.9,
                                              paper=Paper(28, 4.5, 81.2, f"{_HUB} (ImageNet-1K)"),
                                              notes=f"{_1K}; {_SIZES}"),
    "swin_small_patch4_window7_224":  Variant(dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
                                              params_m=49.606258, gmacs=8.747, crop_pct=0.9,
                                              paper=Paper(50, 8.7, 83.2, f"{_HUB} (ImageNet-1K)"),
                                              notes=f"{_1K}; {_SIZES}"),
    "swin_base_patch4_window7_224":   Variant(dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
                                              params_m=87.768224, gmacs=15.438, crop_pct=0.9,
                                              paper=Paper(88, 15.4, 83.5, f"{_HUB} (ImageNet-1K; 85.2 with 22K)"),
                                              notes=f"{_1K}; {_SIZES}"),
    "swin_base_patch4_window12_384":  Variant(dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                                                   window_size=12),
                                              params_m=87.903584, gmacs=47.105, input_size=384, crop_pct=1.0,
                                              paper=Paper(88, 47.1, 84.5, f"{_HUB} (ImageNet-1K)"),
                                              notes=f"{_1K}; {_SIZES}"),
    "swin_large_patch4_window7_224":  Variant(dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
                                              params_m=196.532476, gmacs=34.487, crop_pct=0.9,
                                              paper=Paper(197, 34.5, 86.3, f"{_HUB} (ImageNet-22K -> 1K)"),
                                              notes=f"{_22K}; {_SIZES}"),
    "swin_large_patch4_window12_384": Variant(dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                                                   window_size=12),
                                              params_m=196.735516, gmacs=103.952, input_size=384, crop_pct=1.0,
                                              paper=Paper(197, 103.9, 87.3, f"{_HUB} (ImageNet-22K -> 1K)"),
                                              notes=f"{_22K}; {_SIZES}"),
}
register_family(SwinTransformer, VARIANTS, paper="arXiv:2103.14030", kind="vit", family="swin")
