"""Self-supervised pretraining on the training images alone: MAE, SparK, RotNet and SiT, through the contract.

"Never Train from Scratch" (Amos et al., ICLR 2024, https://arxiv.org/abs/2310.02980) pretrains the same model on
the same (unlabelled) training inputs before fine-tuning; these are the pretext objectives ``visionzoo pretrain``
offers for that. Each is a ``PretextModel`` wrapping a backbone: ``forward(images) -> (loss, logits, targets)``.
``pretrain`` runs it with the training loop of ``visionzoo.train.loop`` (DDP under ``torchrun``, exact resume,
``latest.pt`` every epoch) and writes ``backbone.safetensors``, which ``visionzoo train --init`` fine-tunes.

* **MAE** (He et al., CVPR 2022, https://arxiv.org/abs/2111.06377; facebookresearch/mae ``models_mae.py``): random
  masking of ``mask_ratio=0.75`` of the patches (``len_keep = int(N (1 - ratio))``), the encoder on the prefix
  tokens and the visible patch tokens only, a light transformer decoder (mask tokens, fixed 2-D sin-cos positions),
  MSE on the masked patches against per-patch normalised pixels (``norm_pix_loss``, eps 1e-6). Plain token models
  only (every stage a ``layers.TokenBlock``, ``num_prefix_tokens`` set): their blocks run on any token subset.
  Differs: the encoder's final norm is not applied (it is not a contract seam); it is trained in fine-tuning.
* **SparK** (Tian et al., ICLR 2023, https://arxiv.org/abs/2301.03580; keyu-tian/SparK ``pretrain/``): a random
  mask of ``mask_ratio=0.6`` of the cells of the coarsest feature grid (``len_keep = round(n (1 - ratio))``), the
  image zeroed there; the encoder runs "sparse", simulated densely: every ``nn.Conv2d`` output and every stage
  output is re-masked at its resolution, and BatchNorm statistics come from visible positions only (the model's
  BatchNorm2d modules take a visible-only forward while pretraining; their keys do not change). The features of
  each distinct stride (``forward_intermediates``) are densified (channel LayerNorm, a learnable mask token per
  scale at masked positions, a conv to the decoder width) and a light UNet decoder (transposed conv x2 up, conv-BN-
  ReLU6) reconstructs the image; the loss is the per-patch-normalised L2 on masked cells. Every family that is not
  a plain token model (ConvNets, hierarchical and hybrid models).
* **RotNet** (Gidaris et al., ICLR 2018, https://arxiv.org/abs/1803.07728): the four rotations 0/90/180/270 of
  every image in one batch, 4-way cross-entropy on the backbone's pooled features (its head up to ``pre_logits``)
  through a new linear layer. Every family.
* **SiT** (Atito et al., 2021, https://arxiv.org/abs/2104.03602; Sara-Ahmed/SiT): two views of each image, each
  rotated by a random multiple of 90 degrees and corrupted by zeroing patch-aligned groups covering
  ``drop_perc=0.5`` of the image (GMML); losses: rotation cross-entropy, NT-Xent contrastive between the views'
  projections (temperature 0.2), and L1 reconstruction of the clean (rotated) image from the patch tokens on the
  corrupted pixels, weighted ``lmbda=1``. Differs: no EMA teacher and no ``drop_replace`` (patches from other
  images), as in the 2021 paper's version. Plain token models only.

A method that does not apply to a model raises ``ArgumentError`` naming the one that does.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.errors import ArgumentError
from visionzoo.layers import Attention, Mlp, TokenBlock
from visionzoo.train.augment import Normalize
from visionzoo.train.loop import FitResult, TrainConfig, _Trainer, fit
from visionzoo.train.metrics import EvalMetrics, plot_history, write_csv

__all__ = ["METHODS", "MAE", "PretextModel", "RotNet", "SiT", "SparK", "build_pretext", "check_method",
           "is_plain_token_model", "patchify", "pretrain", "random_masking"]

METHODS = ("mae", "spark", "rotnet", "sit")


# --- applicability ---------------------------------------------------------------------------------------------
def is_plain_token_model(model: nn.Module) -> bool:
    """Every stage is a ``layers.TokenBlock`` over one token sequence and the model says ``num_prefix_tokens``."""
    stages = model.stage_modules() if hasattr(model, "stage_modules") else []
    return bool(stages) and all(isinstance(s, TokenBlock) for s in stages) and hasattr(model, "num_prefix_tokens")


def check_method(model: nn.Module, method: str) -> None:
    """Raise ``ArgumentError`` naming the alternative when ``method`` does not apply to ``model``."""
    if method not in METHODS:
        raise ArgumentError(f"method must be one of {METHODS}, got {method!r}")
    name = getattr(model, "name", type(model).__name__)
    if getattr(model, "output", "logits") != "logits":
        raise ArgumentError(f"{name} is an image-to-image model (output={model.output!r}); pretraining here builds "
                            f"classification backbones: train it on its own task instead")
    plain = is_plain_token_model(model)
    if method in ("mae", "sit") and not plain:
        raise ArgumentError(
            f"{name}: --method {method} needs a plain token model (every block a layers.TokenBlock over one token "
            f"sequence, as ViT/DeiT), so that its encoder can run on the visible tokens; {name} is a "
            f"{getattr(model, 'kind', 'model')} with stages at strides {[f.reduction for f in model.stage_info]}. "
            f"Use --method spark (sparse masked modelling for ConvNets and hierarchical models) or --method rotnet")
    if method == "spark" and plain:
        raise ArgumentError(f"{name}: --method spark is masked modelling for ConvNets and hierarchical models "
                            f"(a sparse conv encoder over a feature pyramid); {name} is a plain ViT: use --method "
                            f"mae (or sit, rotnet)")


# --- shared helpers --------------------------------------------------------------------------------------------
def patchify(x: Tensor, p: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H/p * W/p, p * p * C)``, patches in row-major order."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: Tensor, p: int, C: int, h: int, w: int) -> Tensor:
    """Inverse of ``patchify``: ``(B, h * w, p * p * C)`` -> ``(B, C, h p, w p)``."""
    B = x.shape[0]
    return x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, w * p)


def random_masking(batch: int, n: int, ratio: float, rounding: str = "floor", device: Any = None
                   ) -> tuple[Tensor, Tensor]:
    """Per image, exactly ``n - keep`` of ``n`` positions masked (``keep = int(n (1 - ratio))`` for ``floor``, MAE;
    ``round(...)`` for ``round``, SparK; at least 1). Returns ``mask (B, n)`` bool (True = masked) and the kept
    indices ``(B, keep)`` in ascending order."""
    if not 0 < ratio < 1:
        raise ArgumentError(f"mask_ratio must be in (0, 1), got {ratio}")
    keep = int(n * (1 - ratio)) if rounding == "floor" else round(n * (1 - ratio))
    keep = max(1, min(n - 1, keep)) if n > 1 else 1
    noise = torch.rand(batch, n, device=device)
    ids_keep = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_keep, False)
    return mask, ids_keep


def _norm_pix(t: Tensor) -> Tensor:
    """Per-patch normalisation of targets ``(..., D)`` (MAE's ``norm_pix_loss``: unbiased variance, eps 1e-6)."""
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()


def _rotate_each(x: Tensor, k: Tensor) -> Tensor:
    """Image ``i`` rotated by ``k[i] * 90`` degrees (square images)."""
    out = x.clone()
    for r in range(1, 4):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(x[sel], r, (2, 3))
    return out


def sincos_pos_embed(dim: int, h: int, w: int, device: Any = None) -> Tensor:
    """Fixed 2-D sin-cos positions ``(h * w, dim)`` (MAE's decoder table), half the channels per axis."""
    if dim % 4:
        raise ArgumentError(f"sin-cos positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32, device=device) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                            torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    out = [f(pos.reshape(-1, 1) * omega) for pos in (xs, ys) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)


class _DecoderBlock(nn.Module):
    """Pre-norm transformer block for MAE's decoder."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, qkv_bias=True)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --- the pretext models ----------------------------------------------------------------------------------------
class PretextModel(nn.Module):
    """A backbone plus a pretext objective: ``forward(x) -> (loss, logits or None, targets or None)``.

    The backbone's classifier is removed (``reset_classifier(0)``), so every parameter the objective does not use
    is one ``--init`` would not load anyway. Reads the contract attributes the training loop needs from the
    backbone.
    """

    is_pretext = True
    method = ""
    find_unused_parameters = False

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        check_method(backbone, self.method)
        backbone.reset_classifier(0)
        self.backbone = backbone

    # the training loop reads these from its model
    @property
    def data_config(self) -> dict[str, Any]:
        return getattr(self.backbone, "data_config", None) or {}

    @property
    def variant(self) -> Any:
        return getattr(self.backbone, "variant", None)

    @property
    def name(self) -> str:
        return f"{self.backbone.name}+{self.method}"

    @property
    def in_chans(self) -> int:
        return self.backbone.in_chans

    @property
    def num_classes(self) -> int:
        return 0

    @property
    def min_input_size(self) -> int:
        return self.backbone.min_input_size

    @property
    def input_multiple(self) -> int:
        return self.backbone.input_multiple

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        own = {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in ("mask_token", "mask_tokens")}
        return own | {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def options(self) -> dict[str, Any]:
        return {}


class RotNet(PretextModel):
    """4-way rotation prediction on the backbone's pooled features (every family)."""

    method = "rotnet"

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.rot_head = nn.Linear(backbone.head_hidden_size, 4)

    @staticmethod
    def rotations(x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, S, S)`` -> its 4 rotations ``(4B, C, S, S)`` (all at 0 deg, then 90, ...), labels ``(4B,)``."""
        if x.shape[-1] != x.shape[-2]:
            raise ArgumentError(f"rotnet rotates square images; got {tuple(x.shape[-2:])}")
        xs = torch.cat([torch.rot90(x, k, (2, 3)) for k in range(4)])
        return xs, torch.arange(4, device=x.device).repeat_interleave(x.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        xs, y = self.rotations(x)
        logits = self.rot_head(self.backbone.forward_head(self.backbone.forward_features(xs), pre_logits=True))
        return F.cross_entropy(logits.float(), y), logits, y


class MAE(PretextModel):
    """Masked autoencoder for plain token models: encoder on the visible tokens, light decoder, masked-patch MSE."""

    method = "mae"
    find_unused_parameters = True  # the final norm (and a pooled head's norm) sit outside the encoder path

    def __init__(self, backbone: nn.Module, mask_ratio: float = 0.75, decoder_dim: int = 128, decoder_depth: int = 2,
                 decoder_heads: int = 4, norm_pix_loss: bool = True) -> None:
        super().__init__(backbone)
        if not 0 < mask_ratio < 1:
            raise ArgumentError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch = backbone.stage_info[-1].reduction
        dim = backbone.stage_info[-1].channels
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder_blocks = nn.Sequential(*[_DecoderBlock(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch ** 2 * backbone.in_chans)

    def options(self) -> dict[str, Any]:
        return dict(mask_ratio=self.mask_ratio)

    def encode(self, x: Tensor, ids_keep: Tensor) -> Tensor:
        """Prefix tokens and the kept patch tokens ``(B, P + keep, D)`` through every block."""
        bb = self.backbone
        bb.check_input(x)
        tokens = bb.forward_stem(x)  # (B, P + N, D), positions added
        P = bb.num_prefix_tokens
        vis = torch.gather(tokens[:, P:], 1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
        h = torch.cat([tokens[:, :P], vis], dim=1)
        for block in bb.stage_modules():
            h = bb.run_stage(block, h)
        return h

    def forward(self, x: Tensor) -> tuple[Tensor, None, None]:
        B, C, H, W = x.shape
        p, P = self.patch, self.backbone.num_prefix_tokens
        gh, gw = H // p, W // p
        mask, ids_keep = random_masking(B, gh * gw, self.mask_ratio, "floor", x.device)
        h = self.decoder_embed(self.encode(x, ids_keep))
        full = self.mask_token.to(h.dtype).expand(B, gh * gw, -1)
        full = full.scatter(1, ids_keep[..., None].expand(-1, -1, h.shape[-1]), h[:, P:])
        z = full + sincos_pos_embed(h.shape[-1], gh, gw, x.device).to(h.dtype)
        z = torch.cat([h[:, :P], z], dim=1)
        pred = self.decoder_pred(self.decoder_norm(self.decoder_blocks(z)))[:, P:].float()
        target = patchify(x.float(), p)
        if self.norm_pix_loss:
            target = _norm_pix(target)
        per_patch = (pred - target).pow(2).mean(-1)
        m = mask.float()
        return (per_patch * m).sum() / m.sum(), None, None


class _SparseBatchNorm2d(nn.BatchNorm2d):
    """A ``BatchNorm2d`` whose training statistics come from visible positions only (SparK's ``SparseBatchNorm2d``);
    set on a model's own BatchNorm2d modules by swapping their class (same parameters and keys)."""

    spark: SparK | None = None

    def forward(self, x: Tensor) -> Tensor:
        ctx = self.spark
        if ctx is None or ctx.visible is None or not self.training:
            return super().forward(x) if ctx is None or ctx.visible is None else super().forward(x) * ctx.vis_at(x)
        vis = ctx.vis_at(x)[:, 0].bool()  # (B, H, W)
        flat = x.permute(0, 2, 3, 1)[vis]  # (n_visible, C)
        if flat.shape[0] < 2:
            return x * 0
        mom = 0.0 if self.momentum is None else self.momentum
        y = F.batch_norm(flat, self.running_mean, self.running_var, self.weight, self.bias, True, mom, self.eps)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        out = torch.zeros(x.shape[0], x.shape[2], x.shape[3], x.shape[1], dtype=y.dtype, device=x.device)
        out[vis] = y
        return out.permute(0, 3, 1, 2)


def _remask_conv(module: nn.Module, args: Any, y: Any) -> Any:
    ctx = module.__dict__.get("spark")
    return None if ctx is None else ctx.remask_conv(y)


def _remask_stage(module: nn.Module, args: Any, y: Any) -> Any:
    ctx = module.__dict__.get("spark")
    return None if ctx is None else ctx.remask_stage(y)


class SparK(PretextModel):
    """Sparse masked modelling for ConvNets and hierarchical models (see the module docstring)."""

    method = "spark"

    def __init__(self, backbone: nn.Module, mask_ratio: float = 0.6, mask_stride: int | None = None,
                 decoder_width: int | None = None, norm_pix_loss: bool = True) -> None:
        super().__init__(backbone)
        if not 0 < mask_ratio < 1:
            raise ArgumentError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        infos = list(backbone.stage_info)
        last_of: dict[int, int] = {f.reduction: i for i, f in enumerate(infos)}
        self.levels = sorted(last_of)  # distinct strides, finest first
        self.indices = [last_of[s] for s in self.levels]
        for s in self.levels:
            if s & (s - 1):
                raise ArgumentError(f"spark: feature strides must be powers of two, got {self.levels}")
        top = self.levels[-1]
        self.mask_stride = int(mask_stride or top)
        if self.mask_stride < 1 or self.mask_stride & (self.mask_stride - 1):
            raise ArgumentError(f"mask_stride must be a power of two, got {mask_stride}")
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        width = decoder_width or max(32, infos[self.indices[-1]].channels)

        def w(s: int) -> int:
            return max(16, width * s // top)

        chans = [infos[i].channels for i in self.indices]
        self.dens_norm = nn.ModuleList(nn.LayerNorm(c) for c in chans)
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in chans)
        for t in self.mask_tokens:
            nn.init.trunc_normal_(t, std=0.02)
        self.dens_proj = nn.ModuleList(nn.Conv2d(c, w(s), 3, padding=1) for c, s in zip(chans, self.levels))
        ups, s = [], top
        while s > 1:  # one x2 block per octave down to the input resolution
            ups.append(nn.Sequential(nn.ConvTranspose2d(w(s), w(s // 2), 4, 2, 1),
                                     nn.Conv2d(w(s // 2), w(s // 2), 3, padding=1, bias=False),
                                     nn.BatchNorm2d(w(s // 2)), nn.ReLU6(inplace=True)))
            s //= 2
        self.up = nn.ModuleList(ups)
        self.proj = nn.Conv2d(w(1), backbone.in_chans, 1)
        self.visible: Tensor | None = None  # (B, 1, gh, gw) float, 1 = visible, while the encoder runs
        self._img: tuple[int, int] = (0, 0)
        self._handles: list[Any] = []
        self._sparsify(backbone)
        self._check_sparse()

    @torch.no_grad()
    def _check_sparse(self) -> None:
        """Refuse a backbone whose features leak into masked cells: one probe at its input size with a random mask
        (attention or global mixing between the re-masked layers spreads visible content, and SparK's encoder is
        then not sparse)."""
        bb = self.backbone
        c, h, w = getattr(bb, "data_config", {}).get("input_size", (bb.in_chans, 64, 64))
        step = math.lcm(self.mask_stride, getattr(bb, "input_multiple", 1))
        h, w = -(-h // step) * step, -(-w // step) * step
        ref = next(bb.parameters())
        g = torch.Generator().manual_seed(0)
        vis = (torch.rand(1, 1, h // self.mask_stride, w // self.mask_stride, generator=g) > 0.5).float()
        vis[..., 0, 0], vis[..., -1, -1] = 1.0, 0.0
        was = bb.training
        bb.eval()
        try:
            feats = self.encode(torch.randn(1, c, h, w, generator=g).to(ref), vis.to(ref))
            self.visible = vis.to(ref)
            leaks = [f.shape[-1] for f in feats if ((self.vis_at(f) == 0).expand_as(f) & (f != 0)).any()]
        finally:
            self.visible = None
            bb.train(was)
        if leaks:
            name = getattr(bb, "name", type(bb).__name__)
            raise ArgumentError(f"{name}: --method spark needs features that stay zero at masked cells, but its "
                                f"maps of width {leaks} carry visible content into them (attention or global mixing "
                                f"between its conv layers); use --method rotnet"
                                + (" or mae" if is_plain_token_model(bb) else ""))

    def options(self) -> dict[str, Any]:
        return dict(mask_ratio=self.mask_ratio, mask_stride=self.mask_stride)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:  # recomputed stages would run after the mask is gone, unmasked
            raise ArgumentError("spark re-masks every layer while the encoder runs; drop --grad-checkpointing")

    # --- the sparse encoder --------------------------------------------------------------------------------
    def _sparsify(self, backbone: nn.Module) -> None:
        # the context is a plain attribute (not a submodule: no cycle in modules()/state_dict); a deepcopy (EMA)
        # of the pretext model then points its copies at the copied context
        for m in backbone.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = _SparseBatchNorm2d
                object.__setattr__(m, "spark", self)
            if isinstance(m, nn.Conv2d):
                object.__setattr__(m, "spark", self)
                self._handles.append(m.register_forward_hook(_remask_conv))
        for st in backbone.stage_modules():
            object.__setattr__(st, "spark", self)
            self._handles.append(st.register_forward_hook(_remask_stage))

    def densify_off(self) -> None:
        """Make the backbone dense again (hooks removed, BatchNorms restored); the pretext model is then spent."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self.backbone.modules():
            if type(m) is _SparseBatchNorm2d:
                m.__class__ = nn.BatchNorm2d
            m.__dict__.pop("spark", None)

    def vis_at(self, y: Tensor, h: int | None = None, w: int | None = None) -> Tensor:
        """The visibility ``(B, 1, h, w)`` at a map's resolution (nearest up, any-visible down)."""
        v = self.visible
        h, w = (y.shape[-2], y.shape[-1]) if h is None else (h, w)
        gh, gw = v.shape[-2:]
        if (h, w) == (gh, gw):
            out = v
        elif h % gh == 0 and w % gw == 0:
            out = v.repeat_interleave(h // gh, 2).repeat_interleave(w // gw, 3)
        elif gh % h == 0 and gw % w == 0:
            out = F.max_pool2d(v, (gh // h, gw // w))
        else:
            out = F.interpolate(v, size=(h, w), mode="nearest")
        return out.to(y.dtype)

    def _grid_ok(self, y: Tensor, h: int, w: int) -> bool:
        H, W = self._img
        return y.shape[0] == self.visible.shape[0] and h > 0 and w > 0 and H % h == 0 and W % w == 0 \
            and H // h == W // w

    def remask_conv(self, y: Any) -> Any:
        """A conv's NCHW output with masked positions zeroed; a conv run on windows (batch x windows) is left to its
        stage's output."""
        if self.visible is None or not isinstance(y, Tensor) or y.ndim != 4 or not self._grid_ok(y, *y.shape[2:]):
            return None
        return y * self.vis_at(y)

    def remask_stage(self, y: Any) -> Any:
        """A stage's output (NCHW, NHWC, ``(B, h w, C)`` tokens or ``(map, class token)``; the layout read through the
        contract's ``stage_to_nchw``) with masked positions zeroed."""
        if self.visible is None:
            return None
        z = self.backbone.stage_to_nchw(y)
        if isinstance(y, tuple) and y and z is y[0]:  # (map, class token): mask the map
            fmap = self.remask_conv(z)
            return None if fmap is None else (fmap, *y[1:])
        if not isinstance(y, Tensor) or not isinstance(z, Tensor) or z.ndim != 4 or not self._grid_ok(z, *z.shape[2:]):
            return None
        v = self.vis_at(z)
        if z is y:
            return y * v
        if y.ndim == 4 and y.shape == z.permute(0, 2, 3, 1).shape:
            return y * v.permute(0, 2, 3, 1)  # NHWC
        if y.ndim == 3 and y.shape[1] == z.shape[2] * z.shape[3]:
            return y * v.flatten(2).transpose(1, 2)  # (B, h w, C) tokens
        return None

    def encode(self, x: Tensor, visible: Tensor) -> list[Tensor]:
        """The sparse encoder's NCHW features at each distinct stride, masked image in, ``visible (B, 1, gh, gw)``."""
        self.visible, self._img = visible, (x.shape[-2], x.shape[-1])
        try:
            return self.backbone.forward_intermediates(x * self.vis_at(x), self.indices)
        finally:
            self.visible = None

    def forward(self, x: Tensor) -> tuple[Tensor, None, None]:
        B, C, H, W = x.shape
        ms = self.mask_stride
        if H % ms or W % ms:
            raise ArgumentError(f"spark: the input {H}x{W} must be a multiple of mask_stride={ms}")
        gh, gw = H // ms, W // ms
        mask, _ = random_masking(B, gh * gw, self.mask_ratio, "round", x.device)
        visible = (~mask).to(x.dtype).view(B, 1, gh, gw)
        feats = self.encode(x, visible)
        self.visible = visible
        try:
            s_top = self.levels[-1]
            dens = {}
            for i, (f, s) in enumerate(zip(feats, self.levels)):
                v = self.vis_at(f).bool()
                f = self.dens_norm[i](f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over channels
                f = torch.where(v, f, self.mask_tokens[i].to(f.dtype))
                dens[s] = self.dens_proj[i](f)
        finally:
            self.visible = None
        s = s_top
        y = dens[s]
        for up in self.up:
            y = up(y)
            s //= 2
            if s in dens:
                y = y + dens[s]
        pred = self.proj(y).float()
        target = patchify(x.float(), ms)
        if self.norm_pix_loss:
            target = _norm_pix(target)
        per_cell = (patchify(pred, ms) - target).pow(2).mean(-1)
        m = mask.float()
        return (per_cell * m).sum() / m.sum(), None, None


class SiT(PretextModel):
    """Rotation + contrastive + reconstruction on corrupted views (plain token models)."""

    method = "sit"

    def __init__(self, backbone: nn.Module, drop_perc: float = 0.5, lmbda: float = 1.0, temperature: float = 0.2,
                 proj_dim: int = 128) -> None:
        super().__init__(backbone)
        if not 0 < drop_perc < 1:
            raise ArgumentError(f"drop_perc must be in (0, 1), got {drop_perc}")
        self.drop_perc, self.lmbda, self.temperature = drop_perc, lmbda, temperature
        self.patch = backbone.stage_info[-1].reduction
        hid, dim = backbone.head_hidden_size, backbone.stage_info[-1].channels
        self.rot_head = nn.Linear(hid, 4)
        self.proj = nn.Sequential(nn.Linear(hid, hid), nn.GELU(), nn.Linear(hid, proj_dim))
        self.recon = nn.Linear(dim, self.patch ** 2 * backbone.in_chans)

    def options(self) -> dict[str, Any]:
        return dict(drop_perc=self.drop_perc, lmbda=self.lmbda)

    def group_mask(self, batch: int, gh: int, gw: int, device: Any = None) -> Tensor:
        """GMML corruption: per image, random patch-aligned rectangles until ``drop_perc`` of the patches are
        covered. ``(B, gh, gw)`` bool, True = corrupted."""
        target = max(1, round(self.drop_perc * gh * gw))
        out = torch.zeros(batch, gh, gw, dtype=torch.bool, device=device)
        for b in range(batch):
            while int(out[b].sum()) < target:
                r = torch.randint(0, 4, (4,)).tolist()
                h, w = 1 + r[0] % max(1, gh // 2), 1 + r[1] % max(1, gw // 2)
                y0 = int(torch.randint(0, gh - h + 1, ()))
                x0 = int(torch.randint(0, gw - w + 1, ()))
                out[b, y0:y0 + h, x0:x0 + w] = True
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, C, H, W = x.shape
        if H != W:
            raise ArgumentError(f"sit rotates square images; got {H}x{W}")
        p, P = self.patch, self.backbone.num_prefix_tokens
        gh, gw = H // p, W // p
        k = torch.randint(0, 4, (2 * B,), device=x.device)
        clean = _rotate_each(torch.cat([x, x]), k)
        m = self.group_mask(2 * B, gh, gw, x.device)
        pix = m.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None].to(x.dtype)  # (2B, 1, H, W)
        tokens = self.backbone.forward_features(clean * (1 - pix))
        pooled = self.backbone.forward_head(tokens, pre_logits=True)
        logits = self.rot_head(pooled)
        rot = F.cross_entropy(logits.float(), k)
        z = F.normalize(self.proj(pooled).float(), dim=-1)
        sim = z @ z.t() / self.temperature
        sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=x.device), float("-inf"))
        pair = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(x.device)
        con = F.cross_entropy(sim, pair)
        rec = unpatchify(self.recon(tokens[:, P:]).float(), p, C, gh, gw)
        rec_loss = ((rec - clean.float()).abs() * pix).sum() / (pix.sum() * C).clamp_min(1)
        return rot + con + self.lmbda * rec_loss, logits, k


PRETEXTS: dict[str, type[PretextModel]] = {"mae": MAE, "spark": SparK, "rotnet": RotNet, "sit": SiT}


def build_pretext(backbone: nn.Module, method: str, **options: Any) -> PretextModel:
    """The pretext model of ``method`` around ``backbone`` (options: ``mask_ratio``; ``mask_stride``, SparK)."""
    check_method(backbone, method)
    cls = PRETEXTS[method]
    import inspect

    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "backbone"}
    bad = {k for k, v in options.items() if v is not None and k not in allowed}
    if bad:
        raise ArgumentError(f"--method {method} takes the options {sorted(allowed)}, got {sorted(bad)}")
    return cls(backbone, **{k: v for k, v in options.items() if v is not None})


# --- the loop ---------------------------------------------------------------------------------------------------
class PretrainTrainer(_Trainer):
    """``_Trainer`` with a pretext objective: the model's own loss, pretext accuracy (rotations) where there is
    one, validation loss on fixed masks, and ``backbone.safetensors`` at the end."""

    def _forward_backward(self, x: Tensor, t: Tensor, scale: float) -> tuple[Tensor, Tensor | None]:
        from visionzoo.train.loop import AMP

        dtype = AMP[self.cfg.amp]
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, logits, target = self.model(x)
        (self.scaler.scale(loss * scale) if self.scaler else loss * scale).backward()
        self._last = (logits, target)
        return loss.detach(), None

    def _account(self, sums: Tensor, loss: Tensor, n: int) -> None:
        logits, target = self._last
        hits = float((logits.argmax(-1) == target).sum()) if logits is not None else 0.0
        sums += torch.tensor([float(loss) * n, hits, 0 if target is None else target.numel(), n],
                             dtype=torch.float64, device=sums.device)

    def _result(self, sums: Tensor) -> tuple[float, float]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        loss, hits, count, n = sums.tolist()
        return loss / max(n, 1), (100 * hits / count if count else float("nan"))

    def train_epoch(self, progress: Any) -> tuple[float, float]:
        self.model.train()
        self.train_loader.sampler.set_epoch(self.epoch)
        self.train_loader.generator.manual_seed(self.cfg.seed + self.epoch)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        n, accum = len(self.train_loader), self.cfg.accum_steps
        from contextlib import nullcontext

        for i, (x, y) in enumerate(self.train_loader):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device)
            x, t = self.augment(x, y)
            last = (i + 1) % accum == 0 or i + 1 == n
            with self.model.no_sync() if self.d.enabled and not last else nullcontext():
                loss, _ = self._forward_backward(x, t, 1.0 / accum)
            if last:
                self._step(x, t)
            self._account(sums, loss, x.shape[0])
        loss, acc = self._result(sums)
        if not math.isfinite(loss):
            from visionzoo.errors import TrainingDivergedError

            raise TrainingDivergedError(f"the pretext loss is {loss} in epoch {self.epoch + 1}; lower --lr or use "
                                        f"--clip-grad")
        return loss, acc

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> EvalMetrics:
        """Mean pretext loss (and rotation accuracy) on the validation images, with masks drawn from a fixed seed
        (the same each epoch; the training RNG is left as it was)."""
        model = getattr(model, "module", model)
        if self.d.enabled:  # every rank evaluates with rank 0's BatchNorm statistics
            for b in model.buffers():
                torch.distributed.broadcast(b, 0)
        was = model.training
        model.eval()
        norm = Normalize(self.mean, self.std).to(self.device)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 1000 * (self.d.rank + 1))
            try:
                for x, _ in self.val_loader:
                    x = norm(x.to(self.device))
                    loss, logits, target = model(x)
                    self._last = (logits, target)
                    self._account(sums, loss, x.shape[0])
            finally:
                model.train(was)
        loss, acc = self._result(sums)
        return EvalMetrics(acc, float("nan"), loss, int(sums[3]), torch.zeros(0, 0, dtype=torch.int64))

    def finish(self, out: Path) -> dict[str, str]:
        from visionzoo.weights import save

        files = {"metrics": str(out / "metrics.csv"), "checkpoint": str(out / "latest.pt")}
        write_csv(self.history, out / "metrics.csv")
        files["curves"] = str(plot_history({self.base.name: self.history}, out / "curves.png", title=self.base.name))
        bb = self.base.backbone
        if getattr(bb, "variant", None) is not None:
            import json

            meta = {"pretext": self.base.method, "pretext_options": json.dumps(self.base.options()),
                    "input_size": str(self.img_size)}
            files["backbone"] = str(save(bb, out / "backbone.safetensors", extra=meta))
        return files


def pretrain(backbone: nn.Module, splits: Any, method: str, cfg: TrainConfig | None = None,
             out_dir: str | Path | None = None, *, resume: str | Path | None = None, dist_info: Any = None,
             log: Any = print, **options: Any) -> FitResult:
    """Self-supervised pretraining of ``backbone`` on the images of ``splits`` (labels unused) with ``method``.

    Writes what ``fit`` writes, with ``backbone.safetensors`` (the backbone without classifier) in place of
    ``model.safetensors``; ``visionzoo train --init OUT/backbone.safetensors`` fine-tunes it. ``options`` go to the
    pretext model (``mask_ratio``; ``mask_stride`` for SparK). ``cfg.aug`` must not mix images (mixup/cutmix).
    """
    cfg = cfg or TrainConfig()
    if cfg.aug.mixup or cfg.aug.cutmix:
        raise ArgumentError("pretraining does not use labels: mixup/cutmix would only blend the images; set "
                            "--mixup 0 --cutmix 0")
    model = build_pretext(backbone, method, **options)
    return fit(model, splits, cfg, out_dir, resume=resume, dist_info=dist_info, log=log,
               trainer_cls=PretrainTrainer)
