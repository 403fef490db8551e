"""The hierarchical layout that SpectFormer-H and SVT share (both follow Wave-ViT's code).

A conv stem (7x7/2 and two 3x3, BatchNorm + ReLU), four stages of (3x3/2 conv + LayerNorm downsample, pre-norm
blocks of a token mixer and a convolutional feed-forward, LayerNorm), then a head that prepends the mean token as a
class token, runs one CaiT-style class-attention block over all tokens, normalises, and classifies the class token;
with token labeling's auxiliary classifier it adds half of the per-class maximum over the patch tokens' logits
(the official inference output).

The mixer of each stage is chosen by the family (spectral filters, scattering, or ``SpectralAttention``: softmax
attention with separate ``q`` and ``kv`` projections, through ``AttentionCore``).
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .attention import AttentionCore
from .drop import DropPath, drop_path_rates
from .head import ClassifierHead
from .norm import LayerNorm


def conv_bn_relu_stem(in_chans: int, hidden: int) -> nn.Sequential:
    """Conv 7x7/2 (no bias), BN, ReLU, then twice conv 3x3 (no bias), BN, ReLU: stride 2, ``hidden`` channels."""
    layers: list[nn.Module] = []
    for i in range(3):
        k, s = (7, 2) if i == 0 else (3, 1)
        layers += [nn.Conv2d(in_chans if i == 0 else hidden, hidden, k, s, k // 2, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class TokenDownsample(nn.Module):
    """Conv 3x3 stride 2, then LayerNorm on the tokens: ``(B, C, H, W)`` -> ``(B, H/2 * W/2, C')`` and the grid."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim)  # NOTE: torch's eps 1e-5, as the official code

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (H, W)  # (B, C, H, W) -> (B, HW, C)


class ConvFFN(nn.Module):
    """fc1, 3x3 depthwise conv on the token map, GELU, fc2 (PVT v2's feed-forward)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.fc1(x)
        B, N, C = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(B, C, size[0], size[1]))  # (B, N, C) -> (B, C, H, W)
        return self.fc2(self.act(x.flatten(2).transpose(1, 2)))  # (B, C, H, W) -> (B, N, C)


class SpectralAttention(nn.Module):
    """Multi-head softmax self-attention over all tokens with separate ``q`` and ``kv`` projections (with bias)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.core = AttentionCore()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, N, C) -> (B, h, N, d)
        kv = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, 2, h, d) -> 2 x (B, h, N, d)
        x = self.core(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, N, C)  # (B, h, N, d) -> (B, N, C)
        return self.proj(x)


class SpectralBlock(nn.Module):
    """Pre-norm block on tokens: x + mixer(norm1(x)), then x + ConvFFN(norm2(x)); the mixer takes the grid."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = mixer
        self.norm2 = LayerNorm(dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x), size))


class SpectralStage(nn.Module):
    """Downsample (NCHW in), blocks, LayerNorm (none in the last stage: the head's norm follows); NCHW out."""

    def __init__(self, in_dim: int, dim: int, depth: int, mixer: Callable[[], nn.Module], mlp_ratio: float,
                 drop_path: list[float], norm: bool = True) -> None:
        super().__init__()
        self.downsample = TokenDownsample(in_dim, dim)
        self.blocks = nn.ModuleList([SpectralBlock(dim, mixer(), mlp_ratio, drop_path[i]) for i in range(depth)])
        self.norm = LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x, size = self.downsample(x)  # (B, C, H, W) -> (B, N, C')
        for block in self.blocks:
            x = block(x, size)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, size[0], size[1])  # (B, N, C) -> (B, C, H, W)


def build_spectral_stages(dims: tuple[int, ...], depths: tuple[int, ...], num_heads: tuple[int, ...],
                          mlp_ratios: tuple[float, ...], in_dim: int, img_size: int, first: int,
                          first_mixer: Callable[[int, tuple[int, int]], nn.Module], drop_path_rate: float,
                          who: str) -> tuple[nn.ModuleList, list]:
    """The four stages of the SpectFormer-H / SVT layout: the ``first`` stages mix with ``first_mixer(dim, (side,
    side))`` (spectral gating, scattering), the others with ``SpectralAttention``; returns the stages and their
    ``FeatureInfo`` s (strides 4 to 32)."""
    from visionzoo.backbone import FeatureInfo

    n = len(dims)
    if not len(depths) == len(num_heads) == len(mlp_ratios) == n:
        raise ValueError(f"{who}: dims {tuple(dims)}, depths {tuple(depths)}, num_heads {tuple(num_heads)} and "
                         f"mlp_ratios {tuple(mlp_ratios)} need one entry per stage")
    if img_size % 32:
        raise ValueError(f"{who}: img_size must be a multiple of 32 (the total stride), got {img_size}")
    dpr = drop_path_rates(drop_path_rate, tuple(depths))
    stages, infos = [], []
    for i, dim in enumerate(dims):
        side = img_size // (4 * 2**i)
        if i < first:
            def mixer(dim: int = dim, side: int = side) -> nn.Module:
                return first_mixer(dim, (side, side))
        else:
            def mixer(dim: int = dim, heads: int = num_heads[i]) -> nn.Module:
                return SpectralAttention(dim, heads)
        stages.append(SpectralStage(in_dim, dim, depths[i], mixer, mlp_ratios[i], dpr[i], norm=i < n - 1))
        infos.append(FeatureInfo(dim, 4 * 2**i, f"stages.{i}"))
        in_dim = dim
    return nn.ModuleList(stages), infos


