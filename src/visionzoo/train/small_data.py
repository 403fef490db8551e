"""Small-dataset recipes for plain ViTs: Shifted Patch Tokenization and Locality Self-Attention (SPT/LSA).

"Vision Transformer for Small-Size Datasets" (Lee, Lee and Song, 2021, https://arxiv.org/abs/2112.13492;
aanna0701/SPT_LSA_ViT ``models/SPT.py``, ``models/vit.py``):

* **SPT** replaces the patch embedding (the contract's ``first_conv``, a patchifying Conv2d): the image and its four
  diagonal shifts by half a patch (zero-padded) are concatenated on channels (5x), cut into patches, and each
  flattened patch goes through LayerNorm and a Linear to the embedding width.
* **LSA** changes every block's attention through the attention seam: a learnable temperature per head (initialised
  to the fixed scale ``d_head^-0.5``) in place of that scale (a ``q_quant`` hook on the ``AttentionCore`` scales the
  queries by ``temperature / scale``), and diagonal masking (``extra_bias``: no token attends to itself).

Both are for plain token models (blocks built on ``layers.TokenBlock``, as ViT/DeiT); other families are refused.
DHVT's recipe (SOPE, DAFF, head interaction) belongs to the DHVT family, which does not exist yet.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.errors import ArgumentError
from visionzoo.layers import TokenBlock

__all__ = ["LSATemperature", "ShiftedPatchTokenization", "apply_lsa", "apply_spt"]


def _plain_blocks(model: nn.Module, what: str) -> list[TokenBlock]:
    stages = model.stage_modules() if hasattr(model, "stage_modules") else []
    if not (stages and all(isinstance(s, TokenBlock) for s in stages)):
        name = getattr(model, "name", type(model).__name__)
        raise ArgumentError(f"{name}: --{what} is a small-dataset recipe for plain ViTs (blocks built on "
                            f"layers.TokenBlock, e.g. vit_*, deit_*); {name} is not one. For ConvNets and "
                            f"hierarchical models train without it (DHVT's recipe comes with the DHVT family)")
    return list(stages)


class ShiftedPatchTokenization(nn.Module):
    """Image ``(B, C, H, W)`` -> patch embeddings ``(B, D, H/p, W/p)`` from the image and its 4 diagonal shifts."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch = patch_size
        dim = 5 * in_chans * patch_size * patch_size
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, embed_dim)

    def shifted(self, x: Tensor) -> Tensor:
        """``(B, 5C, H, W)``: ``x``, then ``x`` moved by half a patch up-left, up-right, down-left, down-right."""
        H, W = x.shape[-2:]
        s = self.patch // 2
        xp = F.pad(x, (s, s, s, s))
        crops = [xp[:, :, s + dy:s + dy + H, s + dx:s + dx + W] for dy, dx in ((s, s), (s, -s), (-s, s), (-s, -s))]
        return torch.cat([x, *crops], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        p = self.patch
        a = F.unfold(self.shifted(x), p, stride=p).transpose(1, 2)  # (B, 5C p p, L) -> (B, L, 5C p p)
        y = self.proj(self.norm(a))  # (B, L, D)
        return y.transpose(1, 2).reshape(B, -1, H // p, W // p)


def apply_spt(model: nn.Module) -> nn.Module:
    """Replace ``model``'s patchifying first conv by Shifted Patch Tokenization, in place."""
    _plain_blocks(model, "spt")
    path = getattr(model, "first_conv", None)
    conv = model.get_submodule(path) if path else None
    if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == conv.stride and conv.kernel_size[0] ==
            conv.kernel_size[1] and conv.padding == (0, 0)):
        raise ArgumentError(f"--spt replaces a patchifying Conv2d (kernel = stride) at first_conv, got {conv!r}")
    parent, _, attr = path.rpartition(".")
    spt = ShiftedPatchTokenization(conv.in_channels, conv.out_channels, conv.kernel_size[0]).to(conv.weight.device)
    setattr(model.get_submodule(parent) if parent else model, attr, spt)
    model.small_data = {**(getattr(model, "small_data", None) or {}), "spt": True}  # recorded with the weights
    return model


class LSATemperature(nn.Module):
    """``q -> q * temperature / scale`` per head on ``(B, heads, N, d)`` queries: with the core's fixed ``scale``
    the logits become ``temperature_h q.k`` (LSA's learnable temperature, initialised to ``scale``)."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.scale = head_dim ** -0.5
        self.temperature = nn.Parameter(torch.full((heads,), self.scale))

    def forward(self, q: Tensor) -> Tensor:
        return q * (self.temperature / self.scale).to(q.dtype).view(1, -1, 1, 1)


def _diagonal_mask(attn: nn.Module, args: tuple[Tensor, ...]) -> None:
    """Before each attention call: no token attends to itself. Another tool's boolean mask of this call's size (VQT's)
    is combined with the diagonal; LSA's own mask of an earlier call is replaced."""
    x = args[0]
    n = x.shape[1]
    core = attn.core
    bias, own = core.extra_bias, core.__dict__.get("lsa_mask")
    if bias is not None and bias is not own:
        if bias.dtype != torch.bool or tuple(bias.shape) != (n, n):
            raise ArgumentError("--lsa: the attention core has another tool's extra_bias that LSA cannot combine with")
        core.extra_bias = bias & ~torch.eye(n, dtype=torch.bool, device=x.device)
        return
    if own is None or own.shape[-1] != n or own.device != x.device:
        own = ~torch.eye(n, dtype=torch.bool, device=x.device)  # True = may attend
        core.__dict__["lsa_mask"] = own
    core.extra_bias = own


def apply_lsa(model: nn.Module) -> nn.Module:
    """Locality Self-Attention in every block of ``model``, in place."""
    for block in _plain_blocks(model, "lsa"):
        attn = getattr(block, "attn", None)
        heads, head_dim = getattr(attn, "num_heads", None), getattr(attn, "head_dim", None)
        if heads is None or head_dim is None:
            raise ArgumentError(f"--lsa needs blocks whose attention says num_heads/head_dim, got {type(attn)}")
        core = block.attn_core
        if core.q_quant is not None or core.extra_bias is not None:
            raise ArgumentError("--lsa: the attention core already has a query hook or an extra bias (another tool)")
        core.q_quant = LSATemperature(heads, head_dim).to(next(block.parameters()).device)
        attn.register_forward_pre_hook(_diagonal_mask)  # the attention's input: after any token insertion
    model.small_data = {**(getattr(model, "small_data", None) or {}), "lsa": True}
    return model
