"""SVT, from "Scattering Vision Transformer: Spectral Mixing Matters" (Patro, Agneeswaran, NeurIPS 2023).
https://arxiv.org/abs/2311.01310

The hierarchical layout of SpectFormer-H (``layers/spectral_stages.py``: conv stem, four stages, class-attention
head with token labeling's auxiliary classifier) with the scattering mixer in stage 1 and softmax attention in
stages 2-4 (the released code's ``alpha = 1``). The scattering mixer: a one-level dual-tree complex wavelet
transform (DTCWT; biorthogonal ``near_sym_b`` filters), the low-pass band times a learnable real map per channel,
the six oriented complex high-pass bands through a block-diagonal (4 blocks) two-layer complex MLP over channels
(ReLU on the real and imaginary parts in between), then the inverse DTCWT. It is not softmax attention.

The DTCWT is written here in torch (depthwise convolutions with symmetric extension, the quad/complex
rearrangements), with no wavelet dependency at run time: the filter taps are constants of the ``near_sym_b`` pair.
It equals pytorch_wavelets' ``DTCWTForward(J=1)`` / ``DTCWTInverse`` (the parity fixture runs the official model on
them) and reconstructs its input exactly. It traces, exports and counts as ordinary convolutions.

Differs from the official code (badripatro/svt; no licence file):
- The low-pass weight is built for ``img_size`` (56x56 at 224, hard-coded there for dims 64/96) and resized
  bilinearly (``align_corners=True``) to another input's stage-1 grid on the fly; the official code runs at 224 only.
- Gradients are autograd's through the transform; the official transform's hand-written backward uses the
  inverse filters, which differs from the exact gradient at the borders. Forward outputs are the same.
- The wavelet buffers the official modules register (``xfm.h0o``, ...) are constants here; ``remap`` drops them.
- Training with token labeling (MixToken, the dense loss) is not reproduced (see ``layers.ClassAttentionHead``).
- Half and bfloat16 inputs run the mixer in float32 and are cast back (the official code keeps float32).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone
from visionzoo.layers import (
    ClassAttentionHead,
    build_spectral_stages,
    conv_bn_relu_stem,
    init_linear,
    is_meta,
    remap_spectral_stages,
    trace_leaf,
)
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["SVT"]

# near_sym_b (Kingsbury): analysis low/high-pass h0/h1 and synthesis low/high-pass g0/g1, as the dtcwt package
# tabulates them (h0o = g1o up to sign alternation, g0o = h1o likewise); all are symmetric.
_H0 = (-0.0017578125, 0.0, 0.022265625, -0.046875, -0.0482421875, 0.296875, 0.55546875, 0.296875, -0.0482421875,
       -0.046875, 0.022265625, 0.0, -0.0017578125)
_G0 = (7.062639508928571e-05, 0.0, -0.0013419015066964285, -0.0018833705357142855, 0.007156808035714285,
       0.023856026785714284, -0.05564313616071428, -0.05168805803571428, 0.29975760323660716, 0.5594308035714286,
       0.29975760323660716, -0.05168805803571428, -0.05564313616071428, 0.023856026785714284, 0.007156808035714285,
       -0.0018833705357142855, -0.0013419015066964285, 0.0, 7.062639508928571e-05)
_H1 = tuple(-c if i % 2 == 0 else c for i, c in enumerate(_G0))  # alternate signs of g0 (index 9, the centre, +)
_G1 = tuple(c if i % 2 == 0 else -c for i, c in enumerate(_H0))  # alternate signs of h0 (index 6, the centre, +)


@trace_leaf
def symmetric_extend(x: Tensor, m: int, dim: int) -> Tensor:
    """``x`` extended by ``m`` samples on both ends of ``dim``, mirrored about the half-sample (``a b c | c b a``),
    as often as needed for any length."""
    n = x.shape[dim]
    idx = torch.arange(-m, n + m, device=x.device) % (2 * n)
    idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
    return x.index_select(dim, idx)


@trace_leaf
def _kernel(x: Tensor, taps: tuple[float, ...], dim: int) -> Tensor:
    """``taps`` as a conv2d weight along ``dim`` (2: columns, 3: rows), reversed (conv2d correlates), x's dtype."""
    k = torch.tensor(taps[::-1], dtype=x.dtype, device=x.device)
    return k.view(1, 1, -1, 1) if dim == 2 else k.view(1, 1, 1, -1)


