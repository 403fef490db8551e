"""ChannelViT, from "Channel Vision Transformers: An Image Is Worth C x 16 x 16 Words" (Bao, Sivanandan,
Karaletsos, ICLR 2024). https://arxiv.org/abs/2309.16108

Every input channel is patchified on its own by one shared projection, so an image of C channels and N patches
gives C x N tokens; a learned channel embedding (one vector per channel) and the 2-D position table (shared by
all channels) are added, a class token goes first, then plain pre-norm ViT blocks. The model is built for
``in_chans`` channels (any number) and also takes a subset of them (``forward_channels(x, channels)``).

Hierarchical channel sampling (HCS, section 3.2 of the paper; ``hcs=True``, the released supervised ImageNet
model): in training, each batch keeps a random subset of its channels, first the size k uniformly from 1..C, then
k distinct channels; in eval (and in every traced or exported graph) all channels are used.

Differs from the official code: HCS draws from torch's generator (the official code uses Python's ``random``) and
keeps the sampled channels in ascending order (the official order is random; token order does not change the
class-token output). ``forward_intermediates``
averages the C token maps of each block into one ``(B, D, H/p, W/p)`` map.

Follows insitro/ChannelViT (Apache-2.0), ``channelvit/backbone/hcs_channel_vit.py``, whose state-dict keys we keep
(the channel embedding as ``patch_embed.channel_embed.weight``); the non-HCS file's ``(1, D, C, 1, 1)`` channel
table and the classifier keys (``head.*``, the Lightning module's ``classifier.*``) are translated by ``remap``.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, resolve_indices
from visionzoo.layers import (
    LayerType,
    PreNormBlock,
    drop_path_rates,
    get_norm,
    init_linear,
    is_tracing,
    resample_abs_pos_embed,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["ChannelViT"]


def _cubic_matrix(n_in: int, n_out: int, scale: float) -> list[list[float]]:
    """``(n_out, n_in)`` weights of PyTorch's bicubic resize (a = -0.75, align_corners False, border clamped) with
    the source position ``(i + 0.5) / scale - 0.5`` of output ``i`` (an explicit ``scale_factor``)."""
    a = -0.75

    def near(t: float) -> float:  # |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t: float) -> float:  # 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    rows = []
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        j = math.floor(src)
        t = src - j
        row = [0.0] * n_in
        for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            row[min(max(j + offset, 0), n_in - 1)] += w
        rows.append(row)
    return rows


@trace_leaf
def _patch_pos_embed(pos_embed: Tensor, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """The patch rows of the position table for the tokens ``x`` ``(B, C, H, W, D)``, as ``(1, 1, H*W, D)``.

    NOTE: as the official code (DINO's ``interpolate_pos_encoding``), the table is resampled bicubically with the
    scale factor ``(H + 0.1) / H0`` (``W`` likewise) whenever the token count differs from the table's, i.e. for
    every input of more than one channel even at the built size; the released weights were trained so. The
    resample is written as two matrix products (the same weights as ``F.interpolate``), because exporters turn
    an ``interpolate`` with a scale factor into a resize to the output size, which maps positions differently."""
    C, H, W = x.shape[1:4]
    patch_pos = pos_embed[:, 1:]
    if C == 1 and H == W and (H, W) == tuple(grid_size):
        return patch_pos.unsqueeze(1)
    H0, W0 = grid_size
    like = dict(dtype=pos_embed.dtype, device=pos_embed.device)
    rows = torch.tensor(_cubic_matrix(H0, H, (H + 0.1) / H0), **like)  # (H, H0)
    cols = torch.tensor(_cubic_matrix(W0, W, (W + 0.1) / W0), **like)  # (W, W0)
    grid = patch_pos.reshape(H0, W0, -1)  # (1, H0 W0, D) -> (H0, W0, D)
    grid = torch.einsum("hi,ijd,wj->hwd", rows, grid, cols)  # (H0, W0, D) -> (H, W, D)
    return grid.reshape(1, 1, H * W, -1)  # (H, W, D) -> (1, 1, HW, D)


class ChannelPatchEmbed(nn.Module):
    """One patch projection shared by all channels (a ``(1, p, p)`` Conv3d), plus a learned embedding per channel."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.proj = nn.Conv3d(1, embed_dim, kernel_size=(1, patch_size, patch_size), stride=(1, patch_size, patch_size))
        self.channel_embed = nn.Embedding(in_chans, embed_dim)

    def forward(self, x: Tensor, channels: Tensor | None = None) -> Tensor:
        """``x`` ``(B, C, H, W)`` holding the channels ``channels`` (all, in order, when ``None``) -> tokens
        ``(B, C, H/p, W/p, D)``."""
        x = self.proj(x.unsqueeze(1))  # (B, 1, C, H, W) -> (B, D, C, H/p, W/p)
        embed = self.channel_embed.weight if channels is None else self.channel_embed(channels)  # (C, D)
        x = x + embed.transpose(0, 1)[None, :, :, None, None]  # (C, D) -> (1, D, C, 1, 1)
        return x.permute(0, 2, 3, 4, 1)  # (B, D, C, H', W') -> (B, C, H', W', D)


class ChannelViTBlock(PreNormBlock):
    """Pre-norm transformer block (DINO's ViT block): x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_layer: LayerType = "ln", act_layer: LayerType = "gelu") -> None:
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, drop_path, norm_layer, act_layer, prefix_tokens=1)
        self.query_grid: tuple[int, int] | None = None  # (C * H, W), set by the model in eager mode

    def attn_branch(self, x: Tensor, attend: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """As ``TokenBlock``'s, telling the attention core the layout of the queries: the C channel grids stacked
        along the height (``(C * H/p, W/p)``), when the tokens are still those (no token reduction)."""
        grid = None if is_tracing() else self.query_grid
        if grid is not None and x.shape[1] != 1 + grid[0] * grid[1]:
            grid = None
        return self.drop_path1(self.attn(self.norm1(x), grid=grid, attend=attend))


class ChannelViT(Backbone):
    """Per-channel patch tokens with a channel embedding, a shared position table, a class token and ViT blocks.

    Args:
        img_size: the input size the position table is built for; other sizes (multiples of ``patch_size``)
            resample it on the fly.
        hcs: hierarchical channel sampling in training mode (eager only; traced graphs use all channels).
        in_chans: the channels the model knows (one channel embedding each); any number.
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    takes_patch_size = True
    min_input_size = 16
    input_multiple = 16
    no_weight_decay_keys = ("pos_embed", "cls_token", "channel_embed.weight")
    first_conv = "patch_embed.proj"

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True, hcs: bool = True, *,
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: LayerType = "ln", act_layer: LayerType = "gelu") -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"channelvit: img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.hcs = hcs
        self.min_input_size = self.input_multiple = patch_size
        self.num_prefix_tokens = 1

        self.patch_embed = ChannelPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        grid = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], embed_dim))
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[ChannelViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_layer,
                                                      act_layer) for i in range(depth)])
        self.norm = get_norm(norm_layer)(embed_dim)
        self.set_feature_info([FeatureInfo(embed_dim, patch_size, f"blocks.{i}") for i in range(depth)])
        self.init_head(embed_dim, num_classes, drop_rate, pool_type="token", prefix_tokens=1)
        if not self.pos_embed.is_meta:
            for p in (self.pos_embed, self.cls_token, self.patch_embed.channel_embed.weight):
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(_init_weights)

    # --- channels ---------------------------------------------------------------------------------------
    def sample_channels(self, num_channels: int, device: torch.device) -> Tensor:
        """HCS: k ~ U{1..num_channels}, then k distinct channel indices (ascending), from torch's generator."""
        k = int(torch.randint(1, num_channels + 1, ()).item())
        return torch.randperm(num_channels, device=device)[:k].sort().values

    def _check(self, x: Tensor, channels: Tensor | None) -> None:
        if channels is None:
            self.check_input(x)
            return
        if is_tracing():
            return
        if channels.ndim != 1 or channels.numel() != x.shape[1]:
            raise ValueError(f"{self.name}: channels must be a 1-D tensor with one index per input channel "
                             f"({x.shape[1]}), got shape {tuple(channels.shape)}")
        if channels.numel() and (int(channels.min()) < 0 or int(channels.max()) >= self.in_chans):
            raise ValueError(f"{self.name}: channels must index the {self.in_chans} channels the model was built "
                             f"for (0..{self.in_chans - 1}), got {channels.tolist()}")
        self.check_input(torch.empty(x.shape[0], self.in_chans, *x.shape[2:], device="meta"))

    # --- tokens -----------------------------------------------------------------------------------------
    def forward_stem(self, x: Tensor, channels: Tensor | None = None) -> Tensor:
        """Image ``(B, C, H, W)`` -> tokens ``(B, 1 + C * H/p * W/p, D)``, channel-major, embeddings added.

        In training with ``hcs``, a random subset of the channels is kept first (eager mode only)."""
        if self.training and self.hcs and not is_tracing():
            keep = self.sample_channels(x.shape[1], x.device)
            x = x[:, keep]
            channels = keep if channels is None else channels[keep]
        x = self.patch_embed(x, channels)  # (B, C, H, W) -> (B, C, H', W', D)
        B, C, H, W, D = x.shape
        if not is_tracing():
            for block in self.blocks:
                block.query_grid = (C * H, W)
        x = x.reshape(B, C, H * W, D) + _patch_pos_embed(self.pos_embed, x, self.patch_embed.grid_size)
        cls = self.cls_token + self.pos_embed[:, :1]
        return torch.cat([cls.expand(B, -1, -1), x.reshape(B, C * H * W, D)], dim=1)  # -> (B, 1 + C H' W', D)

    def stage_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward_features(self, x: Tensor, channels: Tensor | None = None) -> Tensor:
        """Tokens ``(B, 1 + C * H/p * W/p, D)`` after the final norm; ``channels``: the indices (among the
        ``in_chans`` the model knows) of the channels ``x`` holds, all of them in order when ``None``."""
        self._check(x, channels)
        x = self.forward_stem(x, channels)
        for block in self.blocks:
            x = self.run_stage(block, x)
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None,
                              channels: Tensor | None = None) -> list[Tensor]:
        """The chosen blocks' patch tokens (before the final norm), averaged over the channels, as
        ``(B, D, H/p, W/p)`` maps."""
        idx = resolve_indices(indices, len(self.blocks), self.name)
        self._check(x, channels)
        H, W = x.shape[-2] // self.patch_embed.patch_size, x.shape[-1] // self.patch_embed.patch_size
        x = self.forward_stem(x, channels)
        outs = []
        for i, block in enumerate(self.blocks[:idx[-1] + 1]):
            x = self.run_stage(block, x)
            if i in idx:
                tokens = x[:, 1:].reshape(x.shape[0], -1, H, W, x.shape[-1]).mean(1)  # (B, CHW, D) -> (B, H, W, D)
                outs.append(tokens.permute(0, 3, 1, 2))  # (B, H, W, D) -> (B, D, H, W)
        return outs

    def forward_channels(self, x: Tensor, channels: Tensor) -> Tensor:
        """Logits of ``x`` ``(B, k, H, W)`` holding the channels ``channels`` (``k`` indices among ``in_chans``)."""
        return self.forward_head(self.forward_features(x, channels))

    # --- checkpoints ------------------------------------------------------------------------------------
    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours: ``head.*`` / ``classifier.*`` -> ``head.fc.*``, a ``backbone.`` prefix dropped, the
        non-HCS ``patch_embed.channel_embed`` ``(1, D, C, 1, 1)`` -> ``patch_embed.channel_embed.weight`` ``(C, D)``.
        Keys already in our layout pass unchanged."""
        out = {}
        for k, v in state_dict.items():
            if k.startswith("backbone."):
                k = k[len("backbone."):]
            if k in ("head.weight", "head.bias", "classifier.weight", "classifier.bias"):
                k = "head.fc." + k.split(".")[1]
            elif k == "patch_embed.channel_embed":
                k, v = "patch_embed.channel_embed.weight", v.reshape(v.shape[1], v.shape[2]).transpose(0, 1)
            out[k] = v
        return out

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resample a checkpoint's position table made for another (square) grid to this model's grid."""
        pos = state_dict.get("pos_embed")
        if pos is not None and pos.ndim == 3 and pos.shape[1] != self.pos_embed.shape[1]:
            state_dict = dict(state_dict)
            state_dict["pos_embed"] = resample_abs_pos_embed(pos, self.patch_embed.grid_size, num_prefix_tokens=1)
        return state_dict


