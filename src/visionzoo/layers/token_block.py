"""The token seam: pre-norm transformer blocks over one plain token sequence, whose steps a token tool can run.

A plain-token family (ViT, DeiT; later T2T-ViT, ConViT, DHVT, CrossViT's branches) builds its blocks on
``TokenBlock``. Such a block is ``x + attn_branch(x)``, then ``x + mlp_branch(x)``, over ``(B, N, C)`` tokens whose
first ``prefix_tokens`` are class/distillation tokens and whose attention is global (no windows, no strides).
Token reduction (``visionzoo.tokens``: ToMe, EViT, ATS, MCTF, token slimming) sets the block's ``token_hook``,
a module called as ``token_hook(block, x)`` that runs the same steps and merges or drops tokens between them; it
sees the block's keys and class attention through the attention core (``qkv_observer``) and adds a per-key
bias there (``extra_bias``: ToMe's log token size, ATS's padding mask), so SDPA still runs.

With no hook (the default) ``forward`` costs one attribute test, traces under FX and exports as before.
A family wires the seam only where nothing after its blocks depends on the token grid (a later stage that
reshapes the tokens to a map would break once they are merged): blocks of windowed or hierarchical stages are not
``TokenBlock`` s, and ``visionzoo.tokens`` refuses models that have none.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .act import LayerType
from .attention import Attention, AttentionCore
from .drop import DropPath
from .mlp import Mlp
from .norm import get_norm


class TokenBlock(nn.Module):
    """Base of ``x + attn_branch(x)``, ``x + mlp_branch(x)`` blocks over one plain token sequence (the token seam).

    The default steps use the timm names ``norm1``, ``attn`` (a ``layers.Attention``), ``drop_path1``, ``norm2``,
    ``mlp``, ``drop_path2``; a block with another layout (layer scale, another attention module) overrides
    ``attn_branch``, ``mlp_branch``, ``attn_probs`` and ``attn_core``.

    Attributes:
        token_hook: ``None``, or a module a token tool sets; called as ``token_hook(block, x)`` in place of the
            two steps.
    """

    def __init__(self) -> None:
        super().__init__()
        self.token_hook: nn.Module | None = None

    @property
    def attn_core(self) -> AttentionCore:
        """The block's attention core (its ``prefix_tokens`` count the class/distillation tokens)."""
        return self.attn.core

    @property
    def attn_input(self) -> nn.Module:
        """The module whose output the attention branch reads (the pre-norm ``norm1``): explain's CAMs tap it where
        the head reads only the class token (the target's gradient reaches the patch tokens only through it)."""
        return self.norm1

    @property
    def prefix_tokens(self) -> int:
        return self.attn_core.prefix_tokens

    def attn_branch(self, x: Tensor, attend: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The attention residual branch of ``x`` ``(B, N, C)``; with ``attend`` given, it maps the values of ``x``
        ``(B, heads, N, d)`` to the attention output in place of ``softmax(q k^T) v``."""
        if attend is None:
            return self.drop_path1(self.attn(self.norm1(x)))
        return self.drop_path1(self.attn(self.norm1(x), attend=attend))

    def attn_probs(self, x: Tensor) -> Tensor:
        """The attention probabilities ``(B, heads, N, N)`` the attention branch of ``x`` would use."""
        return self.attn.attention_probs(self.norm1(x))

    def mlp_branch(self, x: Tensor) -> Tensor:
        return self.drop_path2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        if self.token_hook is not None:
            return self.token_hook(self, x)
        x = x + self.attn_branch(x)
        return x + self.mlp_branch(x)


class PreNormBlock(TokenBlock):
    """The standard pre-norm transformer block (timm's ``Block``): ``x + attn(norm1(x))``, then
    ``x + mlp(norm2(x))``, with the shared ``Attention`` and ``Mlp``; ``mlp`` passes another feed-forward module
    (ViTamin's GeGLU). State-dict names: ``norm1``, ``attn``, ``norm2``, ``mlp``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_layer: LayerType = "ln", act_layer: LayerType = "gelu",
                 prefix_tokens: int = 0, attn_type: str = "softmax", mlp: nn.Module | None = None) -> None:
        super().__init__()
        norm = get_norm(norm_layer)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, prefix_tokens=prefix_tokens,
                              attn_type=attn_type)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = mlp if mlp is not None else Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
