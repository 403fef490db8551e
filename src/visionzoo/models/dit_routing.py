"""DiT (dynamic token routing), from "DiT: Efficient Vision Transformers with Dynamic Token Routing" (Ma, Fei,
Huang, 2023). https://arxiv.org/abs/2308.03409

A hierarchical (PVT v2-like) vision transformer in which a router in front of every block decides, per token, whether
the token goes through the block or around it (the paper's dynamic-depth path). In training the decision is a
differentiable gate: a hard 0/1 choice in the forward pass with the sigmoid's gradient (straight-through), the router
logit perturbed by logistic noise (Gumbel-sigmoid, temperature ``tau``). At inference the routing is deterministic:
``gate = logit > 0``, with no noise; every token is still computed and the block's update is multiplied by its gate,
so the shapes never depend on the data and the model traces and exports as one static graph (the saving the paper
reports needs a sparse gather of the routed tokens, which would make shapes data-dependent). ``forward_routes(x)``
returns the per-block gate maps ``(B, H, W)``; ``routing_rate`` is the mean of the gates (the quantity a budget
constraint penalises).

No official code exists: the repository (Maycbj/DiT, mirrored as feizc/DiT) holds a README only. Built from the
paper's text as far as it could be read here (abstract and README: routing gates select scaling paths and feature
transformation paths per token; variants based on PVT v2). Differs from the paper: only the dynamic-depth routing is
modelled; the dynamic-scaling paths (tokens choosing their resolution through patch-embedding blocks) are left
out and the stages downsample every token; the budget loss is left to the training code (``routing_rate``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import (
    DropPath,
    LayerType,
    Mlp,
    SpatialReductionAttention,
    drop_path_rates,
    get_norm,
    init_linear,
)
from visionzoo.registry import Variant, register_family

__all__ = ["DiTRouting"]


class TokenRouter(nn.Module):
    """Per-token gate in {0, 1}: straight-through Gumbel-sigmoid in training, ``logit > 0`` in eval."""

    def __init__(self, dim: int, tau: float = 1.0, init_bias: float = 3.0) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 1)
        self.tau = tau
        self.init_bias = init_bias  # a positive start: every token goes through every block at first

    def forward(self, x: Tensor) -> Tensor:
        """Tokens ``(B, N, C)`` -> gates ``(B, N, 1)``."""
        logit = self.fc(x)
        if not self.training:
            return (logit > 0).to(x.dtype)
        u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / self.tau)  # logistic (Gumbel-difference) noise
        return (soft > 0.5).to(x.dtype) + (soft - soft.detach())  # hard forward (exactly 0 or 1), sigmoid gradient


class RoutedBlock(nn.Module):
    """x + gate * (block(x) - x): a pre-norm spatial-reduction attention + MLP block the router can bypass per token."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 tau: float = 1.0, norm_layer: LayerType = "ln", act_layer: LayerType = "gelu") -> None:
        super().__init__()
        norm = get_norm(norm_layer)
        self.router = TokenRouter(dim, tau)
        self.norm1 = norm(dim)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        gate = self.router(x)  # (B, N, 1)
        y = x + self.drop_path(self.attn(self.norm1(x), size))
        y = y + self.drop_path(self.mlp(self.norm2(y)))
        return x + gate * (y - x), gate


