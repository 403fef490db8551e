"""VOLO, from "VOLO: Vision Outlooker for Visual Recognition" (Yuan et al., TPAMI 2022). https://arxiv.org/abs/2106.13112

A 3-conv stem (stride 8), a stage of Outlookers at 1/8, a 2x2 patch merge, three stages of plain transformer blocks
at 1/16 (a learned position table is added before them), two class-attention blocks that bring in the class token,
and a token-labelling head: the class token's logits plus half the per-class maximum over the patch tokens' logits
(``aux_head``).

Outlook attention is softmax attention over a k x k neighbourhood whose k^2 x k^2 logits a Linear predicts per
(pooled) location, with no queries and keys. It runs through ``AttentionCore`` as ``softmax(q k^T * scale) v`` with
``q`` the predicted logit rows and ``k`` the identity (each window position's one-hot code), so ``q k^T`` is exactly
the predicted logits; the batch dim is ``B x locations``, each location a window of k x k queries (``grid``) whose
overlap the core declares (``core.unfold``) for the explain tools.

Differs from the paper: MixToken (the training-time patch swap of token labelling, timm's ``use_mix_token``) is
not implemented; ``set_dense_training(True)`` gives the dense token-labelling output instead, ``(class logits,
per-token logits)`` in training, as the official ``return_dense``. With ``num_classes=0`` the head returns the class
token alone (timm adds half the maximum of the raw patch features to it). Inputs of another size than the model was
built for get a bicubic resample of the position table (timm's VOLO has a fixed input size).

Follows timm's ``volo.py`` (Apache-2.0; itself from sail-sg/volo, Apache-2.0), whose state-dict keys we keep except
for the head: ours is ``head.fc`` and ``head.aux_head`` where timm (and the official code) have ``head`` and
``aux_head``; ``VOLO.remap`` translates them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, resolve_indices
from visionzoo.layers import (
    Attention,
    AttentionCore,
    ClassifierHead,
    DropPath,
    Mlp,
    TokenBlock,
    init_linear,
    resample_abs_pos_embed,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["VOLO"]


@trace_leaf
def pos_embed_for(pos_embed: Tensor, x: Tensor) -> Tensor:
    """The ``(1, H, W, C)`` position table for the map ``x`` ``(B, H, W, C)``: as is, or resampled bicubically."""
    gh, gw, C = pos_embed.shape[1:]
    H, W = x.shape[1:3]
    if (H, W) == (gh, gw):
        return pos_embed
    flat = resample_abs_pos_embed(pos_embed.reshape(1, gh * gw, C), (H, W), (gh, gw), num_prefix_tokens=0)
    return flat.reshape(1, H, W, C)


class OutlookAttention(nn.Module):
    """Per-location softmax attention over the k x k neighbourhood of values, folded back (overlaps summed)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 3, padding: int = 1, stride: int = 2,
                 qkv_bias: bool = False, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size, self.padding, self.stride = kernel_size, padding, stride
        self.scale = self.head_dim ** -0.5
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn = nn.Linear(dim, kernel_size ** 4 * num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.core = AttentionCore()
        self.core.unfold = (kernel_size, stride, padding)  # overlapping k x k windows, one per stride step (explain)
        self.proj = nn.Linear(dim, dim)
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        k, s, heads = self.kernel_size, self.stride, self.num_heads
        k2 = k * k
        h, w = (H + s - 1) // s, (W + s - 1) // s
        v = self.v(x).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        v = F.unfold(v, k, padding=self.padding, stride=s)  # -> (B, C * k2, h * w)
        v = v.reshape(B, heads, self.head_dim, k2, h * w).permute(0, 4, 1, 3, 2)  # -> (B, hw, heads, k2, d)
        v = v.reshape(-1, heads, k2, self.head_dim)  # -> (B * hw windows, heads, k2, d)
        q = self.attn(self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))  # (B, h, w, heads * k2 * k2)
        q = q.reshape(-1, heads, k2, k2)  # the logit rows of each window: (B * hw, heads, k2 queries, k2)
        keys = torch.eye(k2, dtype=q.dtype, device=q.device).expand_as(q)  # one-hot keys: q @ keys^T == q
        drop = self.attn_drop.p if self.training else 0.0
        x = self.core(q, keys, v, scale=self.scale, dropout_p=drop, grid=(k, k))  # (B * hw, heads, k2, d)
        x = x.reshape(B, h * w, heads, k2, self.head_dim).permute(0, 2, 4, 3, 1)  # -> (B, heads, d, k2, hw)
        x = x.reshape(B, C * k2, h * w)
        x = F.fold(x, (H, W), k, padding=self.padding, stride=s)  # -> (B, C, H, W), overlaps summed
        return self.proj(x.permute(0, 2, 3, 1))  # (B, C, H, W) -> (B, H, W, C)