def _init_weights(m: nn.Module) -> None:
    init_linear(m, std=0.02)


_HCS = ("hcs=True as the released supervised ImageNet model (torch.hub imagenet_channelvit_small_p16_with_hcs_"
        "supervised); the paper's JUMP-CP / So2Sat models are patch_size=8 with in_chans=8 / 18. The official code "
        "also defines tiny (embed_dim=192, 3 heads: 5.619688 M) and base (768, 12 heads: 86.176744 M), reproduced "
        "exactly by those arguments; the paper reports no numbers for them, so they are not registered")
VARIANTS = {
    "channelvit_test":            Variant(dict(patch_size=16, embed_dim=32, depth=2, num_heads=2), params_m=0.067368,
                                          input_size=64, notes="tiny config for tests"),
    "channelvit_small_patch16":   Variant(dict(embed_dim=384, depth=12, num_heads=6), params_m=21.855208,
                                          gmacs=15.762,
                                          paper=Paper(None, None, 74.64, "arXiv:2309.16108, ImageNet table ('Val Acc. "
                                                      "on RGB'), ChannelViT-S/16 + HCS, trained on RGB"),
                                          notes=_HCS),
}
register_family(ChannelViT, VARIANTS, paper="arXiv:2309.16108", kind="vit",
                code="insitro/ChannelViT@1077a103e30c channelvit/backbone/hcs_channel_vit.py")
