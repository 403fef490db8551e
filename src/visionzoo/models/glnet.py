"""GLNet, from "Revisiting the Integration of Convolution and Attention for Vision Backbone" (Zhu et al., NeurIPS
2024). https://arxiv.org/abs/2411.14429

Four stages of NCHW blocks. A GLMix block mixes tokens in two branches on LayerNorm2d(x): a local branch (1x1 conv,
depthwise 5x5, 1x1) and a global branch on 64 "slots" (semantic clusters): the slots start as an 8x8 average
pooling of the block input; each gathers the pixels by a softmax over pixels of the cosine similarity (times a
learned scale), the slots attend to each other with plain multi-head self-attention, and each pixel gathers the
updated slots by a softmax over slots of the same similarities. Later stages use multi-head self-attention blocks.

Attention seam: all three softmaxes of a GLMix block are softmax attention over tokens and go through
``AttentionCore``: the soft clustering is cross-attention from the slots (queries, on the 8x8 pooled grid) to the
pixels (keys = values), with cosine-similarity logits; the dispatch is cross-attention from the pixels to the slots
with the same logits transposed (values: the updated slots); the relation among slots is self-attention. The learned
scale multiplies the normalised queries (AttentionCore takes a float scale), which is the same product.

Differs from the paper: none. Follows rayleizhu/GLMix ``models/glnet.py`` (the official repo, referred to as GLNet in
the paper) and keeps its state-dict layout except the stem and downsamplings (official ``downsample_layers.i``, here
``stem`` and ``stages.i.downsample``) and the head (``head`` -> ``head.fc``, ``norm`` -> ``norm.bn``), translated by
``GLNet.remap``. ``nn.MultiheadAttention`` is re-expressed with the same parameters (``in_proj_weight``,
``in_proj_bias``, ``out_proj``). The official learnable-slot variant (``glnet_stl_paramslot``) and the token-labeling
models (``glnet_tklb.py``) are not registered.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    AttentionCore,
    ClassifierHead,
    DropPath,
    FrozenBatchNorm2d,
    LayerNorm,
    LayerNorm2d,
    drop_path_rates,
    fold_bn_into_conv,
    is_meta,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["GLNet"]


class GLNetMHA(nn.Module):
    """Multi-head self-attention over ``(B, N, C)`` tokens with ``nn.MultiheadAttention``'s parameter names."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.grid = num_heads, dim // num_heads, grid
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.core = AttentionCore()
        if not self.in_proj_weight.is_meta:  # as nn.MultiheadAttention
            nn.init.xavier_uniform_(self.in_proj_weight)
            nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, 3, h, d) -> 3 x (B, h, N, d)
        x = self.core(q, k, v, grid=self.grid).transpose(1, 2).reshape(B, N, C)  # (B, h, N, d) -> (B, N, C)
        return self.out_proj(x)