def _filter(x: Tensor, taps: tuple[float, ...], dim: int) -> Tensor:
    """Convolve every channel of ``x`` ``(B, C, H, W)`` along ``dim`` (2: columns, 3: rows) with the odd-length
    ``taps``, symmetric extension, same size out."""
    y = symmetric_extend(x, len(taps) // 2, dim).flatten(0, 1).unsqueeze(1)  # (B, C, H', W') -> (B*C, 1, H', W')
    return F.conv2d(y, _kernel(x, taps, dim)).reshape(x.shape)  # (B*C, 1, H, W) -> (B, C, H, W)


def _quads_to_complex(y: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Each 2x2 quad ``[[a, b], [c, d]]`` of ``y`` -> two complex subbands ``(a - d, b + c)``, ``(a + d, b - c)``
    (scaled by 1/sqrt 2), at half the size."""
    y = y / math.sqrt(2)
    a, b, c, d = y[:, :, 0::2, 0::2], y[:, :, 0::2, 1::2], y[:, :, 1::2, 0::2], y[:, :, 1::2, 1::2]
    return (a - d, b + c), (a + d, b - c)


def _complex_to_quads(w1: tuple[Tensor, Tensor], w2: tuple[Tensor, Tensor]) -> Tensor:
    """The inverse of ``_quads_to_complex``: two complex subbands -> one real map of twice the size."""
    (r1, i1), (r2, i2) = w1, w2
    top = torch.stack([r1 + r2, i1 + i2], dim=-1)  # (B, C, h, w, 2): quad corners a, b
    bottom = torch.stack([i1 - i2, r2 - r1], dim=-1)  # corners c, d
    y = torch.stack([top, bottom], dim=3)  # (B, C, h, 2, w, 2)
    B, C, h, _, w, _ = y.shape
    return y.reshape(B, C, 2 * h, 2 * w) / math.sqrt(2)  # (B, C, h, 2, w, 2) -> (B, C, 2h, 2w)


def dtcwt_forward(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One-level 2-D DTCWT of ``x`` ``(B, C, H, W)`` (H, W even): the low-pass ``(B, C, H, W)`` and the real and
    imaginary parts ``(B, C, 6, H/2, W/2)`` of the bands at 15, 45, 75, 105, 135, 165 degrees."""
    lo, hi = _filter(x, _H0, 3), _filter(x, _H1, 3)  # along rows (W)
    ll, lh = _filter(lo, _H0, 2), _filter(lo, _H1, 2)  # along columns (H)
    hl, hh = _filter(hi, _H0, 2), _filter(hi, _H1, 2)
    (r15, i15), (r165, i165) = _quads_to_complex(lh)
    (r45, i45), (r135, i135) = _quads_to_complex(hh)
    (r75, i75), (r105, i105) = _quads_to_complex(hl)
    re = torch.stack([r15, r45, r75, r105, r135, r165], dim=2)
    im = torch.stack([i15, i45, i75, i105, i135, i165], dim=2)
    return ll, re, im


def dtcwt_inverse(ll: Tensor, re: Tensor, im: Tensor) -> Tensor:
    """The inverse of ``dtcwt_forward``: ``(B, C, H, W)`` from the low-pass and the six complex bands."""
    r15, r45, r75, r105, r135, r165 = re.unbind(2)
    i15, i45, i75, i105, i135, i165 = im.unbind(2)
    lh = _complex_to_quads((r15, i15), (r165, i165))
    hl = _complex_to_quads((r75, i75), (r105, i105))
    hh = _complex_to_quads((r45, i45), (r135, i135))
    hi = _filter(hh, _G1, 2) + _filter(hl, _G0, 2)
    lo = _filter(lh, _G1, 2) + _filter(ll, _G0, 2)
    return _filter(hi, _G1, 3) + _filter(lo, _G0, 3)


@trace_leaf
def lowpass_weight_for(weight: Tensor, x: Tensor) -> Tensor:
    """The ``(C, h, w)`` low-pass weight on the grid of ``x`` ``(B, C, H, W)`` (bilinear, align_corners=True)."""
    if tuple(weight.shape[1:]) != tuple(x.shape[2:]):
        weight = F.interpolate(weight[None], size=tuple(x.shape[2:]), mode="bilinear", align_corners=True)[0]
    return weight.to(x.dtype)


@trace_leaf
def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 when it is half or bfloat16, else unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class SVTScatter(nn.Module):
    """DTCWT; low-pass times a learnable map; high-pass bands through a block-diagonal complex MLP; inverse DTCWT."""

    def __init__(self, dim: int, grid: tuple[int, int], num_blocks: int = 4) -> None:
        super().__init__()
        if dim % num_blocks:
            raise ValueError(f"svt: the scattering mixer splits {dim} channels into {num_blocks} blocks; "
                             f"dim must be a multiple of {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, dim // num_blocks
        nb, bs = num_blocks, self.block_size
        self.complex_weight_ll = nn.Parameter(torch.empty(dim, *grid))
        self.complex_weight_lh_1 = nn.Parameter(torch.empty(2, nb, bs, bs))
        self.complex_weight_lh_2 = nn.Parameter(torch.empty(2, nb, bs, bs))
        self.complex_weight_lh_b1 = nn.Parameter(torch.empty(2, nb, bs))
        self.complex_weight_lh_b2 = nn.Parameter(torch.empty(2, nb, bs))
        for p in self.parameters():
            if not p.is_meta:
                nn.init.normal_(p, std=0.02)

    @staticmethod
    def _complex_linear(re: Tensor, im: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``(re + i im) @ (w[0] + i w[1]) + (b[0] + i b[1])`` per channel block: ``(..., nb, bs)`` in and out."""
        def mm(x: Tensor, m: Tensor) -> Tensor:
            return torch.einsum("...nd,ndk->...nk", x, m)
        w, b = w.to(re.dtype), b.to(re.dtype)  # the mixer runs in at least float32
        return mm(re, w[0]) - mm(im, w[1]) + b[0], mm(re, w[1]) + mm(im, w[0]) + b[1]

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        y = upcast(x).transpose(1, 2).reshape(B, C, size[0], size[1])  # (B, N, C) -> (B, C, H, W)
        ll, re, im = dtcwt_forward(y)
        ll = ll * lowpass_weight_for(self.complex_weight_ll, ll)
        h, w = re.shape[-2:]
        # (B, C, 6, h, w) -> (B, 6, h, w, blocks, block_size): the MLP mixes channels within each block
        re = re.permute(0, 2, 3, 4, 1).reshape(B, 6, h, w, self.num_blocks, self.block_size)
        im = im.permute(0, 2, 3, 4, 1).reshape(B, 6, h, w, self.num_blocks, self.block_size)
        re, im = self._complex_linear(re, im, self.complex_weight_lh_1, self.complex_weight_lh_b1)
        re, im = self._complex_linear(F.relu(re), F.relu(im), self.complex_weight_lh_2, self.complex_weight_lh_b2)
        re = re.reshape(B, 6, h, w, C).permute(0, 4, 1, 2, 3)  # -> (B, C, 6, h, w)
        im = im.reshape(B, 6, h, w, C).permute(0, 4, 1, 2, 3)
        y = dtcwt_inverse(ll, re, im)
        return y.flatten(2).transpose(1, 2).type_as(x)  # (B, C, H, W) -> (B, N, C)


class SVT(Backbone):
    """SVT-H: conv stem, four stages (the scattering mixer in the first ``scatter_stages``, attention after),
    class-attention head.

    Args:
        img_size: the input size the low-pass weights are built for (their grid is the stage's token grid).
        stem_hidden: channels of the conv stem.
        token_label: keep token labeling's auxiliary classifier (``head.aux_fc``), as the released models.
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    min_input_size = 32
    input_multiple = 32

    def __init__(self, dims: tuple[int, ...] = (64, 128, 320, 448), depths: tuple[int, ...] = (3, 4, 6, 3),
                 num_heads: tuple[int, ...] = (2, 4, 10, 14), mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
                 stem_hidden: int = 32, scatter_stages: int = 1, img_size: int = 224, token_label: bool = True, *,
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.stem = conv_bn_relu_stem(in_chans, stem_hidden)
        self.stages, infos = build_spectral_stages(dims, depths, num_heads, mlp_ratios, stem_hidden, img_size,
                                                   scatter_stages, SVTScatter, drop_path_rate, "svt")
        self.set_feature_info(infos)
        head = ClassAttentionHead(dims[-1], num_classes, num_heads[-1], mlp_ratios[-1], drop_rate, aux=token_label)
        self.init_head(dims[-1], num_classes, head=head)
        self.apply(_init_weights)

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours (``layers.remap_spectral_stages``; the wavelet buffers are dropped); our own keys
        pass unchanged."""
        return remap_spectral_stages(state_dict)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d) and not is_meta(m):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    init_linear(m, std=0.02)


_README = "official README (224; token-labeling training)"
_NOTE = ("params: the official svt.py (badripatro/svt@fcbc9b3) with 1000 classes, aux head included; gmacs: "
         "torch's FlopCounterMode on the official model at 224 (fvcore cannot trace pytorch_wavelets), the count "
         "visionzoo.profile gives: convs (the DTCWT's depthwise filters included), linears, attention matmuls. The "
         "README's {paper} G is {gap}% lower and equals SpectFormer-H's figure; stage 2 here is softmax attention "
         "over 28x28 tokens (about {attn} G of matmuls and projections), which that figure cannot hold")
VARIANTS = {
    "svt_test":  Variant(dict(dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                              mlp_ratios=(2, 2, 2, 2), stem_hidden=8), params_m=0.283608, input_size=64,
                         notes="tiny config for tests (low-pass grid 16x16 at 64 px)"),
    "svt_h_s":   Variant(dict(), params_m=22.052592, gmacs=5.132, paper=Paper(22.0, 3.9, 84.2, _README),
                         notes=_NOTE.format(paper=3.9, gap=24, attn=0.84)),
    "svt_h_b":   Variant(dict(dims=(64, 128, 320, 512), depths=(3, 4, 12, 3), num_heads=(2, 4, 10, 16),
                              stem_hidden=64), params_m=32.878544, gmacs=7.677,
                         paper=Paper(32.8, 6.3, 85.2, _README), notes=_NOTE.format(paper=6.3, gap=18, attn=0.84)),
    "svt_h_l":   Variant(dict(dims=(96, 192, 384, 512), depths=(3, 6, 18, 3), num_heads=(3, 6, 12, 16),
                              stem_hidden=64), params_m=54.594000, gmacs=15.748,
                         paper=Paper(54.0, 12.7, 85.7, _README), notes=_NOTE.format(paper=12.7, gap=19, attn=2.1)),
}
register_family(SVT, VARIANTS, paper="arXiv:2311.01310", kind="vit",
                code="badripatro/svt@fcbc9b325f5d54f0a2e0fef8f35533240faa03c9 svt.py")