class Outlooker(nn.Module):
    """x + outlook_attn(norm1(x)), then x + mlp(norm2(x)), on a (B, H, W, C) map."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.0, kernel_size: int = 3, padding: int = 1,
                 stride: int = 2, qkv_bias: bool = False, attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = OutlookAttention(dim, num_heads, kernel_size, padding, stride, qkv_bias, attn_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VOLOBlock(TokenBlock):
    """Pre-norm transformer block over the (B, N, C) patch tokens (no class token yet)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.0, qkv_bias: bool = False,
                 attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()


class ClassAttention(nn.Module):
    """The class token (token 0) attends to every token; returns its update (B, 1, C)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.core = AttentionCore(prefix_tokens=1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.q(x[:, :1]).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)  # -> (B, heads, 1, d)
        drop = self.attn_drop.p if self.training else 0.0
        # grid (0, 0): the one query is the class token (a prefix token), no patch token queries
        x = self.core(q, k, v, scale=self.scale, dropout_p=drop, grid=(0, 0))  # (B, heads, 1, d)
        return self.proj(x.transpose(1, 2).reshape(B, 1, C))  # (B, heads, 1, d) -> (B, 1, C)


class ClassBlock(nn.Module):
    """CaiT-style class-attention block: only the class token is updated."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.0, qkv_bias: bool = False,
                 attn_drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads, qkv_bias, attn_drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        cls = x[:, :1] + self.attn(self.norm1(x))
        cls = cls + self.mlp(self.norm2(cls))
        return torch.cat([cls, x[:, 1:]], dim=1)


