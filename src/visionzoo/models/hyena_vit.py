"""Hyena-ViT, from "Multi-Dimensional Hyena for Spatial Inductive Bias" (Zimerman, Wolf, AISTATS 2024).
https://arxiv.org/abs/2309.13600

A DeiT (no class token: the official runs classify token 0 after the final norm, as its code does without
``--use_cls_token``) whose token mixer is the 2-D Hyena operator (Hyena N-D): ``in_proj`` to three branches, a 3x3
depthwise short filter, then ``v * x1`` convolved over the whole 2-D token grid with a long implicit filter (an MLP
with sine activations on learned 2-D positional features, times an exponential decay per axis) plus a per-channel
skip ``D``, gated by ``x0``, ``out_proj``. The long convolution is a linear ("causal" along both axes) 2-D
convolution, divided by ``2 L`` as the official FFT code computes it. ``method`` places Hyena and attention blocks as
the official ``--method`` does (``hyena2d``: all Hyena; ``hyena2dattn``: Hyena up to block ``depth // 2``,
attention after, the paper's hybrid). ``directional_mode="seq"`` (the README's) flips the grid around the long
convolution in every other block. Hyena is not softmax attention; the hybrid's attention blocks are ``TokenBlock`` s
(token reduction applies to them).

No ImageNet-1k numbers: the paper and the repository report smaller-dataset results only (the README's command
trains on CelebA), so the variants carry no top-1.

Differs from the official code (Itamarzimm/HyenaND, Apache-2.0): only the README's operator (``hyena2d_filter``: one
joint 2-D filter MLP; ``window_mode="standard"``; ``directional_mode`` ``"standard"`` or ``"seq"``); the separable
X/Y filters, ``parallel``/``4dir`` modes and the direct parameterisation are not ported. Other input sizes (the
official code runs only at ``img_size``, square): the filter's learned positional features are interpolated linearly
to the new rows and columns, the position table bicubically; the FFT size is ``2H x 2W`` and the scale ``1 / 2H``
(the official ``1 / 2L`` on a square grid). Eager runs the long convolution by FFT (zero-padded to ``2H x 2W``);
while tracing (FX, torch.export, ONNX) the same linear convolution runs as a depthwise conv2d with the flipped
kernel, exact to float rounding.
MACs count the FFTs (5 N log2 N per complex transform, half for real).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, resolve_indices
from visionzoo.layers import (
    DropPath,
    LayerNorm,
    Mlp,
    PatchEmbed,
    PreNormBlock,
    drop_path_rates,
    init_linear,
    is_tracing,
    resample_abs_pos_embed,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["HyenaViT"]

METHODS = ("hyena2d", "hyena2dattn")
DIRECTIONAL = ("standard", "seq")


def long_conv_fft(u: Tensor, k: Tensor) -> Tensor:
    """Linear 2-D convolution of ``u`` ``(B, C, H, W)`` with ``k`` ``(C, H, W)``, first ``H x W`` outputs, / 2H."""
    H, W = u.shape[-2:]
    n = (2 * H, 2 * W)
    y = torch.fft.irfft2(torch.fft.rfft2(u.float(), s=n) * torch.fft.rfft2(k.float(), s=n), s=n)
    return y[..., :H, :W] / (2 * H)


def long_conv_direct(u: Tensor, k: Tensor) -> Tensor:
    """``long_conv_fft`` as a depthwise conv2d: ``y[i, j] = sum_{a<=i, b<=j} u[a, b] k[i-a, j-b] / 2H``."""
    H, W = u.shape[-2:]
    x = F.pad(u.float(), (W - 1, 0, H - 1, 0))  # zeros above and left: only earlier rows/columns contribute
    return F.conv2d(x, k.float().flip(-1, -2).unsqueeze(1), groups=k.shape[0]) / (2 * H)


@trace_leaf
def grid_features(z: Tensor, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The positional features ``z`` ``(1, L, 3)`` and times ``t`` ``(1, L, 1)`` for the rows and the columns of the
    ``(B, C, H, W)`` map ``x``: as built when ``H = W = L``, else ``z`` interpolated linearly (align_corners) and
    ``t`` evenly spaced over [0, 1] again, in ``x``'s dtype."""
    out = []
    for n in x.shape[-2:]:
        if n == z.shape[1]:
            out.append((z, t))
            continue
        zn = F.interpolate(z.transpose(1, 2), size=n, mode="linear", align_corners=True).transpose(1, 2)
        out.append((zn, torch.linspace(0, 1, n, device=z.device, dtype=z.dtype)[None, :, None]))
    (z_r, t_r), (z_c, t_c) = out
    return z_r.to(x.dtype), z_c.to(x.dtype), t_r.to(x.dtype), t_c.to(x.dtype)


