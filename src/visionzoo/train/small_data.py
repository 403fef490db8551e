"""Small-dataset recipes for plain ViTs: Shifted Patch Tokenization and Locality Self-Attention (SPT/LSA), and DHVT's.

"Vision Transformer for Small-Size Datasets" (Lee, Lee and Song, 2021, https://arxiv.org/abs/2112.13492;
aanna0701/SPT_LSA_ViT ``models/SPT.py``, ``models/vit.py``):

* **SPT** replaces the patch embedding (the contract's ``first_conv``, a patchifying Conv2d): the image and its four
  diagonal shifts by half a patch (zero-padded) are concatenated on channels (5x), cut into patches, and each
  flattened patch goes through LayerNorm and a Linear to the embedding width.
* **LSA** changes every block's attention through the attention seam: a learnable temperature per head (initialised
  to the fixed scale ``d_head^-0.5``) in place of that scale (a ``q_quant`` hook on the ``AttentionCore`` scales the
  queries by ``temperature / scale``), and diagonal masking (``extra_bias``: no token attends to itself).

"Bridging the Gap Between Vision Transformers and Convolutional Neural Networks on Small Datasets" (DHVT; Lu et al.,
NeurIPS 2022, https://arxiv.org/abs/2210.05958; ArieSeirack/DHVT ``vision_transformer.py``) puts its three parts into
the plain ViT (``--dhvt``), the same ``layers`` the DHVT family is built from:

* **SOPE** replaces the patchifying ``first_conv``: log2(patch) 3x3 stride-2 conv + BN layers between two affines
  (patch a power of two);
* **DAFF** replaces every block's MLP: 1x1 conv, depthwise 3x3 with a residual, 1x1 conv (BN after each) on the patch
  map, and the class (prefix) tokens rescaled by a squeeze-excitation of the map. The map's size is read from the
  model's input by a forward pre-hook;
* **head interaction** (HI-MHSA) wraps every block's attention: one head token per head (that head's channel group
  averaged over the tokens, Linear to full width, LayerNorm, GELU, a learned embedding) joins the sequence after the
  prefix tokens; after attention the head tokens' mean is added to the first (class) token and they leave. In a model
  without a class token they leave without being merged (the paper has no such model).

Differs from DHVT: the plain ViT keeps its position table (DHVT has none; SOPE and DAFF carry position, so the table
is redundant, not harmful), and its qkv/proj/norm layers and their widths. DHVT's training recipe (AdamW, lr 1e-3 at
batch 256, weight decay 0.05, 5 warm-up epochs, mixup/cutmix, label smoothing 0.1, 300 epochs on CIFAR) is set with
train's flags (``--epochs 300 --batch-size 256 --lr 1e-3 --warmup-epochs 5 --mixup 0.5 --cutmix 0.5``).

All three are for plain token models (blocks built on ``layers.TokenBlock``, as ViT/DeiT); other families are refused
(for them, the DHVT family itself is ``dhvt_*``). ``apply_small_data`` applies them in the one order that composes:
SPT or SOPE, then LSA (its hook sees the attention's own input), then head interaction around it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.errors import ArgumentError
from visionzoo.layers import DAFF, SOPE, TokenBlock, head_tokens

__all__ = ["HeadInteraction", "LSATemperature", "ShiftedPatchTokenization", "apply_dhvt", "apply_lsa", "apply_spt",
           "apply_small_data"]
RECIPES = ("spt", "lsa", "dhvt")


def _plain_blocks(model: nn.Module, what: str) -> list[TokenBlock]:
    stages = model.stage_modules() if hasattr(model, "stage_modules") else []
    if not (stages and all(isinstance(s, TokenBlock) for s in stages)):
        name = getattr(model, "name", type(model).__name__)
        raise ArgumentError(f"{name}: --{what} is a small-dataset recipe for plain ViTs (blocks built on "
                            f"layers.TokenBlock, e.g. vit_*, deit_*); {name} is not one. For ConvNets and "
                            f"hierarchical models train without it (the DHVT family, dhvt_*, has DHVT's parts "
                            f"built in)")
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


def _patchify_conv(model: nn.Module, what: str) -> tuple[str, nn.Conv2d]:
    """The path and module of ``model``'s patchifying first conv (kernel = stride, no padding), which --spt and
    --dhvt replace."""
    path = getattr(model, "first_conv", None)
    conv = model.get_submodule(path) if path else None
    if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == conv.stride and conv.kernel_size[0] ==
            conv.kernel_size[1] and conv.padding == (0, 0)):
        done = [k for k in ("spt", "dhvt") if (getattr(model, "small_data", None) or {}).get(k)]
        hint = f" (--{done[0]} has replaced it already: use one of --spt and --dhvt)" if done else ""
        raise ArgumentError(f"--{what} replaces a patchifying Conv2d (kernel = stride) at first_conv, got "
                            f"{type(conv).__name__}{hint}")
    return path, conv


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _record(model: nn.Module, what: str) -> None:
    model.small_data = {**(getattr(model, "small_data", None) or {}), what: True}  # recorded with the weights


def apply_spt(model: nn.Module) -> nn.Module:
    """Replace ``model``'s patchifying first conv by Shifted Patch Tokenization, in place."""
    _plain_blocks(model, "spt")
    path, conv = _patchify_conv(model, "spt")
    spt = ShiftedPatchTokenization(conv.in_channels, conv.out_channels, conv.kernel_size[0]).to(conv.weight.device)
    _replace(model, path, spt)
    _record(model, "spt")
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
    _record(model, "lsa")
    return model


