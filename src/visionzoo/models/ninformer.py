"""NiNformer, from "NiNformer: A Network in Network Transformer with Token Mixing Generated Gating Function"
(Abdullah & Aydin, 2024). https://arxiv.org/abs/2403.02411

A plain token model without attention: each block gates a linear projection of its (normed) tokens with the
output of an inner MLP-Mixer block (token-mixing MLP over the ``seq_len`` patches, then a channel MLP), then runs a
feed-forward layer; both residual branches share one LayerNorm (as the official code). The token-mixing MLP is
sized for one patch count, so a model takes exactly the input size it was built for (``img_size``). The paper
trains on MNIST and CIFAR-10/100 only: there is no ImageNet configuration, and only the published CIFAR one is
registered. No softmax attention, and no token reduction (the token count is fixed by the mixer).

Differs from the paper: none. Follows Abdullah-88/NiNformer (BSD-3-Clause), ``ninformer.py`` and the
``NiNformerImageClassification`` wrapper of ``train.py`` (4x4 patchify conv, token mean, linear classifier; no final
norm). Its keys (``patcher``, ``model.{i}``, ``classifier``, ``mgu.Mixer.token_mix.2.net.0`` ...) are translated by
``NiNformer.remap``.
"""
from __future__ import annotations

from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, tokens_to_map
from visionzoo.layers import Mlp, init_linear, is_tracing
from visionzoo.registry import INCEPTION_MEAN, INCEPTION_STD, Paper, Variant, register_family

__all__ = ["NiNformer"]


class NiNformerMixer(nn.Module):
    """MLP-Mixer block: ``x + token_mlp(LN(x)^T)^T``, then ``x + channel_mlp(LN(x))``."""

    def __init__(self, dim: int, seq_len: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(dim)
        self.token_mlp = Mlp(seq_len, hidden, drop=drop)
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, hidden, drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)  # mix the N tokens per channel
        return x + self.channel_mlp(self.channel_norm(x))


class NiNformerGatingUnit(nn.Module):
    """``proj(x) * mixer(x)``: a linear path gated element-wise by an MLP-Mixer block."""

    def __init__(self, dim: int, seq_len: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.mixer = NiNformerMixer(dim, seq_len, hidden, drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) * self.mixer(x)


class NiNBlock(nn.Module):
    """``x + gate(LN(x))``, then ``x + ffn(LN(x))`` with the same LayerNorm."""

    def __init__(self, dim: int, hidden: int, seq_len: int, drop: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mgu = NiNformerGatingUnit(dim, seq_len, hidden, drop)
        self.ffn = Mlp(dim, hidden, drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mgu(self.norm(x))
        return x + self.ffn(self.norm(x))


class NiNformer(Backbone):
    """Patchify conv, NiN blocks over the patch tokens, token mean, linear classifier.

    Args:
        img_size: the one input size the model takes (the token-mixing MLPs are built for its patch count).
        hidden_dim: width of every MLP (the official ``d_ffn``: token, channel and feed-forward MLPs alike).
        drop_rate: dropout inside the MLPs (the official ``dropout``, 0.5 in its CIFAR training) and before the
            classifier (0 there).
    """

    kind = "vit"
    takes_img_size = True
    fixed_input_size = True
    takes_patch_size = True
    first_conv = "patch_embed"

    def __init__(self, img_size: int = 32, patch_size: int = 4, embed_dim: int = 256, hidden_dim: int = 512,
                 depth: int = 4, *, in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"ninformer: img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.img_size = img_size
        self.min_input_size = self.input_multiple = img_size  # one size: the token-mixing MLPs fix the patch count
        seq_len = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.blocks = nn.Sequential(*[NiNBlock(embed_dim, hidden_dim, seq_len, drop_rate) for _ in range(depth)])
        self.set_feature_info([FeatureInfo(embed_dim, patch_size, f"blocks.{i}") for i in range(depth)])
        self.init_head(embed_dim, num_classes, 0.0, pool_type="avg")
        self.apply(_init_weights)

    def check_input(self, x: Tensor) -> None:
        """The base checks, and the one input size the token-mixing MLPs are built for."""
        super().check_input(x)
        if not is_tracing() and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            size = f"{self.img_size}x{self.img_size}"
            raise ValueError(f"{self.name}: input {x.shape[-2]}x{x.shape[-1]} must be {size}, the size the model was "
                             f"built for (its token-mixing MLPs take exactly {(self.img_size // self.patch_size) ** 2} "
                             f"patches); build it with img_size= another size")

    def forward_stem(self, x: Tensor) -> Tensor:
        """Image ``(B, C, H, W)`` -> tokens ``(B, H/p * W/p, D)``."""
        return self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, N, D)

    def stage_modules(self) -> list[nn.Module]:
        return list(self.blocks)  # no final norm (the official model has none): forward_norm is the identity

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """The tokens of the chosen blocks as ``(B, D, H/p, W/p)`` maps."""
        grid = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return self.token_intermediates(x, indices, lambda t: tokens_to_map(t, grid))  # no prefix tokens

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours: ``patcher`` -> ``patch_embed``, ``model.{i}`` -> ``blocks.{i}``, ``classifier`` ->
        ``head.fc``, ``mgu.Mixer.token_mix.{0,2}`` -> ``mgu.mixer.token_{norm,mlp}``, ``channel_mix.{0,1}`` ->
        ``channel_{norm,mlp}``, ``net.{0,3}`` -> ``fc{1,2}``. Keys already in our layout pass unchanged."""
        rules = [("patcher.", "patch_embed."), ("classifier.", "head.fc."), ("mgu.Mixer.", "mgu.mixer."),
                 ("token_mix.0.", "token_norm."), ("token_mix.2.", "token_mlp."), ("channel_mix.0.", "channel_norm."),
                 ("channel_mix.1.", "channel_mlp."), ("net.0.", "fc1."), ("net.3.", "fc2.")]
        out = {}
        for k, v in state_dict.items():
            if k.startswith("model."):
                k = "blocks." + k[len("model."):]
            for old, new in rules:
                k = k.replace(old, new)
            out[k] = v
        return out


def _init_weights(m: nn.Module) -> None:
    init_linear(m, std=0.02)


_NOTES = ("CIFAR-10 configuration of the official train.py (32 px, patch 4, d_model 256, d_ffn 512, 4 layers, "
          "dropout 0.5, Adam 1e-3, 100 epochs); params with a 1000-class head (10 classes in the paper). "
          "The paper reports MNIST/CIFAR-10/CIFAR-100 accuracy only; no ImageNet numbers")
_SOURCE = ("count of the official code's CIFAR-10 model (10-class head); the paper gives no parameter table and "
           "reports MNIST/CIFAR-10/CIFAR-100 accuracy only (no ImageNet top-1)")
VARIANTS = {
    "ninformer_test":  Variant(dict(img_size=32, patch_size=8, embed_dim=32, hidden_dim=64, depth=2),
                               params_m=0.062696, input_size=32),
    "ninformer_cifar": Variant(dict(img_size=32, patch_size=4), params_m=2.9066, input_size=32,
                               paper=Paper(2.652170, None, None, _SOURCE), mean=INCEPTION_MEAN, std=INCEPTION_STD,
                               crop_pct=1.0, notes=_NOTES),
}
register_family(NiNformer, VARIANTS, paper="arXiv:2403.02411", kind="vit",
                code="Abdullah-88/NiNformer@0ec85d46a82ea9472fdd28dde0b70dc0ca62a91a ninformer.py, train.py")