class ClassAttention(nn.Module):
    """Softmax attention of the class token (token 0, the only query) over all tokens."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kv = nn.Linear(dim, dim * 2)
        self.q = nn.Linear(dim, dim)
        self.core = AttentionCore(prefix_tokens=1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        kv = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, 2, h, d) -> 2 x (B, h, N, d)
        q = self.q(x[:, :1]).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)  # -> (B, h, 1, d)
        # the one query is the class token (a prefix token): no patch queries, so the query grid is empty
        x = self.core(q, k, v, scale=self.scale, grid=(0, 0))  # (B, h, 1, d)
        return self.proj(x.transpose(1, 2).reshape(B, 1, C))  # (B, h, 1, d) -> (B, 1, C)


class ClassBlock(nn.Module):
    """The class token attends to all tokens, then an MLP on the class token; patch tokens pass unchanged."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, int(dim * mlp_ratio)))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: Tensor) -> Tensor:
        cls = x[:, :1] + self.attn(self.norm1(x))
        cls = cls + self.mlp(self.norm2(cls))
        return torch.cat([cls, x[:, 1:]], dim=1)


class ClassAttentionHead(ClassifierHead):
    """Mean token as class token, one class-attention block, LayerNorm, then ``fc`` on the class token plus (with
    ``aux``) half the per-class maximum of ``aux_fc`` over the patch tokens (token labeling's inference output).

    With ``dense_training`` set, training returns ``(logits, patch_logits)`` for a token-labeling loss.
    """

    def __init__(self, in_features: int, num_classes: int, num_heads: int, mlp_ratio: float, drop_rate: float = 0.0,
                 aux: bool = True) -> None:
        super().__init__(in_features, num_classes, "", drop_rate)
        self.fc_names = ("fc", "aux_fc") if aux else ("fc",)
        self.block = ClassBlock(in_features, num_heads, mlp_ratio)
        self.norm = LayerNorm(in_features)
        self.aux_fc = nn.Linear(in_features, num_classes) if aux and num_classes > 0 else (
            nn.Identity() if aux else None)
        self.dense_training = False

    def tokens(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, 1 + HW, C)``: class token first, after the class block and the norm."""
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        x = torch.cat([x.mean(1, keepdim=True), x], dim=1)
        return self.norm(self.block(x))

    def forward_pre_logits(self, x: Tensor) -> Tensor:
        return self.drop(self.tokens(x)[:, 0])

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x = self.drop(self.tokens(x))
        if pre_logits or isinstance(self.fc, nn.Identity):
            return x[:, 0]
        logits = self.fc(x[:, 0])
        if self.aux_fc is None:
            return logits
        aux = self.aux_fc(x[:, 1:])  # (B, HW, C) -> (B, HW, classes)
        if self.dense_training and self.training:
            return logits, aux
        return logits + 0.5 * aux.amax(1)


def remap_spectral_stages(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official Wave-ViT-layout keys (SpectFormer-H, SVT) -> ours.

    ``patch_embed1.conv`` -> ``stem``; ``patch_embed{i}`` (``proj``, ``norm``) -> ``stages.{i-1}.downsample``;
    ``block{i}.j`` -> ``stages.{i-1}.blocks.j``; ``norm{i}`` -> ``stages.{i-1}.norm`` (the last -> ``head.norm``);
    ``post_network.0`` -> ``head.block``; ``head``, ``aux_head`` -> ``head.fc``, ``head.aux_fc``;
    ``mlp.dwconv.dwconv`` -> ``mlp.dwconv``. The wavelet filter buffers of official SVT blocks (``attn.xfm.*``,
    ``attn.ifm.*``; constants here) are dropped. Our own keys pass unchanged.
    """
    last = max((int(m[1]) for k in state_dict if (m := re.match(r"^norm(\d+)\.", k))), default=0)
    out = {}
    for k, v in state_dict.items():
        if re.search(r"\.attn\.(xfm|ifm)\.", k):
            continue
        k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        k = re.sub(r"^aux_head\.", "head.aux_fc.", k)
        k = re.sub(r"^post_network\.0\.", "head.block.", k)
        k = re.sub(r"^patch_embed1\.conv\.", "stem.", k)
        k = re.sub(r"^patch_embed(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.downsample.", k)
        k = re.sub(r"^block(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.", k)
        k = re.sub(r"^norm(\d)\.", lambda m: "head.norm." if int(m[1]) == last
                   else f"stages.{int(m[1]) - 1}.norm.", k)
        out[k.replace("mlp.dwconv.dwconv.", "mlp.dwconv.")] = v
    return out