@trace_leaf
def pos_embed_for(pos_embed: Tensor, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """The ``(1, N, D)`` position table as a ``(1, H, W, D)`` map for the patch grid of ``x`` ``(B, H, W, D)``."""
    H, W = x.shape[1:3]
    return resample_abs_pos_embed(pos_embed, (H, W), grid_size, num_prefix_tokens=0).reshape(1, H, W, -1)


class HyenaSin(nn.Module):
    """``sin(freq * x)`` with a learnable frequency per feature."""

    def __init__(self, dim: int, w: float = 1.0) -> None:
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.freq * x)


class HyenaPositionalEmbedding(nn.Module):
    """Learned positional features ``z`` ``(1, L, 3)`` (time, cos, sin at one band) and the fixed times ``t``."""

    def __init__(self, seq_len: int, emb_dim: int = 3) -> None:
        super().__init__()
        bands = (emb_dim - 1) // 2
        t = torch.linspace(0, 1, seq_len)[None, :, None]  # (1, L, 1)
        w = 2 * math.pi * torch.linspace(0, seq_len - 1, seq_len)[None, :, None] / seq_len
        f = torch.linspace(1e-4, bands - 1, bands)[None, None]
        z = torch.exp(-1j * f * w)
        self.z = nn.Parameter(torch.cat([t, z.real, z.imag], dim=-1))
        self.register_buffer("t", t)


class HyenaFilter2d(nn.Module):
    """The implicit long filter ``(L, L, C)``: MLP(sin) on the pair of positional features, times the decay."""

    def __init__(self, dim: int, seq_len: int, order: int = 64, num_inner: int = 2, emb_dim: int = 3) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(dim))
        self.pos_emb = HyenaPositionalEmbedding(seq_len, emb_dim)
        act = HyenaSin(order)  # NOTE: one activation (one frequency vector) shared by every layer, as official
        layers: list[nn.Module] = [nn.Linear(2 * emb_dim, order), act]
        for _ in range(num_inner):
            layers += [nn.Linear(order, order), act]
        layers.append(nn.Linear(order, dim, bias=False))
        self.implicit_filter = nn.Sequential(*layers)
        self.modulation = nn.Module()
        decay = torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, dim)[None, None]  # slow .. fast
        self.modulation.register_buffer("Xdeltas", decay.clone())
        self.modulation.register_buffer("Ydeltas", decay.clone())

    def filter2d(self, x: Tensor) -> Tensor:
        """The filter ``(1, H, W, C)`` for the grid of ``x`` ``(B, C, H, W)``."""
        z_r, z_c, t_r, t_c = grid_features(self.pos_emb.z, self.pos_emb.t, x)
        H, W = z_r.shape[1], z_c.shape[1]
        feats = torch.cat([z_r.unsqueeze(2).expand(1, H, W, z_r.shape[-1]),
                           z_c.unsqueeze(1).expand(1, H, W, z_c.shape[-1])], dim=-1)  # [i, j] = (z[i], z[j])
        h = self.implicit_filter(feats)  # (1, H, W, 6) -> (1, H, W, C)
        decay_r = torch.exp(-t_r * self.modulation.Xdeltas.abs())  # (1, H, C): rows
        decay_c = torch.exp(-t_c * self.modulation.Ydeltas.abs())  # (1, W, C): columns
        return h * (decay_r.unsqueeze(2) * decay_c.unsqueeze(1))  # (1, H, W, C)