class DiTStage(nn.Module):
    """Overlapping patch embedding (strided conv + LayerNorm), routed blocks, a final LayerNorm; NCHW in and out."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, sr_ratio: int, stride: int,
                 mlp_ratio: float, dpr: list[float], tau: float, norm_layer: LayerType, act_layer: LayerType) -> None:
        super().__init__()
        kernel = 7 if stride == 4 else 3
        self.downsample = nn.Conv2d(in_dim, dim, kernel, stride, padding=kernel // 2)
        self.down_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList([RoutedBlock(dim, num_heads, sr_ratio, mlp_ratio, dpr[i], tau, norm_layer,
                                                 act_layer) for i in range(depth)])
        self.norm = get_norm(norm_layer)(dim)

    def forward_routed(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.downsample(x)
        B, C, H, W = x.shape
        x = self.down_norm(x.flatten(2).transpose(1, 2))  # (B, C, H, W) -> (B, HW, C)
        gates = []
        for block in self.blocks:
            x, gate = block(x, (H, W))
            gates.append(gate.reshape(B, H, W))
        x = self.norm(x).transpose(1, 2).reshape(B, C, H, W)  # (B, HW, C) -> (B, C, H, W)
        return x, gates

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_routed(x)[0]


class DiTRouting(Backbone):
    """Four stages of routed spatial-reduction blocks (strides 4, 8, 16, 32); average pool and classify.

    Args:
        tau: temperature of the training-time Gumbel-sigmoid gates.
    """

    first_conv = "stages.0.downsample"

    kind = "vit"
    has_attention = True

    def __init__(self, depths: tuple[int, ...] = (2, 2, 2, 2), dims: tuple[int, ...] = (64, 128, 320, 512),
                 num_heads: tuple[int, ...] = (1, 2, 5, 8), sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
                 mlp_ratios: tuple[float, ...] = (8, 8, 4, 4), tau: float = 1.0, *, in_chans: int = 3,
                 num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: LayerType = "ln", act_layer: LayerType = "gelu") -> None:
        super().__init__()
        if not len(depths) == len(dims) == len(num_heads) == len(sr_ratios) == len(mlp_ratios):
            raise ValueError(f"dit_routing: depths, dims, num_heads, sr_ratios and mlp_ratios need one entry per "
                             f"stage, got {len(depths)}, {len(dims)}, {len(num_heads)}, {len(sr_ratios)}, "
                             f"{len(mlp_ratios)}")
        if tau <= 0:
            raise ValueError(f"dit_routing: tau must be > 0, got {tau}")
        self.in_chans = in_chans
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        self.stem = nn.Identity()
        self.stages = nn.ModuleList()
        in_dim, start = in_chans, 0
        for i, d in enumerate(depths):
            self.stages.append(DiTStage(in_dim, dims[i], d, num_heads[i], sr_ratios[i], 4 if i == 0 else 2,
                                        mlp_ratios[i], dpr[start:start + d], tau, norm_layer, act_layer))
            in_dim, start = dims[i], start + d
        self.set_feature_info([FeatureInfo(c, 4 * 2 ** i, f"stages.{i}") for i, c in enumerate(dims)])
        self.init_head(dims[-1], num_classes, drop_rate)
        self.apply(_init_weights)

    def forward_routes(self, x: Tensor) -> list[Tensor]:
        """The gate map ``(B, H, W)`` of every block, in order (1 = the token went through the block)."""
        x = self.prepare_input(x)
        gates = []
        for stage in self.stages:
            x, g = stage.forward_routed(x)
            gates += g
        return gates

    def routing_rate(self, x: Tensor) -> Tensor:
        """The fraction of (token, block) pairs routed through their block, per image ``(B,)``."""
        return torch.stack([g.flatten(1).mean(1) for g in self.forward_routes(x)], dim=1).mean(1)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, TokenRouter) and not m.fc.weight.is_meta:
        nn.init.trunc_normal_(m.fc.weight, std=0.02)
        nn.init.constant_(m.fc.bias, m.init_bias)
        return  # NOTE: apply() visits the router's fc first (zero bias), then the router sets its bias
    init_linear(m, std=0.02)


_NOTES = ("built from the paper's abstract and the README of its (code-less) repository: per-token routers in "
          "front of every block of a PVT v2-like hierarchy (overlapping patch embeddings, spatial-reduction "
          "attention, sr_ratios 8/4/2/1, MLP ratios 8/8/4/4 as PVT v2); dynamic-scaling paths not modelled. The "
          "paper's variant table could not be read here; its abstract gives DiT-B5: 84.8% top-1 at 10.3 GFLOPs, "
          "a size not reproducible without the table, so only the test configuration is registered")
VARIANTS = {
    "dit_routing_test": Variant(dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4)),
                                params_m=0.26134, input_size=64, notes=_NOTES),
}
register_family(DiTRouting, VARIANTS, paper="arXiv:2308.03409", kind="vit", code=None)