class HeadInteraction(nn.Module):
    """A plain block's attention with DHVT's head tokens: ``(B, p + N, C)`` -> ``(B, p + N, C)``, where ``p`` is the
    attention's prefix-token count. The wrapped attention sees ``p`` prefix tokens, the ``heads`` head tokens, then
    the patch tokens."""

    def __init__(self, attn: nn.Module, dim: int, num_heads: int, prefix: int) -> None:
        super().__init__()
        self.attn = attn
        self.num_heads, self.head_dim, self.prefix = num_heads, dim // num_heads, prefix
        self.ht_proj = nn.Linear(self.head_dim, dim)
        self.ht_norm = nn.LayerNorm(self.head_dim)
        self.act = nn.GELU()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_heads, dim))
        nn.init.trunc_normal_(self.ht_proj.weight, std=0.02)
        nn.init.zeros_(self.ht_proj.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        attn.core.prefix_tokens = prefix + num_heads  # the head tokens are not patch tokens

    @property
    def core(self) -> nn.Module:
        return self.attn.core

    def _with_head_tokens(self, x: Tensor) -> Tensor:
        p = self.prefix
        t = head_tokens(x, self.num_heads, self.ht_proj, self.ht_norm, self.act, self.pos_embed)
        return torch.cat([x[:, :p], t, x[:, p:]], dim=1)  # (B, p + heads + N, C)

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        p, h = self.prefix, self.num_heads
        y = self.attn(self._with_head_tokens(x), **kwargs)
        if not p:
            return y[:, h:]
        first = y[:, :1] + y[:, p:p + h].mean(1, keepdim=True)  # the head tokens merged into the class token
        return torch.cat([first, y[:, 1:p], y[:, p + h:]], dim=1)

    def attention_probs(self, x: Tensor) -> Tensor:
        """The probabilities among the block's own tokens ``(B, heads, p + N, p + N)``: the head tokens' rows and
        columns removed, each row renormalised (the share of attention that went to head tokens is spread)."""
        probs = self.attn.attention_probs(self._with_head_tokens(x))
        keep = [i for i in range(probs.shape[-1]) if not self.prefix <= i < self.prefix + self.num_heads]
        probs = probs[..., keep, :][..., keep]
        return probs / probs.sum(-1, keepdim=True)


def _record_grid(daffs: list[DAFF], patch: int):  # noqa: ANN202
    def hook(model: nn.Module, args: tuple[Any, ...]) -> None:
        h, w = args[0].shape[-2:]
        for d in daffs:
            d.grid = (h // patch, w // patch)
    return hook


def apply_dhvt(model: nn.Module) -> nn.Module:
    """DHVT's SOPE, DAFF and head interaction in ``model``, in place (see the module docstring)."""
    blocks = _plain_blocks(model, "dhvt")
    path, conv = _patchify_conv(model, "dhvt")
    patch, dim = conv.kernel_size[0], conv.out_channels
    device = conv.weight.device
    try:
        sope = SOPE(conv.in_channels, dim, patch)
    except ValueError as e:
        raise ArgumentError(f"--dhvt: {e}; this model has patch {patch}. Create it with a power-of-two patch, e.g. "
                            "--patch-size 16") from None
    _replace(model, path, sope.to(device))
    daffs = []
    for block in blocks:
        attn = block.attn
        heads = getattr(attn, "num_heads", None)
        if heads is None or not hasattr(attn, "core"):
            raise ArgumentError(f"--dhvt needs blocks whose attention says num_heads and has a core, got {type(attn)}")
        if dim % 4:
            raise ArgumentError(f"--dhvt: DAFF's squeeze-excitation needs a width divisible by 4, got {dim}")
        prefix = block.prefix_tokens
        hidden = getattr(getattr(block.mlp, "fc1", None), "out_features", 4 * dim)
        daff = DAFF(dim, hidden, prefix).to(device)
        block.mlp = daff
        block.attn = HeadInteraction(attn, dim, heads, prefix).to(device)
        daffs.append(daff)
    model.register_forward_pre_hook(_record_grid(daffs, patch))
    model.first_conv = f"{path}.proj.0.0"  # the contract: SOPE's first conv is the first layer with weights
    model.no_token_reduction_reason = ("--dhvt's DAFF reshapes the patch tokens to their map in every block, so "
                                       "tokens cannot be merged or dropped")
    _record(model, "dhvt")
    return model


def apply_small_data(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Apply the recipes ``spec`` turns on (``{"spt": True, "lsa": True, "dhvt": True}``, as ``model.small_data``
    records them), in the order that composes. SPT and DHVT's SOPE both replace the patch embedding: one of them."""
    unknown = sorted(set(spec) - set(RECIPES) - {"peft"})
    if unknown:
        raise ArgumentError(f"unknown small-data recipe(s) {unknown}; known: {RECIPES}")
    if spec.get("spt") and spec.get("dhvt"):
        raise ArgumentError("--spt and --dhvt both replace the patch embedding (SPT vs DHVT's SOPE): use one of them")
    if spec.get("spt"):
        apply_spt(model)
    if spec.get("dhvt"):
        _plain_blocks(model, "dhvt")
    if spec.get("lsa"):
        apply_lsa(model)
    if spec.get("dhvt"):
        apply_dhvt(model)
    return model
