"""ViR, from "ViR: Towards Efficient Vision Retention Backbones" (also "ViR: Vision Retention Networks";
Hatamizadeh, Ranzinger, Lan, Alvarez, Fidler, Kautz, 2023). https://arxiv.org/abs/2310.19731

An isotropic ViT whose self-attention is replaced by multi-scale retention (RetNet, Sun et al. 2023,
https://arxiv.org/abs/2307.08621): per head, ``Ret(X) = (Q K^T * D) V`` with the causal decay mask
``D[n, m] = gamma^(n - m)`` for ``n >= m`` (0 otherwise), one decay ``gamma`` per head; the heads are
group-normalised, gated by ``swish(X W_G)`` and projected by ``W_O``. Retention has no softmax, so this family has
no ``AttentionCore`` (``has_attention = False``) and no token-reduction seam: the decay makes the token order (and
each token's distance) part of the computation, which merging or dropping tokens would change. Retention has three
equal forms, chosen with ``mode`` (or ``set_mode``): ``"parallel"`` (the masked matrix product, the default),
``"recurrent"`` (a state ``S_n = gamma S_{n-1} + k_n^T v_n``, ``o_n = q_n S_n``, one token at a time) and
``"chunkwise"`` (parallel inside chunks of ``chunk_size`` tokens, recurrent across them).

No official code exists (NVlabs/ViR holds only a README); this file is built from the papers' text. Choices where
the text we could read is silent (each recorded in the variant notes): the class token is appended at the END of
the patch sequence so that causal retention lets it see every patch (``forward_features`` returns it first, as
the library's token layout has prefix tokens first); a learned absolute position table (no xPos rotation);
RetNet's decays ``gamma_h = 1 - 2^(-5 - h)``; keys scaled by ``head_dim^-0.5``; no bias in the q/k/v/gate/output
projections (RetNet); value width = model width; no intermediate normalisation of ``Q K^T * D`` (RetNet's
normalisers are undone by the GroupNorm up to its eps, and leaving them out keeps the three forms equal).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, tokens_to_map
from visionzoo.layers import (
    DropPath,
    LayerType,
    Mlp,
    PatchEmbed,
    drop_path_rates,
    get_norm,
    init_linear,
    resample_abs_pos_embed,
    trace_leaf,
)
from visionzoo.registry import Variant, register_family

__all__ = ["ViR"]

MODES = ("parallel", "recurrent", "chunkwise")


def decay_mask(log_decay: Tensor, n: int) -> Tensor:
    """``(heads, n, n)`` causal mask ``gamma^(i - j)`` for ``i >= j``, else 0; ``log_decay`` ``(heads,)``."""
    idx = torch.arange(n, device=log_decay.device, dtype=log_decay.dtype)
    dist = idx[:, None] - idx[None, :]  # (n, n), i - j
    mask = torch.exp(log_decay[:, None, None] * dist.clamp(min=0))  # (heads, n, n)
    return mask * (dist >= 0).to(mask.dtype)


def retention_parallel(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
    """``(Q K^T * D) V`` for ``q``, ``k`` ``(B, h, N, d)``, ``v`` ``(B, h, N, dv)``."""
    return ((q @ k.transpose(-2, -1)) * decay_mask(log_decay, q.shape[-2])) @ v


def retention_recurrent(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
    """One token at a time: ``S_n = gamma S_{n-1} + k_n^T v_n``, ``o_n = q_n S_n``."""
    gamma = torch.exp(log_decay)[None, :, None, None]  # (1, h, 1, 1)
    state = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])  # (B, h, d, dv)
    outs = []
    for n in range(q.shape[-2]):
        state = gamma * state + k[:, :, n, :, None] * v[:, :, n, None, :]  # (B, h, d, 1) * (B, h, 1, dv)
        outs.append(q[:, :, n, None, :] @ state)  # (B, h, 1, d) @ (B, h, d, dv) -> (B, h, 1, dv)
    return torch.cat(outs, dim=2)


def retention_chunkwise(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, chunk_size: int) -> Tensor:
    """Parallel inside chunks of ``chunk_size`` tokens; the state ``R`` carries the earlier chunks:
    ``o = (Q_c K_c^T * D) V_c + (Q_c R) * gamma^(j + 1)``, ``R <- gamma^L R + K_c^T (V_c * gamma^(L - j - 1))``."""
    N = q.shape[-2]
    state = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])  # (B, h, d, dv)
    ld = log_decay[:, None]  # (h, 1)
    outs = []
    for start in range(0, N, chunk_size):
        qc, kc, vc = (t[:, :, start:start + chunk_size] for t in (q, k, v))
        L = qc.shape[-2]
        j = torch.arange(L, device=q.device, dtype=q.dtype)
        inner = retention_parallel(qc, kc, vc, log_decay)
        cross = (qc @ state) * torch.exp(ld * (j + 1))[None, :, :, None]  # (B, h, L, dv) * (1, h, L, 1)
        outs.append(inner + cross)
        weight = torch.exp(ld * (L - j - 1))[None, :, :, None]  # (1, h, L, 1)
        state = torch.exp(ld * L)[None, :, :, None] * state + kc.transpose(-2, -1) @ (vc * weight)
    return torch.cat(outs, dim=2)


class MultiScaleRetention(nn.Module):
    """Retention per head with its own decay, GroupNorm over each head, a swish gate, an output projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"vir: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.g = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.group_norm = nn.GroupNorm(num_heads, dim, eps=1e-6)
        gammas = [1 - 2 ** (-5 - h) for h in range(num_heads)]
        self.register_buffer("log_decay", torch.log(torch.tensor(gammas, dtype=torch.float64)).float(),
                             persistent=False)
        self.mode = "parallel"
        self.chunk_size = 64

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = (proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        k = k * self.head_dim ** -0.5  # (B, N, C) -> (B, h, N, d) each
        if self.mode == "recurrent":
            y = retention_recurrent(q, k, v, self.log_decay)
        elif self.mode == "chunkwise":
            y = retention_chunkwise(q, k, v, self.log_decay, self.chunk_size)
        else:
            y = retention_parallel(q, k, v, self.log_decay)
        y = self.group_norm(y.transpose(1, 2).reshape(B * N, C)).reshape(B, N, C)  # (B, h, N, d) -> (B, N, C)
        return self.out(F.silu(self.g(x)) * y)


class ViRBlock(nn.Module):
    """Pre-norm block: x + retention(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 norm_layer: LayerType = "ln", act_layer: LayerType = "gelu") -> None:
        super().__init__()
        norm = get_norm(norm_layer)
        self.norm1 = norm(dim)
        self.retention = MultiScaleRetention(dim, num_heads)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.retention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


@trace_leaf
def _pos_embed_for(pos_embed: Tensor, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """The ``(1, H*W + 1, D)`` table (patches, then the class token) for the patch grid of ``x`` ``(B, H, W, D)``."""
    cls_last = torch.cat([pos_embed[:, -1:], pos_embed[:, :-1]], dim=1)  # class row first for the resample
    table = resample_abs_pos_embed(cls_last, tuple(x.shape[1:3]), grid_size, num_prefix_tokens=1)
    return torch.cat([table[:, 1:], table[:, :1]], dim=1)


class ViR(Backbone):
    """Patchify, append a class token, add a learned position table, run retention blocks.

    Args:
        img_size: the input size the position table is built for; other sizes resample it on the fly.
        mode: ``"parallel"``, ``"recurrent"`` or ``"chunkwise"``: the form of retention (same output).
        chunk_size: tokens per chunk in the chunkwise form.
    """

    kind = "vit"
    takes_img_size = True
    takes_patch_size = True
    min_input_size = 16
    input_multiple = 16
    no_weight_decay_keys = ("pos_embed", "cls_token")
    first_conv = "patch_embed.proj"

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, mode: str = "parallel", chunk_size: int = 64, *,
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: LayerType = "ln", act_layer: LayerType = "gelu") -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"vir: img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.min_input_size = self.input_multiple = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[ViRBlock(embed_dim, num_heads, mlp_ratio, dpr[i], norm_layer, act_layer)
                                      for i in range(depth)])
        self.norm = get_norm(norm_layer)(embed_dim)
        self.set_feature_info([FeatureInfo(embed_dim, patch_size, f"blocks.{i}") for i in range(depth)])
        self.init_head(embed_dim, num_classes, drop_rate, pool_type="token", prefix_tokens=1)
        self.set_mode(mode, chunk_size)
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def set_mode(self, mode: str, chunk_size: int | None = None) -> None:
        """Compute retention in ``mode`` (``"parallel"``, ``"recurrent"``, ``"chunkwise"``) from now on."""
        if mode not in MODES:
            raise ValueError(f"vir: mode must be one of {MODES}, got {mode!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"vir: chunk_size must be >= 1, got {chunk_size}")
        for m in self.modules():
            if isinstance(m, MultiScaleRetention):
                m.mode = mode
                m.chunk_size = chunk_size or m.chunk_size
        self.mode = mode

    def forward_stem(self, x: Tensor) -> Tensor:
        """Image ``(B, C, H, W)`` -> tokens ``(B, H/p * W/p + 1, D)``: patches, then the class token."""
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, H/p, W/p, D)
        B, H, W, D = x.shape
        pos = _pos_embed_for(self.pos_embed, x, self.patch_embed.grid_size)
        x = torch.cat([x.reshape(B, H * W, D), self.cls_token.expand(B, -1, -1)], dim=1)  # -> (B, HW + 1, D)
        return x + pos

    def stage_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward_norm(self, x: Tensor) -> Tensor:
        """``forward_features`` gives tokens ``(B, 1 + N, D)`` after this final norm, the class token moved to the
        front."""
        x = self.norm(x)
        return torch.cat([x[:, -1:], x[:, :-1]], dim=1)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """Patch tokens of the chosen blocks (before the final norm) as ``(B, D, H/p, W/p)`` maps."""
        grid = x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1]
        return self.token_intermediates(x, indices, lambda t: tokens_to_map(t[:, :-1], grid))  # before the class token


def _init_weights(m: nn.Module) -> None:
    init_linear(m, std=0.02)


_NOTES = ("built from the text (no official code): retention as RetNet's multi-scale retention (arXiv "
          "2307.08621 section 2.1-2.2: decays 1 - 2^(-5-h), GroupNorm per head, swish gate, no projection bias); "
          "class token appended at the end of the sequence (causal retention: it is the only token seeing every "
          "patch); learned absolute positions. The paper's variant table could not be read here, so only the test "
          "configuration is registered; ViT sizes are built with embed_dim/depth/num_heads")
VARIANTS = {
    "vir_test": Variant(dict(patch_size=16, embed_dim=32, depth=2, num_heads=2), params_m=0.085576, input_size=64,
                        notes=_NOTES),
}
register_family(ViR, VARIANTS, paper="arXiv:2310.19731", kind="vit", code=None)