class HyenaOperator2d(nn.Module):
    """The order-2 Hyena N-D operator on a channels-last token map ``(B, H, W, C)``."""

    def __init__(self, dim: int, seq_len: int, filter_order: int = 64, flip: bool = False, drop: float = 0.0) -> None:
        super().__init__()
        self.dim, self.flip = dim, flip
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.short_filter = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim)
        self.filter_fn = HyenaFilter2d(dim, seq_len, filter_order)
        self.dropout = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        C = x.shape[-1]
        u = self.in_proj(x).permute(0, 3, 1, 2)  # (B, H, W, 3C) -> (B, 3C, H, W)
        x0, x1, v = self.short_filter(u).split(C, dim=1)
        k = self.filter_fn.filter2d(v)[0].permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
        v = self.dropout(v * x1)
        if self.flip:
            v = v.flip(-1, -2)
        y = (long_conv_direct if is_tracing() else long_conv_fft)(v, k).type_as(v)
        y = y + v * self.filter_fn.bias.view(1, C, 1, 1)
        if self.flip:
            y = y.flip(-1, -2)
        return self.out_proj((y * x0).permute(0, 2, 3, 1))  # (B, C, H, W) -> (B, H, W, C)


class HyenaBlock(nn.Module):
    """Pre-norm block on a channels-last map ``(B, H, W, C)``: x + Hyena(norm1(x)), then x + MLP(norm2(x))."""

    def __init__(self, dim: int, seq_len: int, mlp_ratio: float, filter_order: int, flip: bool,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = HyenaOperator2d(dim, seq_len, filter_order, flip)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class HyenaViT(Backbone):
    """DeiT with Hyena N-D token mixers (all blocks, or a hybrid with attention).

    Args:
        img_size: the input size the filters' positional features are learned for; another grid interpolates them.
        method: ``"hyena2d"`` (all Hyena) or ``"hyena2dattn"`` (Hyena first, attention after block ``depth // 2``),
            as the official ``--method`` (its ``attnhyena2d`` and ``onebyone`` orders are not ported).
        directional_mode: ``"seq"`` flips the grid around the long convolution in even blocks; ``"standard"`` never.
        filter_order: width of the implicit filter MLP.
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    takes_patch_size = True
    no_weight_decay_keys = ("pos_embed",)
    first_conv = "patch_embed.proj"

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 192, depth: int = 12,
                 num_heads: int = 3, mlp_ratio: float = 4.0, method: str = "hyena2d", directional_mode: str = "seq",
                 filter_order: int = 64, *, in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"hyena_vit: method must be one of {METHODS}, got {method!r}")
        if directional_mode not in DIRECTIONAL:
            raise ValueError(f"hyena_vit: directional_mode must be one of {DIRECTIONAL}, got {directional_mode!r}")
        if img_size % patch_size:
            raise ValueError(f"hyena_vit: img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.in_chans = in_chans
        self.min_input_size = self.input_multiple = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC")
        side = img_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, depth)
        blocks = []
        for i in range(depth):
            if method == "hyena2d" or i <= depth // 2:  # hyena2dattn: attention after block depth // 2
                flip = directional_mode == "seq" and i % 2 == 0
                blocks.append(HyenaBlock(embed_dim, side, mlp_ratio, filter_order, flip, dpr[i]))
            else:
                blocks.append(PreNormBlock(embed_dim, num_heads, mlp_ratio, True, dpr[i]))
        self.blocks = nn.Sequential(*blocks)
        self.hyena_blocks = sum(isinstance(b, HyenaBlock) for b in blocks)
        self.has_attention = self.hyena_blocks < depth
        self.norm = LayerNorm(embed_dim)
        self.set_feature_info([FeatureInfo(embed_dim, patch_size, f"blocks.{i}") for i in range(depth)])
        # NOTE: the official runs (no class token) classify token 0, the top-left patch, after the final norm
        self.init_head(embed_dim, num_classes, drop_rate, pool_type="token")
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    def stage_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward_stem(self, x: Tensor) -> Tensor:
        """Image ``(B, C, H, W)`` -> map ``(B, H/p, W/p, D)`` with position embeddings added."""
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, H', W', D)
        return self.pos_drop(x + pos_embed_for(self.pos_embed, x, self.patch_embed.grid_size))

    def _run(self, x: Tensor, last: int) -> list[Tensor]:
        """Outputs of blocks 0..last: maps ``(B, H, W, D)`` from Hyena blocks, tokens ``(B, N, D)`` after."""
        x = self.forward_stem(x)
        outs = []
        for i, block in enumerate(self.blocks[:last + 1]):
            if i == self.hyena_blocks:
                x = x.flatten(1, 2)  # (B, H, W, D) -> (B, N, D): attention blocks run on tokens
            x = self.run_stage(block, x)
            outs.append(x)
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        """Tokens ``(B, N, D)`` after the final norm."""
        self.check_input(x)
        x = self._run(x, len(self.blocks) - 1)[-1]
        if self.hyena_blocks == len(self.blocks):
            x = x.flatten(1, 2)  # (B, H, W, D) -> (B, N, D)
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """The chosen blocks' outputs (before the final norm) as ``(B, D, H/p, W/p)`` maps."""
        idx = resolve_indices(indices, len(self.blocks), self.name)
        self.check_input(x)
        H, W = x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1]
        outs = self._run(x, idx[-1])
        maps = []
        for i in idx:
            y = outs[i] if i < self.hyena_blocks else outs[i].reshape(outs[i].shape[0], H, W, -1)  # (B, N, D) -> map
            maps.append(y.permute(0, 3, 1, 2))  # (B, H, W, D) -> (B, D, H, W)
        return maps

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official (vendored timm) keys -> ours: ``head.*`` -> ``head.fc.*``; the rest is the same."""
        return {("head.fc." + k[5:] if k in ("head.weight", "head.bias") else k): v for k, v in state_dict.items()}


def _init_weights(m: nn.Module) -> None:
    init_linear(m, std=0.02)


_NOIN = ("no ImageNet-1k numbers in the paper or the repository (smaller datasets only; the README trains on "
         "CelebA); params: the official code with 1000 classes, not a paper figure")
_CFG = ("official VisionTransformer (vendored timm) built as main.py --model {m} --method {method} "
        "--directional_mode seq --hyena2d_filter (the README's command; filter MLP width 64, order 2); gmacs: torch's "
        "FlopCounterMode on it at 224 with visionzoo's FFT formulas (fvcore cannot count FFTs); it includes a 1-D "
        "irfft the official fftconv2d computes and discards, so visionzoo.profile gives {ours} (about 1% less)")
VARIANTS = {
    "hyena_vit_test":         Variant(dict(embed_dim=64, depth=5, num_heads=2, method="hyena2dattn", filter_order=16),
                                      params_m=0.376364, input_size=64,
                                      notes="tiny config for tests (three Hyena blocks on a 4x4 grid, the first "
                                            "and third flipped, then two attention blocks)"),
    "hyena_vit_tiny":         Variant(dict(), params_m=6.042400, gmacs=1.207, paper=Paper(6.0, None, None, _NOIN),
                                      notes=_CFG.format(m="deit_tiny_patch16_224", ours=1.196, method="hyena2d")),
    "hyena_vit_tiny_hybrid":  Variant(dict(method="hyena2dattn"), params_m=5.906830,
                                      gmacs=1.223, paper=Paper(5.9, None, None, _NOIN),
                                      notes=_CFG.format(m="deit_tiny_patch16_224", ours=1.217, method="hyena2dattn")),
    "hyena_vit_small":        Variant(dict(embed_dim=384, num_heads=6), params_m=22.594144,
                                      gmacs=4.474, paper=Paper(22.6, None, None, _NOIN),
                                      notes=_CFG.format(m="deit_small_patch16_224", ours=4.453, method="hyena2d")),
    "hyena_vit_small_hybrid": Variant(dict(embed_dim=384, num_heads=6, method="hyena2dattn"),
                                      params_m=22.367374,
                                      gmacs=4.516, paper=Paper(22.4, None, None, _NOIN),
                                      notes=_CFG.format(m="deit_small_patch16_224", ours=4.503, method="hyena2dattn")),
}
register_family(HyenaViT, VARIANTS, paper="arXiv:2309.13600", kind="vit", family="hyena_vit",
                code="Itamarzimm/HyenaND@e8b875ea852b8b255211f9562ddc242fe2f73ab1 "
                     "pytorch-image-models/timm/models/layers/hyena2d.py")