class GLNetResDWConv(nn.Conv2d):
    """``x + dw3x3(x)`` (the MLP's residual depthwise conv)."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


class GLNetLayerScale(nn.Module):
    def __init__(self, shape: tuple[int, ...], init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full(shape, init))

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * x


def _conv_mlp(dim: int, hidden: int, res_dw: bool) -> nn.Sequential:
    """1x1 conv, (residual dw3x3), GELU, 1x1 conv, with the official indices 0-3."""
    return nn.Sequential(nn.Conv2d(dim, hidden, 1), GLNetResDWConv(hidden) if res_dw else nn.Identity(), nn.GELU(),
                         nn.Conv2d(hidden, dim, 1))


def _layer_scale(dim: int, init: float | None, nchw: bool) -> nn.Module:
    return GLNetLayerScale((1, dim, 1, 1) if nchw else (dim,), init) if init else nn.Identity()


class GLMixBlock(nn.Module):
    """(CPE), x + local(LN(x)) + clustered global(LN(x)); x + MLP(LN(x)); all NCHW."""

    def __init__(self, dim: int, num_heads: int, num_slots: int = 64, local_ks: int = 5, mlp_ratio: float = 4.0,
                 cpe_ks: int = 0, res_dw: bool = False, ls_init: float | None = None, drop_path: float = 0.0) -> None:
        super().__init__()
        self.pool_size = int(num_slots ** 0.5)
        if self.pool_size ** 2 != num_slots:
            raise ValueError(f"glnet: num_slots must be a square (slots start as a square pooling), got {num_slots}")
        self.slot_scale = nn.Parameter(torch.tensor(dim ** -0.5))
        self.pos_conv = nn.Conv2d(dim, dim, cpe_ks, padding=cpe_ks // 2, groups=dim) if cpe_ks else None
        self.norm1 = LayerNorm2d(dim)
        self.relation_mha = GLNetMHA(dim, num_heads, grid=(self.pool_size, self.pool_size))
        self.feature_conv = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, local_ks, padding=local_ks // 2,
                                                                            groups=dim), nn.Conv2d(dim, dim, 1))
        self.norm2 = LayerNorm2d(dim)
        self.mlp = _conv_mlp(dim, int(mlp_ratio * dim), res_dw)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ls1 = _layer_scale(dim, ls_init, True)
        self.ls2 = _layer_scale(dim, ls_init, True)
        self.group_core = AttentionCore()  # slots (queries) gather pixels
        self.dispatch_core = AttentionCore()  # pixels (queries) gather slots

    def mix(self, x: Tensor, init_slots: Tensor) -> Tensor:
        """The global branch on ``x`` ``(B, C, H, W)`` with slots ``(B, S, C)``, plus the local branch."""
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)
        slots_n = F.normalize(init_slots, dim=-1).unsqueeze(1)  # (B, 1, S, C)
        pixels_n = F.normalize(tokens, dim=-1).unsqueeze(1)  # (B, 1, N, C)
        scale = self.slot_scale.to(x.dtype)
        p = self.pool_size
        slots = self.group_core(slots_n * scale, pixels_n, tokens.unsqueeze(1), scale=1.0, grid=(p, p))  # (B,1,S,C)
        slots = self.relation_mha(slots.squeeze(1))  # (B, S, C)
        out = self.dispatch_core(pixels_n * scale, slots_n, slots.unsqueeze(1), scale=1.0)  # (B, 1, N, C)
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W)  # (B, N, C) -> (B, C, H, W)
        return out + self.feature_conv(x)

    def forward(self, x: Tensor) -> Tensor:
        p = self.pool_size
        init_slots = F.adaptive_avg_pool2d(x, p).flatten(2).transpose(1, 2)  # (B, C, p, p) -> (B, S, C)
        if self.pos_conv is not None:
            x = x + self.pos_conv(x)
        x = x + self.drop_path(self.ls1(self.mix(self.norm1(x), init_slots)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class GLNetAttnBlock(nn.Module):
    """(CPE), x + MHSA(LN(x)) over the flattened map; x + MLP(LN2d(x)); NCHW in and out (official
    ``MHSA_NCHW_Block``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, cpe_ks: int = 0, res_dw: bool = False,
                 ls_init: float | None = None, drop_path: float = 0.0) -> None:
        super().__init__()
        self.pos_conv = nn.Conv2d(dim, dim, cpe_ks, padding=cpe_ks // 2, groups=dim) if cpe_ks else None
        self.norm1 = LayerNorm(dim)
        self.mha_op = GLNetMHA(dim, num_heads)
        self.norm2 = LayerNorm2d(dim)
        self.mlp = _conv_mlp(dim, int(mlp_ratio * dim), res_dw)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ls1 = _layer_scale(dim, ls_init, False)
        self.ls2 = _layer_scale(dim, ls_init, True)

    def forward(self, x: Tensor) -> Tensor:
        if self.pos_conv is not None:
            x = x + self.pos_conv(x)
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)
        t = t + self.drop_path(self.ls1(self.mha_op(self.norm1(t))))
        x = t.transpose(1, 2).reshape(B, C, H, W)  # (B, N, C) -> (B, C, H, W)
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class GLNetTokenBlock(nn.Module):
    """x + MHSA(LN(x)); x + MLP(LN(x)) on ``(B, N, C)`` tokens (official ``MHSA_Block``, GLNet-STL's last stage)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, ls_init: float | None = None,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.norm1 = LayerNorm(dim)
        self.mha_op = GLNetMHA(dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ls1 = _layer_scale(dim, ls_init, False)
        self.ls2 = _layer_scale(dim, ls_init, False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ls1(self.mha_op(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


MIXING_MODES = ("glmix", "mha", "glmix.mha_nchw", "mha_nchw")


class GLNetStage(nn.Module):
    """Downsampling (the stem's job in stage 0), then blocks of one mixing mode: ``glmix``, ``mha_nchw``,
    ``glmix.mha_nchw`` (alternating, GLMix first) or ``mha`` (token blocks)."""

    def __init__(self, downsample: nn.Module, dim: int, depth: int, mode: str, num_heads: int,
                 drop_path: list[float], mlp_ratio: float, cpe_ks: int, res_dw: bool, ls_init: float | None,
                 num_slots: int, local_ks: int) -> None:
        super().__init__()
        if mode not in MIXING_MODES:
            raise ValueError(f"glnet: mixing_modes entries must be one of {MIXING_MODES}, got {mode!r}")
        self.downsample = downsample
        self.tokens = mode == "mha"
        blocks = []
        for j in range(depth):
            common = dict(mlp_ratio=mlp_ratio, ls_init=ls_init, drop_path=drop_path[j])
            if self.tokens:
                blocks.append(GLNetTokenBlock(dim, num_heads, **common))
            elif mode == "glmix" or (mode == "glmix.mha_nchw" and j % 2 == 0):
                blocks.append(GLMixBlock(dim, num_heads, num_slots, local_ks, cpe_ks=cpe_ks, res_dw=res_dw, **common))
            else:
                blocks.append(GLNetAttnBlock(dim, num_heads, cpe_ks=cpe_ks, res_dw=res_dw, **common))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if not self.tokens:
            return self.blocks(x)
        B, C, H, W = x.shape
        x = self.blocks(x.flatten(2).transpose(1, 2))  # (B, C, H, W) -> (B, N, C)
        return x.transpose(1, 2).reshape(B, C, H, W)  # (B, N, C) -> (B, C, H, W)

    def fuse(self) -> None:
        """Fold a BN that precedes the downsampling conv (``norm.proj`` layout; the conv has no padding)."""
        ds = self.downsample
        if isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.BatchNorm2d):
            ds[1], ds[0] = fold_bn_into_conv(ds[0], ds[1]), nn.Identity()


class GLNetNorm(nn.Module):
    """The BN after the last stage. It follows a residual sum, so no conv can absorb it: ``fuse()`` freezes it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x)

    def fuse(self) -> None:
        bn = self.bn
        if isinstance(bn, nn.BatchNorm2d):
            with torch.device(bn.running_mean.device):
                self.bn = FrozenBatchNorm2d.convert(bn).to(bn.running_mean.dtype)


