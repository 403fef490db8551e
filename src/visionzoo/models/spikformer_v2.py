"""Spikformer V2, from "Spikformer V2: Join the High Accuracy Club on ImageNet with an SNN Ticket" (Zhou et al., 2024).
https://arxiv.org/abs/2401.02020 ; v1: "Spikformer: When Spiking Neural Network Meets Transformer" (ICLR 2023),
https://arxiv.org/abs/2209.15425

A spiking neural network: every activation is a leaky integrate-and-fire (LIF) neuron that emits binary spikes,
trained through a surrogate gradient; the image is repeated over ``T`` time steps and the classifier reads the
firing rates averaged over time. Spiking self-attention (SSA) multiplies spike-form Q, K and V with NO softmax
(``Q (K^T V) * 0.125``, then a LIF with threshold 0.5): it is not softmax attention, so it does not go through
``layers.AttentionCore`` and the model declares ``has_attention = False`` (no attention probabilities exist).
Token reduction does not apply for the same reason.

Follows ZK-Zhou/spikformer@6212689 ``imagenet/model.py`` (v1, MIT) for the neurons, SSA, MLP, the spiking patch
splitting tokenizer (SPS) and the head; the LIF neuron is written here in torch (spikingjelly's
``MultiStepLIFNode``: tau 2, hard reset to 0, detached reset, sigmoid surrogate with alpha 4), so no SNN library is
needed. The v2 code is unreleased: the Spiking Convolutional Stem (SCS) follows the v2 paper's description (SPS
"with supplementary convolutional layers"); the exact layer list of the paper's figure could not be read, see
``SCS_NOTE`` for what we chose.

Differs from the v1 code: the q/k/v/proj 1x1 ``Conv1d`` + ``BatchNorm1d`` over flattened tokens are 1x1 ``Conv2d`` +
``BatchNorm2d`` over the same grid (identical maths; ``remap`` reshapes the weights), so ``fuse()`` folds them; the
unused ``norm1``/``norm2`` LayerNorms of the official ``Block`` are not built (their 4*dim parameters per block are
dropped by ``remap``); convs start from N(0, (4 / sqrt(fan_in))^2) instead of PyTorch's default, so that the
eval-mode network fires at init (see ``_init_weights``); ``drop_path_rate`` (0 by default) is applied to both
residual branches, where the official Block computes its rates but never applies them. Each block returns the pair
(spike maps over time ``(T * B, C, H, W)``, their mean over time ``(B, C, H, W)``): the second is what
``forward_intermediates``, ``features_only``, hooks and CAMs see; ``forward_features`` returns the last block's
mean firing map.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import DropPath, drop_path_rates, is_meta
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["LIF", "SpikformerV2", "spike_fn"]


def spike_fn(v: Tensor, alpha: float = 4.0) -> Tensor:
    """Heaviside step ``v >= 0`` in the forward pass; the gradient of ``sigmoid(alpha * v)`` in the backward pass."""
    surrogate = torch.sigmoid(alpha * v)
    # NOTE: ``surrogate - surrogate.detach()`` is exactly 0 forward, so the output is exactly binary.
    return (v >= 0).to(v.dtype) + (surrogate - surrogate.detach())


class LIF(nn.Module):
    """Multi-step leaky integrate-and-fire neuron over a time-major batch ``(T * B, ...)``.

    Per step: ``h = v + (x - v) / tau``; spike ``s = [h >= v_threshold]``; hard reset ``v = h * (1 - s)`` with ``s``
    detached from the reset (``detach_reset``). The membrane starts at 0 for every forward (no state is kept).
    """

    def __init__(self, T: int, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 4.0) -> None:
        super().__init__()
        self.T, self.tau, self.v_threshold, self.alpha = T, tau, v_threshold, alpha

    def forward(self, x: Tensor) -> Tensor:
        xs = x.unflatten(0, (self.T, -1))  # (T * B, ...) -> (T, B, ...)
        v = torch.zeros_like(xs[0])
        spikes = []
        for t in range(self.T):
            h = v + (xs[t] - v) / self.tau  # charge (decay_input, v_reset = 0)
            s = spike_fn(h - self.v_threshold, self.alpha)
            v = h * (1.0 - s.detach())
            spikes.append(s)
        return torch.stack(spikes).flatten(0, 1)  # (T, B, ...) -> (T * B, ...)

    def extra_repr(self) -> str:
        return f"T={self.T}, tau={self.tau}, v_threshold={self.v_threshold}"


class SpikformerTokenizer(nn.Module):
    """SPS (v1): four conv3x3-BN-LIF + maxpool/2 steps (widths D/8, D/4, D/2, D), then a conv-BN-LIF relative
    position embedding added to its input. SCS (v2, ``extra=True``): one more conv3x3-BN-LIF at each width."""

    fuse_pairs = tuple((f"proj_conv{s}", f"proj_bn{s}") for s in ("", "1", "2", "3")) + \
        tuple((f"extra_conv{i}", f"extra_bn{i}") for i in range(4)) + (("rpe_conv", "rpe_bn"),)

    def __init__(self, in_chans: int, dim: int, T: int, extra: bool = False) -> None:
        super().__init__()
        widths = (dim // 8, dim // 4, dim // 2, dim)
        prev = in_chans
        for i, (suffix, w) in enumerate(zip(("", "1", "2", "3"), widths)):
            setattr(self, f"proj_conv{suffix}", nn.Conv2d(prev, w, 3, padding=1, bias=False))
            setattr(self, f"proj_bn{suffix}", nn.BatchNorm2d(w))
            setattr(self, f"proj_lif{suffix}", LIF(T))
            if extra:
                setattr(self, f"extra_conv{i}", nn.Conv2d(w, w, 3, padding=1, bias=False))
                setattr(self, f"extra_bn{i}", nn.BatchNorm2d(w))
                setattr(self, f"extra_lif{i}", LIF(T))
            prev = w
        self.extra = extra
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.rpe_conv = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(dim)
        self.rpe_lif = LIF(T)

    def forward(self, x: Tensor) -> Tensor:  # (T * B, C, H, W) -> (T * B, D, H / 16, W / 16)
        for i, suffix in enumerate(("", "1", "2", "3")):
            x = getattr(self, f"proj_lif{suffix}")(getattr(self, f"proj_bn{suffix}")(
                getattr(self, f"proj_conv{suffix}")(x)))
            if self.extra:
                x = getattr(self, f"extra_lif{i}")(getattr(self, f"extra_bn{i}")(getattr(self, f"extra_conv{i}")(x)))
            x = self.maxpool(x)
        return x + self.rpe_lif(self.rpe_bn(self.rpe_conv(x)))


class SpikingSelfAttention(nn.Module):
    """SSA: spike-form Q, K, V (1x1 conv-BN-LIF each), ``Q (K^T V) * scale`` per head (no softmax), LIF at
    threshold 0.5, then a 1x1 conv-BN-LIF projection."""

    fuse_pairs = (("q_conv", "q_bn"), ("k_conv", "k_bn"), ("v_conv", "v_bn"), ("proj_conv", "proj_bn"))

    def __init__(self, dim: int, num_heads: int, T: int, scale: float = 0.125) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"spikformer_v2: dim {dim} must be a multiple of num_heads, got {num_heads}")
        self.num_heads, self.scale = num_heads, scale
        for n in ("q", "k", "v"):
            setattr(self, f"{n}_conv", nn.Conv2d(dim, dim, 1, bias=False))
            setattr(self, f"{n}_bn", nn.BatchNorm2d(dim))
            setattr(self, f"{n}_lif", LIF(T))
        self.attn_lif = LIF(T, v_threshold=0.5)
        self.proj_conv = nn.Conv2d(dim, dim, 1)
        self.proj_bn = nn.BatchNorm2d(dim)
        self.proj_lif = LIF(T)

    def _heads(self, x: Tensor, n: str) -> Tensor:
        x = getattr(self, f"{n}_lif")(getattr(self, f"{n}_bn")(getattr(self, f"{n}_conv")(x)))
        return x.flatten(2).unflatten(1, (self.num_heads, -1)).transpose(-1, -2)  # (TB, C, H, W) -> (TB, h, N, d)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._heads(x, "q"), self._heads(x, "k"), self._heads(x, "v")
        attn = (q @ (k.transpose(-2, -1) @ v)) * self.scale  # (TB, h, N, d): no softmax
        attn = attn.transpose(-1, -2).flatten(1, 2).reshape_as(x)  # (TB, h, N, d) -> (TB, C, H, W)
        return self.proj_lif(self.proj_bn(self.proj_conv(self.attn_lif(attn))))


class SpikingMlp(nn.Module):
    """Two 1x1 conv-BN-LIF layers (dim -> hidden -> dim)."""

    fuse_pairs = (("fc1_conv", "fc1_bn"), ("fc2_conv", "fc2_bn"))

    def __init__(self, dim: int, hidden: int, T: int) -> None:
        super().__init__()
        self.fc1_conv, self.fc1_bn, self.fc1_lif = nn.Conv2d(dim, hidden, 1), nn.BatchNorm2d(hidden), LIF(T)
        self.fc2_conv, self.fc2_bn, self.fc2_lif = nn.Conv2d(hidden, dim, 1), nn.BatchNorm2d(dim), LIF(T)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1_lif(self.fc1_bn(self.fc1_conv(x)))
        return self.fc2_lif(self.fc2_bn(self.fc2_conv(x)))


class SpikformerBlock(nn.Module):
    """``x + SSA(x)``, then ``x + MLP(x)`` (additive residuals of spike maps, as in the v1 code).

    Takes the spike maps ``(T * B, C, H, W)`` (or the previous block's pair) and returns the pair
    ``(spike maps, mean over time (B, C, H, W))``: the second is the stage's NCHW map that hooks and CAMs read.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, T: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.T = T
        self.attn = SpikingSelfAttention(dim, num_heads, T)
        self.mlp = SpikingMlp(dim, int(dim * mlp_ratio), T)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        if isinstance(x, tuple):
            x = x[0]
        x = x + self.drop_path(self.attn(x))
        x = x + self.drop_path(self.mlp(x))
        return x, x.unflatten(0, (self.T, -1)).mean(0)  # (T * B, C, H, W) -> rate (B, C, H, W)


class SpikformerV2(Backbone):
    """Spikformer: a spiking tokenizer to stride 16, then ``depth`` spiking Transformer blocks; head on the mean
    firing rate over time and space.

    Args:
        T: number of time steps the (static) image is repeated over; compute grows linearly with it.
        stem: ``"scs"`` (v2 Spiking Convolutional Stem) or ``"sps"`` (v1 Spiking Patch Splitting, the official code).
    """

    first_conv = "stem.proj_conv"

    min_input_size = 32
    input_multiple = 16
    spiking = True

    def __init__(self, embed_dim: int = 512, depth: int = 8, num_heads: int = 8, mlp_ratio: float = 4.0, *,
                 T: int = 4, stem: str = "scs", in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if stem not in ("scs", "sps"):
            raise ValueError(f"spikformer_v2: stem must be 'scs' (v2) or 'sps' (v1), got {stem!r}")
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"spikformer_v2: T (time steps) must be a positive int, got {T!r}")
        if embed_dim % 8:
            raise ValueError(f"spikformer_v2: embed_dim must be a multiple of 8 (tokenizer widths D/8..D), "
                             f"got {embed_dim}")
        self.T, self.in_chans = T, in_chans
        self.stem = SpikformerTokenizer(in_chans, embed_dim, T, extra=stem == "scs")
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(SpikformerBlock(embed_dim, num_heads, mlp_ratio, T, dpr[i]) for i in range(depth))
        self.set_feature_info([FeatureInfo(embed_dim, 16, f"blocks.{i}") for i in range(depth)])
        self.init_head(embed_dim, num_classes, drop_rate)
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> Tensor:
        x = x.unsqueeze(0).expand(self.T, -1, -1, -1, -1).flatten(0, 1)  # (B, C, H, W) -> (T * B, C, H, W)
        return self.stem(x)

    def stage_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def stage_to_nchw(self, x: tuple[Tensor, Tensor]) -> Tensor:
        return x[1]  # a block's (spikes, mean over time): the (B, C, H, W) map

    def forward_norm(self, x: tuple[Tensor, Tensor]) -> Tensor:
        return x[1]

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official v1 keys (``patch_embed.*``, ``block.N.*``, ``head.*``, Conv1d weights) to ours; idempotent."""
        out = {}
        for k, v in state_dict.items():
            if k.startswith("block.") and (".norm1." in k or ".norm2." in k):
                continue  # unused LayerNorms of the official Block
            if k.startswith("patch_embed."):
                k = "stem." + k[len("patch_embed."):]
            elif k.startswith("block."):
                k = "blocks." + k[len("block."):]
            elif k.startswith("head.") and not k.startswith("head.fc."):
                k = "head.fc." + k[len("head."):]
            if k.endswith("_conv.weight") and v.ndim == 3:
                v = v.unsqueeze(-1)  # Conv1d (O, I, 1) -> Conv2d (O, I, 1, 1)
            out[k] = v
        return out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d) and not is_meta(m.weight):
        # NOTE: the official code keeps PyTorch's default conv init, under which the eval-mode network (BatchNorm
        # with fresh statistics) never fires past the first layers. N(0, (4 / sqrt(fan_in))^2) keeps a third of the
        # neurons firing at init; training-mode BatchNorm is invariant to this scale.
        nn.init.normal_(m.weight, std=4.0 * m.weight[0].numel() ** -0.5)
    if isinstance(m, nn.Linear) and not is_meta(m.weight):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_V1 = ("v1 tokenizer (SPS) = ZK-Zhou/spikformer imagenet/model.py; params_m = that code's count, which includes the "
       "unused Block LayerNorms (4*dim per block) we do not build; without them it is the v1 paper's figure exactly")
SCS_NOTE = ("v2 (arXiv:2401.02020): SSA/MLP/head as the v1 code (the v2 abstract keeps SSA and Spikformer); the "
            "Spiking Convolutional Stem is SPS 'with supplementary convolutional layers' (abstract): the paper body "
            "(its SCS figure, its variant table) was not readable here, so we add one conv3x3-BN-LIF at each of the 4 "
            "tokenizer widths (our choice); the abstract's "
            "8-layer T=4 model (80.38%) does not state its width: we assume D=512, 8 heads (v1's official factory "
            "width); params are ours, no paper figure could be read to check them (SCS widths 384/768 are left out "
            "for want of any reported number); the 172M 16-layer SSL model is not registered "
            "(its width is not stated in the readable text)")
_P1 = "ImageNet results table of arXiv:2209.15425 (Spikformer v1 '8-D' rows, T=4)"
_P2 = "abstract of arXiv:2401.02020 (8 layers, T=4; width not stated)"

VARIANTS = {
    "spikformer_v2_test":      Variant(dict(embed_dim=32, depth=1, num_heads=2, T=2), params_m=0.073972,
                                       input_size=64, notes=SCS_NOTE),
    "spikformer_v2_8_512":     Variant(dict(embed_dim=512), params_m=32.824744, paper=Paper(None, None, 80.38, _P2),
                                       notes=SCS_NOTE),
    "spikformer_v2_8_384_sps": Variant(dict(embed_dim=384, stem="sps"), params_m=16.828312,
                                       paper=Paper(16.81, None, 70.24, _P1), notes=_V1),
    "spikformer_v2_8_512_sps": Variant(dict(embed_dim=512, stem="sps"), params_m=29.705768,
                                       paper=Paper(29.68, None, 73.38, _P1), notes=_V1),
    "spikformer_v2_8_768_sps": Variant(dict(embed_dim=768, num_heads=12, stem="sps"), params_m=66.363208,
                                       paper=Paper(66.34, None, 74.81, _P1), notes=_V1),
}
register_family(SpikformerV2, VARIANTS, paper="arXiv:2401.02020", kind="vit",
                code="ZK-Zhou/spikformer@6212689 imagenet/model.py")