class VOLOStem(nn.Module):
    """Conv7x7/2 -> BN -> ReLU, two Conv3x3 -> BN -> ReLU (``conv``), then a patch conv (``proj``): stride ``patch``."""

    def __init__(self, in_chans: int, hidden_dim: int, embed_dim: int, patch_size: int = 8) -> None:
        super().__init__()
        layers = []
        for i, k in enumerate((7, 3, 3)):
            layers += [nn.Conv2d(in_chans if i == 0 else hidden_dim, hidden_dim, k, 2 if i == 0 else 1, k // 2,
                                 bias=False), nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Conv2d(hidden_dim, embed_dim, patch_size // 2, patch_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.conv(x)).permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H/p, W/p, D)


class Downsample(nn.Module):
    """A 2x2 patch merge on a (B, H, W, C) map."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, 2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C) -> (B, H/2, W/2, C')


class VOLOHead(ClassifierHead):
    """Class-token logits plus half the per-class maximum of the patch tokens' logits (token labelling).

    With ``return_dense`` set and in training, returns ``(class logits, per-token logits (B, N, classes))``.
    """

    def __init__(self, in_features: int, num_classes: int = 1000, drop_rate: float = 0.0,
                 use_aux_head: bool = True) -> None:
        super().__init__(in_features, num_classes, "token", drop_rate, prefix_tokens=1)
        self.fc_names = ("fc", "aux_head") if use_aux_head else ("fc",)
        if use_aux_head:
            self.aux_head = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()
        self.return_dense = False

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        cls = self.forward_pre_logits(x)
        if pre_logits or isinstance(self.fc, nn.Identity):  # num_classes=0 (a swapped Linear is still a classifier)
            return cls
        out = self.fc(cls)
        if len(self.fc_names) == 1:
            return out
        aux = self.aux_head(self.drop(x[:, 1:]))  # (B, N, C) -> (B, N, classes)
        if self.return_dense and self.training:
            return out, aux
        return out + 0.5 * aux.amax(1)


class VOLO(Backbone):
    """Outlooker stages on a 1/8 map, transformer stages on 1/16 tokens, class attention, token-labelling head.

    Args:
        layers: blocks per stage; ``outlook_attention`` says which stages are Outlookers, ``downsamples`` after
            which stage a 2x2 patch merge follows.
        img_size: the input size the position table is built for; other sizes resample it.
        num_post_layers: class-attention blocks at the end.
        use_aux_head: the token-labelling head (``head.aux_head``).
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    min_input_size = 16
    input_multiple = 16
    no_weight_decay_keys = ("pos_embed", "cls_token")
    first_conv = "patch_embed.conv.0"

    def __init__(self, layers: tuple[int, ...] = (4, 4, 8, 2), embed_dims: tuple[int, ...] = (192, 384, 384, 384),
                 num_heads: tuple[int, ...] = (6, 12, 12, 12), mlp_ratio: float = 3.0, stem_hidden_dim: int = 64,
                 img_size: int = 224, patch_size: int = 8, downsamples: tuple[bool, ...] = (True, False, False, False),
                 outlook_attention: tuple[bool, ...] = (True, False, False, False), qkv_bias: bool = False,
                 num_post_layers: int = 2, use_aux_head: bool = True, *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, pos_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        n = len(layers)
        if not (len(embed_dims) == len(num_heads) == len(downsamples) == len(outlook_attention) == n):
            raise ValueError(f"volo: layers, embed_dims, num_heads, downsamples and outlook_attention need one entry "
                             f"per stage, got lengths {len(layers)}, {len(embed_dims)}, {len(num_heads)}, "
                             f"{len(downsamples)}, {len(outlook_attention)}")
        if patch_size not in (4, 8, 16):
            raise ValueError(f"volo: patch_size must be 4, 8 or 16, got {patch_size}")
        if downsamples[-1] or any(outlook_attention[i] and not outlook_attention[i - 1] for i in range(1, n)):
            raise ValueError("volo: Outlooker stages come first and the last stage has no downsample, got "
                             f"outlook_attention={outlook_attention}, downsamples={downsamples}")
        self.in_chans = in_chans
        self.patch_embed = VOLOStem(in_chans, stem_hidden_dim, embed_dims[0], patch_size)
        reduction = patch_size * 2 ** sum(downsamples)
        self.min_input_size = self.input_multiple = reduction
        self.pos_embed = nn.Parameter(torch.zeros(1, img_size // reduction, img_size // reduction, embed_dims[-1]))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        network, infos, r, total = [], [], patch_size, sum(layers)
        self.pos_index = None  # the network entry before which the position table is added
        for i in range(n):
            start = sum(layers[:i])
            if outlook_attention[i]:  # NOTE: timm and the official code use no drop path in the Outlookers
                stage = nn.Sequential(*[Outlooker(embed_dims[i], num_heads[i], mlp_ratio, qkv_bias=qkv_bias,
                                                  attn_drop=attn_drop_rate) for _ in range(layers[i])])
            else:
                if self.pos_index is None:
                    self.pos_index = len(network)
                stage = nn.Sequential(*[VOLOBlock(embed_dims[i], num_heads[i], mlp_ratio, qkv_bias, attn_drop_rate,
                                                  drop_path_rate * (start + j) / max(total - 1, 1))
                                        for j in range(layers[i])])
            infos.append(FeatureInfo(embed_dims[i], r, f"network.{len(network)}"))
            network.append(stage)
            if downsamples[i]:
                network.append(Downsample(embed_dims[i], embed_dims[i + 1]))
                r *= 2
        self.network = nn.ModuleList(network)
        self.stage_index = [int(f.module.split(".")[1]) for f in infos]
        self.set_feature_info(infos)

        dim = embed_dims[-1]
        self.post_network = nn.ModuleList([ClassBlock(dim, num_heads[-1], mlp_ratio, qkv_bias, attn_drop_rate)
                                           for _ in range(num_post_layers)])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = nn.LayerNorm(dim)
        self.init_head(dim, num_classes, head=VOLOHead(dim, num_classes, drop_rate, use_aux_head))
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)

    def stage_modules(self) -> list[nn.Module]:
        return [self.network[i] for i in self.stage_index]

    def set_dense_training(self, enable: bool = True) -> None:
        """In training mode, return ``(class logits, per-token logits)`` (token labelling) instead of their sum."""
        if enable and len(self.head.fc_names) == 1:
            raise ValueError(f"{self.name}: set_dense_training needs the token-labelling head (use_aux_head=True)")
        self.head.return_dense = enable

    def _run_network(self, x: Tensor, upto: int | None = None) -> tuple[Tensor, list[Tensor]]:
        """Stem output ``(B, H, W, C)`` through ``network`` (to entry ``upto``); returns the last state and the NCHW
        outputs of the stages listed in ``stage_index``. Map stages run on ``(B, H, W, C)``, token stages on
        ``(B, N, C)``."""
        outs, H, W = [], x.shape[1], x.shape[2]
        last = len(self.network) - 1 if upto is None else upto
        for i, block in enumerate(self.network[:last + 1]):
            if i == self.pos_index:
                x = self.pos_drop(x + pos_embed_for(self.pos_embed, x))
                H, W = x.shape[1], x.shape[2]
                x = x.flatten(1, 2)  # (B, H, W, C) -> (B, N, C)
            x = self.run_stage(block, x)
            if upto is not None and i in self.stage_index:
                on_map = self.pos_index is None or i < self.pos_index
                grid = x if on_map else x.reshape(x.shape[0], H, W, -1)  # (B, N, C) -> (B, H, W, C)
                outs.append(grid.permute(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)
        return x, outs

    def forward_features(self, x: Tensor) -> Tensor:
        """Tokens ``(B, 1 + N, C)`` (class token first) after the final norm, as timm."""
        self.check_input(x)
        x, _ = self._run_network(self.patch_embed(x))
        if self.pos_index is None:  # no transformer stage: the map becomes tokens here
            x = x.flatten(1, 2)  # (B, H, W, C) -> (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.post_network:
            x = self.run_stage(block, x)
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """NCHW outputs of the chosen stages (Outlookers at 1/8, transformer stages at 1/16), before the norm."""
        idx = resolve_indices(indices, len(self.stage_index), self.name)
        self.check_input(x)
        _, outs = self._run_network(self.patch_embed(x), self.stage_index[idx[-1]])
        return [outs[i] for i in idx]

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """timm / official keys -> ours: ``head.*`` -> ``head.fc.*``, ``aux_head.*`` -> ``head.aux_head.*``.
        Keys already in our layout pass unchanged."""
        out = {}
        for k, v in state_dict.items():
            if k in ("head.weight", "head.bias"):
                k = "head.fc." + k.split(".")[1]
            elif k.startswith("aux_head."):
                k = "head." + k
            out[k] = v
        return out

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resample a checkpoint's position table made for another grid to this model's grid."""
        pos = state_dict.get("pos_embed")
        if pos is not None and pos.ndim == 4 and pos.shape[1:3] != self.pos_embed.shape[1:3]:
            state_dict = dict(state_dict)
            state_dict["pos_embed"] = pos_embed_for(pos, self.pos_embed)
        return state_dict


_SRC = "params, top-1: official README (sail-sg/volo); MACs: paper (224), tlt README (384-512); gmacs: timm results csv"
_CROP = ("timm evaluates these weights with crop_pct 1.15 (resize to input / 1.15, then a padded centre crop); "
         "the library keeps crop_pct <= 1")
_D1 = dict(layers=(4, 4, 8, 2), embed_dims=(192, 384, 384, 384), num_heads=(6, 12, 12, 12))
_D2 = dict(layers=(6, 4, 10, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16))
_D3 = dict(layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16))
_D4 = dict(layers=(8, 8, 16, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16))
_D5 = dict(layers=(12, 12, 20, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16), mlp_ratio=4.0,
           stem_hidden_dim=128)
VARIANTS = {
    "volo_test":   Variant(dict(layers=(1, 2), embed_dims=(32, 64), num_heads=(2, 4), downsamples=(True, False),
                                outlook_attention=(True, False), stem_hidden_dim=16, num_post_layers=1),
                           params_m=0.293186, input_size=64),
    "volo_d1_224": Variant(_D1, params_m=26.63204, gmacs=6.94, paper=Paper(27, 6.8, 84.2, _SRC), crop_pct=0.96),
    "volo_d1_384": Variant(_D1, params_m=26.77796, gmacs=22.75, paper=Paper(27, 22.8, 85.2, _SRC), input_size=384,
                           crop_pct=1.0),
    "volo_d2_224": Variant(_D2, params_m=58.678336, gmacs=14.34, paper=Paper(59, 14.1, 85.2, _SRC), crop_pct=0.96),
    "volo_d2_384": Variant(_D2, params_m=58.872896, gmacs=46.17, paper=Paper(59, None, 86.0, _SRC), input_size=384,
                           crop_pct=1.0),
    "volo_d3_224": Variant(_D3, params_m=86.325072, gmacs=20.78, paper=Paper(86, 20.6, 85.4, _SRC), crop_pct=0.96),
    "volo_d3_448": Variant(_D3, params_m=86.626128, gmacs=96.33, paper=Paper(86, None, 86.3, _SRC), input_size=448,
                           crop_pct=1.0),
    "volo_d4_224": Variant(_D4, params_m=192.96152, gmacs=44.34, paper=Paper(193, 43.8, 85.7, _SRC), crop_pct=0.96),
    "volo_d4_448": Variant(_D4, params_m=193.413104, gmacs=197.13, paper=Paper(193, None, 86.8, _SRC), input_size=448,
                           crop_pct=1.0, notes=_CROP),
    "volo_d5_224": Variant(_D5, params_m=295.455584, gmacs=72.4, paper=Paper(296, 69.0, 86.1, _SRC), crop_pct=0.96),
    "volo_d5_448": Variant(_D5, params_m=295.907168, gmacs=315.06, paper=Paper(296, 304, 87.0, _SRC), input_size=448,
                           crop_pct=1.0, notes=_CROP),
    "volo_d5_512": Variant(_D5, params_m=296.091488, gmacs=425.09, paper=Paper(296, 412, 87.1, _SRC), input_size=512,
                           crop_pct=1.0, notes=_CROP),
}
register_family(VOLO, VARIANTS, paper="arXiv:2106.13112", kind="vit", code="timm 1.0.31 timm/models/volo.py")
