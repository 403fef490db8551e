"""T2T-ViT, from "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet" (Yuan et al., ICCV
2021). https://arxiv.org/abs/2101.11986

The tokens-to-token (T2T) module replaces the patch embedding: three soft splits (overlapping unfolds, 7x7/4 then
3x3/2 twice; 56^2 -> 28^2 -> 14^2 tokens at 224 px), the first two each followed by a one-head T2T layer on the
unfolded tokens that also narrows them to ``token_dim``; then a linear projection. The T2T layer is a Performer
(``t2t_vit_*``) or a transformer (``t2t_vit_t_*``). The Performer's attention is random-feature linear attention
(positive features ``exp(w x - |x|^2 / 2)``, no softmax over attention logits), so it does not go through
``layers.AttentionCore`` and attention tools do not see it; the transformer T2T layer is softmax attention through
``AttentionCore``. A class token and a FIXED sinusoidal position table (1-D over the flattened tokens, not learned)
follow, then deep-narrow ViT blocks (``layers.TokenBlock``: token reduction applies).

Differs from the paper: none. Follows the official yitu-opensource/T2T-ViT (``models/t2t_vit.py``,
``token_performer.py``, ``token_transformer.py``; BSD-3-Clause-Clear) at 0f63dc9. Our keys are the official ones
except ``head`` -> ``head.fc`` and the Performer MLP's ``mlp.0`` / ``mlp.2`` -> ``mlp.fc1`` / ``mlp.fc2``
(``T2TViT.remap``). As there, the position table and the Performer's random features are parameters that are not
trained (``requires_grad=False``) and count in the parameter total; for another input size the position table is
the same sinusoid rule over the new token count. The released weights use ``qk_scale = embed_dim ** -0.5`` in the ViT
blocks (the official factories set it when ``pretrained``); the registered variants set it too, so their pretrained
weights load as released (the constructor's default, ``None``, is ``head_dim ** -0.5``, the official default for
training from scratch).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, tokens_to_map
from visionzoo.layers import (
    AttentionCore,
    LayerType,
    Mlp,
    PreNormBlock,
    drop_path_rates,
    get_norm,
    init_trunc_normal,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["T2TViT"]

SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))  # (kernel, stride, padding) of the three soft splits


def sinusoid_table(n: int, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None
                   ) -> Tensor:
    """``(1, n, dim)``: position p, channel j -> sin / cos (even / odd j) of ``p / 10000^(2 * (j // 2) / dim)``."""
    pos = torch.arange(n, dtype=torch.float64, device=device)[:, None]
    j = torch.arange(dim, device=device)
    angle = pos / torch.pow(10000.0, (2 * (j // 2)).double() / dim)  # (n, dim)
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(dtype).unsqueeze(0)


@trace_leaf
def pos_embed_for(pos_embed: Tensor, x: Tensor) -> Tensor:
    """The table for the tokens ``x`` ``(B, 1 + N, C)``: the stored one, or the same rule over another count."""
    if x.shape[1] == pos_embed.shape[1]:
        return pos_embed
    return sinusoid_table(x.shape[1], x.shape[2], pos_embed.dtype, pos_embed.device)


@trace_leaf
def soft_split(x: Tensor, kernel: int, stride: int, padding: int) -> tuple[Tensor, tuple[int, int]]:
    """Overlapping unfold of ``x`` ``(B, C, H, W)`` -> ``(B, h * w, C * k * k)`` tokens (``nn.Unfold``'s channel
    order) and their grid ``(h, w)``; by strided slices (exact, no MACs, exportable)."""
    B, C, H, W = x.shape
    h, w = (H + 2 * padding - kernel) // stride + 1, (W + 2 * padding - kernel) // stride + 1
    x = F.pad(x, (padding,) * 4)
    cols = [x[:, :, i:i + stride * (h - 1) + 1:stride, j:j + stride * (w - 1) + 1:stride]
            for i in range(kernel) for j in range(kernel)]
    x = torch.stack(cols, dim=2).reshape(B, C * kernel * kernel, h * w)  # (B, C, k*k, h, w) -> (B, C*k*k, hw)
    return x.transpose(1, 2), (h, w)


class TokenPerformer(nn.Module):
    """One-head Performer T2T layer: random-feature attention narrowing ``dim`` -> ``in_dim`` (residual from v),
    then an MLP. Not softmax attention."""

    def __init__(self, dim: int, in_dim: int, kernel_ratio: float = 0.5, drop: float = 0.1) -> None:
        super().__init__()
        self.emb = in_dim
        self.kqv = nn.Linear(dim, 3 * in_dim)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(in_dim, in_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(in_dim)
        self.epsilon = 1e-8
        self.mlp = Mlp(in_dim, in_dim)
        self.mlp_drop = nn.Dropout(drop)
        self.m = int(in_dim * kernel_ratio)
        w = torch.empty(self.m, in_dim)
        if not w.is_meta:
            w = nn.init.orthogonal_(torch.randn(self.m, in_dim)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)  # fixed random features, saved with the weights

    def features(self, x: Tensor) -> Tensor:
        """Positive random features ``exp(w x - |x|^2 / 2) / sqrt(m)``: ``(B, T, emb)`` -> ``(B, T, m)``."""
        return torch.exp(x @ self.w.t() - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(self.m)

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        k, q, v = self.kqv(self.norm1(x)).split(self.emb, dim=-1)
        kp, qp = self.features(k), self.features(q)  # (B, T, m)
        denom = qp @ kp.sum(1).unsqueeze(-1)  # (B, T, m) @ (B, m, 1) -> (B, T, 1)
        kv = v.transpose(1, 2) @ kp  # (B, emb, T) @ (B, T, m) -> (B, emb, m)
        y = (qp @ kv.transpose(1, 2)) / (denom + self.epsilon)  # (B, T, m) @ (B, m, emb) -> (B, T, emb)
        x = v + self.dp(self.proj(y))  # the input is wider than the output: v is the residual
        return x + self.mlp_drop(self.mlp(self.norm2(x)))


class TokenTransformerAttention(nn.Module):
    """One-head softmax attention narrowing ``dim`` -> ``in_dim``, scaled by ``dim ** -0.5``; v is the residual."""

    def __init__(self, dim: int, in_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.scale = dim ** -0.5
        self.qkv = nn.Linear(dim, in_dim * 3, bias=False)
        self.core = AttentionCore()
        self.proj = nn.Linear(in_dim, in_dim)

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 1, self.in_dim).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, 1, N, d)
        x = self.core(q, k, v, scale=self.scale, grid=grid)
        return v.squeeze(1) + self.proj(x.squeeze(1))  # (B, 1, N, d) -> (B, N, d)


class TokenTransformer(nn.Module):
    """Transformer T2T layer: ``attn(norm1(x))`` (v residual), then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, in_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenTransformerAttention(dim, in_dim)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_dim, in_dim)

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        x = self.attn(self.norm1(x), grid)
        return x + self.mlp(self.norm2(x))


class T2TModule(nn.Module):
    """Soft split, T2T layer, re-structurize to a map; twice; a last soft split and a linear projection."""

    def __init__(self, tokens_type: str, in_chans: int, embed_dim: int, token_dim: int) -> None:
        super().__init__()
        layer = TokenPerformer if tokens_type == "performer" else TokenTransformer
        self.attention1 = layer(in_chans * 7 * 7, token_dim)
        self.attention2 = layer(token_dim * 3 * 3, token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        for split, layer in zip(SPLITS, (self.attention1, self.attention2)):
            x, (h, w) = soft_split(x, *split)
            x = layer(x, (h, w))  # (B, hw, C k k) -> (B, hw, token_dim)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, hw, c) -> (B, c, h, w)
        x, _ = soft_split(x, *SPLITS[2])
        return self.project(x)  # (B, hw, c k k) -> (B, hw, D)


class T2TBlock(PreNormBlock):
    """Pre-norm ViT block without qkv bias, with T2T-ViT's attention scale (``qk_scale``) where it sets one."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_scale: float | None, drop_path: float,
                 norm_layer: LayerType) -> None:
        super().__init__(dim, num_heads, mlp_ratio, False, drop_path, norm_layer, prefix_tokens=1)
        if qk_scale is not None:
            self.attn.scale = qk_scale

class T2TViT(Backbone):
    """T2T module, class token, fixed sinusoidal positions, ViT blocks, final norm, class-token head.

    Args:
        tokens_type: ``"performer"`` (random-feature attention) or ``"transformer"`` (softmax) T2T layers.
        token_dim: width of the tokens inside the T2T module.
        qk_scale: the ViT blocks' attention scale; ``None`` = ``head_dim ** -0.5`` (``embed_dim ** -0.5`` for the
            released weights).
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    min_input_size = 16
    input_multiple = 16
    no_weight_decay_keys = ("cls_token",)
    first_conv = "tokens_to_token.attention1.kqv"

    def __init__(self, img_size: int = 224, tokens_type: str = "performer", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, token_dim: int = 64, qk_scale: float | None = None, *,
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: LayerType = nn.LayerNorm) -> None:
        super().__init__()
        if tokens_type not in ("performer", "transformer"):
            raise ValueError(f"t2t_vit: tokens_type must be 'performer' or 'transformer', got {tokens_type!r}")
        if img_size % 16:
            raise ValueError(f"t2t_vit: img_size must be a multiple of 16 (strides 4, 2, 2), got {img_size}")
        self.in_chans = in_chans
        self.tokens_to_token = T2TModule(tokens_type, in_chans, embed_dim, token_dim)
        num_patches = (img_size // 16) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sinusoid_table(num_patches + 1, embed_dim, device=self.cls_token.device),
                                      requires_grad=False)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([T2TBlock(embed_dim, num_heads, mlp_ratio, qk_scale, dpr[i], norm_layer)
                                     for i in range(depth)])
        self.norm = get_norm(norm_layer)(embed_dim)
        self.set_feature_info([FeatureInfo(embed_dim, 16, f"blocks.{i}") for i in range(depth)])
        self.init_head(embed_dim, num_classes, drop_rate, pool_type="token", prefix_tokens=1)
        if not self.cls_token.is_meta:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> Tensor:
        """Image -> ``(B, 1 + N, D)`` tokens: T2T module, class token, position table."""
        x = self.tokens_to_token(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # -> (B, 1 + N, D)
        return x + pos_embed_for(self.pos_embed, x)

    def stage_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward_norm(self, x: Tensor) -> Tensor:
        """``forward_features`` gives tokens ``(B, 1 + N, D)`` after this final norm."""
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """Patch tokens of the chosen blocks (before the final norm) as ``(B, D, H/16, W/16)`` maps."""
        grid = x.shape[-2] // 16, x.shape[-1] // 16
        return self.token_intermediates(x, indices, lambda t: tokens_to_map(t[:, 1:], grid))  # after the class token

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours: ``head.*`` -> ``head.fc.*``; the Performer MLP's ``mlp.0`` / ``mlp.2`` ->
        ``mlp.fc1`` / ``mlp.fc2``. Keys already in our layout pass unchanged."""
        out = {}
        for k, v in state_dict.items():
            if k in ("head.weight", "head.bias"):
                k = "head.fc." + k.split(".")[1]
            elif k.startswith("tokens_to_token.") and ".mlp.0." in k:
                k = k.replace(".mlp.0.", ".mlp.fc1.")
            elif k.startswith("tokens_to_token.") and ".mlp.2." in k:
                k = k.replace(".mlp.2.", ".mlp.fc2.")
            out[k] = v
        return out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        init_trunc_normal(m, std=0.02)


_README = "official README (yitu-opensource/T2T-ViT), T2T-ViT Models table"
# the released weights use qk_scale = embed_dim ** -0.5 in the ViT blocks (the official factories set it for them)
_S256, _S384, _S448, _S512 = 256 ** -0.5, 384 ** -0.5, 448 ** -0.5, 512 ** -0.5
_P = dict(tokens_type="performer")
_T = dict(tokens_type="transformer")
VARIANTS = {
    "t2t_vit_test": Variant(dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16), params_m=0.158718,
                            input_size=64),
    "t2t_vit_7":    Variant(dict(**_P, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, qk_scale=_S256),
                            params_m=4.310222, gmacs=1.156, paper=Paper(4.3, 1.1, 71.7, _README)),
    "t2t_vit_10":   Variant(dict(**_P, embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0, qk_scale=_S256),
                            params_m=5.889230, gmacs=1.527, paper=Paper(5.9, 1.5, 75.2, _README)),
    "t2t_vit_12":   Variant(dict(**_P, embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0, qk_scale=_S256),
                            params_m=6.941902, gmacs=1.775, paper=Paper(6.9, 1.8, 76.5, _README)),
    "t2t_vit_14":   Variant(dict(**_P, embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, qk_scale=_S384),
                            params_m=21.545550, gmacs=4.800, paper=Paper(21.5, 4.8, 81.5, _README)),
    "t2t_vit_19":   Variant(dict(**_P, embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0, qk_scale=_S448),
                            params_m=39.177422, gmacs=8.503, paper=Paper(39.2, 8.5, 81.9, _README)),
    "t2t_vit_24":   Variant(dict(**_P, embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0, qk_scale=_S512),
                            params_m=64.105934, gmacs=13.692, paper=Paper(64.1, 13.8, 82.3, _README)),
    "t2t_vit_t_14": Variant(dict(**_T, embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, qk_scale=_S384),
                            params_m=21.541070, gmacs=6.106, paper=Paper(21.5, 6.1, 81.7, _README)),
    "t2t_vit_t_19": Variant(dict(**_T, embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0, qk_scale=_S448),
                            params_m=39.172942, gmacs=9.808, paper=Paper(39.2, 9.8, 82.4, _README)),
    "t2t_vit_t_24": Variant(dict(**_T, embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0, qk_scale=_S512),
                            params_m=64.101454, gmacs=14.998, paper=Paper(64.1, 15.0, 82.6, _README)),
}
register_family(T2TViT, VARIANTS, paper="arXiv:2101.11986", kind="vit",
                code="yitu-opensource/T2T-ViT@0f63dc9 models/t2t_vit.py")