class GLNet(Backbone):
    """GLNet: conv stem, four stages of GLMix / multi-head attention blocks, BN, average pool, linear.

    Args:
        mixing_modes: per stage, ``glmix``, ``glmix.mha_nchw`` (alternating), ``mha_nchw`` or ``mha``.
        overlap: 3x3/2 convs (two in the stem, BN-GELU between) then BN, as GLNet-4G/9G/16G; otherwise a 4x4/4 conv
            + BN stem and BN + 2x2/2 conv downsamplings (GLNet-STL, Swin-T's layout).
        cpe_ks: kernel of the depthwise conditional position encoding in each NCHW block (0: none).
        res_dw: a residual depthwise 3x3 conv inside each block's MLP.
        ls_init: layer-scale init (``None``: no layer scale).
    """

    kind = "hybrid"
    has_attention = True
    first_conv = "stem.0"

    def __init__(self, depths: tuple[int, ...] = (4, 4, 18, 4), dims: tuple[int, ...] = (64, 128, 256, 512),
                 mlp_ratio: float = 3.0, head_dim: int = 32,
                 mixing_modes: tuple[str, ...] = ("glmix", "glmix", "glmix.mha_nchw", "mha_nchw"),
                 num_slots: int = 64, local_ks: int = 5, cpe_ks: int = 3, overlap: bool = True, res_dw: bool = True,
                 ls_init: float | None = None, *, in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not len(depths) == len(dims) == len(mixing_modes) == 4:
            raise ValueError(f"glnet: depths, dims and mixing_modes need 4 entries, got {tuple(depths)}, "
                             f"{tuple(dims)}, {tuple(mixing_modes)}")
        if any(d % head_dim for d in dims):
            raise ValueError(f"glnet: every width must be a multiple of head_dim={head_dim}, got dims={tuple(dims)}")
        self.in_chans = in_chans
        if overlap:
            self.stem = nn.Sequential(
                nn.Identity(), nn.Conv2d(in_chans, dims[0] // 2, 3, 2, 1), nn.BatchNorm2d(dims[0] // 2), nn.GELU(),
                nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), nn.BatchNorm2d(dims[0]))
            downs = [nn.Sequential(nn.Conv2d(dims[i - 1], dims[i], 3, 2, 1), nn.BatchNorm2d(dims[i]))
                     for i in range(1, 4)]
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, 4), nn.BatchNorm2d(dims[0]))
            downs = [nn.Sequential(nn.BatchNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], 2, 2))
                     for i in range(1, 4)]
        self.first_conv = "stem.1" if overlap else "stem.0"
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        self.stages = nn.ModuleList([
            GLNetStage(nn.Identity() if i == 0 else downs[i - 1], dims[i], depths[i], mixing_modes[i],
                       dims[i] // head_dim, dpr[i], mlp_ratio, cpe_ks, res_dw, ls_init, num_slots, local_ks)
            for i in range(4)])
        self.set_feature_info([FeatureInfo(d, 4 * 2**i, f"stages.{i}") for i, d in enumerate(dims)])
        self.norm = GLNetNorm(dims[-1])
        self.init_head(dims[-1], num_classes, drop_rate, head=ClassifierHead(dims[-1], num_classes, "avg", drop_rate))
        self.apply(_init_weights)

    def forward_norm(self, x: Tensor) -> Tensor:
        return self.norm(x)

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours: ``downsample_layers.0`` -> ``stem``, ``downsample_layers.i`` ->
        ``stages.i.downsample``, ``norm`` -> ``norm.bn``, ``head`` -> ``head.fc``."""
        out = {}
        for k, v in state_dict.items():
            k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
            k = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", k)
            k = re.sub(r"^norm\.(?!bn\.)", "norm.bn.", k)
            k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
            out[k] = v
        return out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear) and not is_meta(m):  # the official init (LayerNorms are already at 1, 0)
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_SRC = "arXiv:2411.14429 ImageNet-1K results (official README: params, FLOPs, top-1 at 224)"
_NOTES = ("official {name}; params_m counted on the official file; gmacs: the paper's FLOPs (visionzoo.profile: "
          "{ours}, attention counted); fvcore on the official file gives {fv} G, missing the attention inside "
          "nn.MultiheadAttention's fused path")

_BIG = dict(depths=(4, 4, 18, 4), mlp_ratio=3.0, mixing_modes=("glmix", "glmix", "glmix.mha_nchw", "mha_nchw"))
VARIANTS = {
    "glnet_test": Variant(dict(depths=(1, 1, 2, 1), dims=(32, 32, 64, 64), num_slots=4), params_m=0.307851,
                          input_size=64, notes="tiny config for tests (4 slots)"),
    "glnet_stl":  Variant(dict(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), mlp_ratio=4.0,
                               mixing_modes=("glmix", "glmix", "glmix", "mha"), cpe_ks=0, overlap=False, res_dw=False),
                          params_m=30.296786, gmacs=4.4, paper=Paper(30, 4.4, 82.5, _SRC),
                          notes=_NOTES.format(name="glnet_stl", ours=4.434, fv=3.857) + "; Swin-T's layout"),
    "glnet_4g":   Variant(dict(_BIG, dims=(64, 128, 256, 512)), params_m=27.001593, gmacs=4.5,
                          paper=Paper(27, 4.5, 83.7, _SRC),
                          notes=_NOTES.format(name="glnet_4g", ours=4.588, fv=3.456)),
    "glnet_9g":   Variant(dict(_BIG, dims=(96, 192, 384, 768)), params_m=60.010617, gmacs=9.7,
                          paper=Paper(60, 9.7, 84.5, _SRC),
                          notes=_NOTES.format(name="glnet_9g", ours=9.747, fv=7.428)),
    "glnet_16g":  Variant(dict(_BIG, dims=(128, 256, 512, 1024), ls_init=1e-4), params_m=106.055161, gmacs=16.7,
                          paper=Paper(106, 16.7, 85.0, _SRC),
                          notes=_NOTES.format(name="glnet_16g", ours=16.816, fv=12.871)),
}
register_family(GLNet, VARIANTS, paper="arXiv:2411.14429", kind="hybrid",
                code="rayleizhu/GLMix@3c93dbf models/glnet.py")
