"""SN-Net v2, from "Stitched ViTs are Flexible Vision Backbones" (Pan, Liu, He, Cai, Zhuang, ECCV 2024).
https://arxiv.org/abs/2307.00154 (v1: "Stitchable Neural Networks", CVPR 2023, https://arxiv.org/abs/2302.06586)

Two registered plain ViTs (anchors, built with ``visionzoo.registry.create_model``; a narrow/shallow one first)
joined by stitching layers (a Linear, optionally with a LoRA update of rank ``lora_r``) that map the tokens leaving a
block of one anchor into the input space of the next block of the other. One set of weights gives many networks:
each stitch configuration is a route through the anchors, chosen by ``stitch`` (constructor) or ``set_stitch``.
Configurations, in the official order: anchor 0, anchor 1, then small->large (SL), large->small (LS), LSL and SLS
routes (two-way stitching, the v2 change). ``stitch_ids`` are those the official code samples in training (it leaves
out the SL stitch after the small anchor's last block); ``sample_stitch()`` draws one of them uniformly (the
official training samples a FLOPs bucket first from a table it measures; not reproduced). Every configuration runs.

Token reduction (``visionzoo.tokens``) applies to the anchor routes (stitch 0 and 1) only: the token seam keeps one
token state per block list (per anchor), and a stitched route moves from one list into the middle of the other.

The route's blocks are the model's stages, so ``feature_info`` and ``num_features`` follow ``set_stitch`` (widths
change from anchor to anchor); the head holds one classifier per anchor (``head.fc_small`` for anchor 0,
``head.fc`` for anchor 1) and the route's last anchor picks it. Stitching layers initialise from features by least
squares in the official code (``ps_inv``); here ``init_stitching(x)`` does the same from a batch.

Follows ziplab/SN-Netv2 (Apache-2.0) ``classification/snnet.py``. Its DeiT III anchors keep the position table
without a class-token row and use layer scale; ``remap`` turns such checkpoints into ours exactly (a zero class row;
layer scales folded into ``attn.proj`` and ``mlp.fc2``), so SN-Netv2's released S-B weights load into
``snnet_deit_small_base``.
"""
from __future__ import annotations

import math
import random

import torch
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo, resolve_indices
from visionzoo.layers import ClassifierHead, init_linear
from visionzoo.registry import Paper, Variant, create_model, register_family

__all__ = ["SNNet", "stitch_configs"]


def stitch_configs(depths: tuple[int, int]) -> list[dict]:
    """Every stitch configuration of two anchors of ``depths`` (shallow first), in the official order. Each is
    ``{"comb": anchors in route order, "route": [(begin, end) blocks, end inclusive] per anchor, "layers": stitching
    layer after each segment (-1 = none)}``."""
    d0, d1 = depths
    r = d1 // d0
    home = [(i * d0) // d1 for i in range(d1)]  # nearest resize of the small anchor's block ids to d1
    sl = [dict(comb=(0, 1), cfg=[(i, (i + 1) * r)], layers=[i]) for i in range(d0)]
    ls = [dict(comb=(1, 0), cfg=[(i, home[i] + 1)], layers=[i // r]) for i in range(d1 - 1)
          if d1 == d0 or i % 2 == 1]
    lsl = [dict(comb=(1, 0, 1), cfg=[a["cfg"][0], b["cfg"][0]], layers=a["layers"] + b["layers"])
           for a in ls for b in sl if b["layers"][0] != d0 - 1 and b["cfg"][0][0] >= a["cfg"][0][1]]
    sls = [dict(comb=(0, 1, 0), cfg=[a["cfg"][0], b["cfg"][0]], layers=a["layers"] + b["layers"])
           for a in sl for b in ls if b["cfg"][0][0] >= a["cfg"][0][1]]
    out = [dict(comb=(0,), route=[(0, d0 - 1)], layers=[-1]), dict(comb=(1,), route=[(0, d1 - 1)], layers=[-1])]
    for c in sl + ls + lsl + sls:
        cuts = c["cfg"]
        starts = [0] + [end for _, end in cuts]
        ends = [front for front, _ in cuts] + [depths[c["comb"][-1]] - 1]
        out.append(dict(comb=c["comb"], route=list(zip(starts, ends)), layers=c["layers"] + [-1]))
    return out


class StitchingLayer(nn.Module):
    """A Linear from one anchor's width to the other's, plus an optional low-rank (LoRA) update."""

    def __init__(self, in_dim: int, out_dim: int, lora_r: int = 0) -> None:
        super().__init__()
        self.transform = nn.Linear(in_dim, out_dim)
        self.lora_r = lora_r
        if lora_r > 0:
            self.transform.lora_A = nn.Parameter(torch.zeros(lora_r, in_dim))
            self.transform.lora_B = nn.Parameter(torch.zeros(out_dim, lora_r))
            if not self.transform.weight.is_meta:
                nn.init.kaiming_uniform_(self.transform.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        y = self.transform(x)
        if self.lora_r > 0:  # (x A^T) B^T / r: the update, LoRA alpha = 1 as in the official code
            y = y + (x @ self.transform.lora_A.t() @ self.transform.lora_B.t()) / self.lora_r
        return y

    def fuse(self) -> None:
        """Fold the low-rank update into the Linear (the official eval-mode merge)."""
        if self.lora_r > 0:
            with torch.no_grad():
                t = self.transform
                t.weight += t.lora_B @ t.lora_A / self.lora_r
                t.lora_B.zero_()


class SNNetHead(ClassifierHead):
    """One classifier per anchor on the class token; the route's last anchor (``active``) picks it."""

    fc_names = ("fc_small", "fc")

    def __init__(self, dims: tuple[int, int], num_classes: int, drop_rate: float) -> None:
        super().__init__(dims[1], num_classes, "token", drop_rate, prefix_tokens=1)
        self.dims = dims
        self.fc_small = nn.Linear(dims[0], num_classes) if num_classes > 0 else nn.Identity()
        self.active = 1

    def set_active(self, anchor: int) -> None:
        self.active = anchor
        self.in_features = self.hidden_size = self.dims[anchor]

    def reset(self, num_classes: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        for name, dim in zip(self.fc_names, self.dims):
            fc = nn.Linear(dim, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()
            init_linear(fc)
            setattr(self, name, fc.train(self.training))

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.forward_pre_logits(x)
        if pre_logits:
            return x
        return self.fc_small(x) if self.active == 0 else self.fc(x)


class SNNet(Backbone):
    """Two anchor ViTs and the stitching layers between them; ``stitch`` picks the route.

    Args:
        anchors: two registered plain-ViT names (class token, ``blocks``, ``norm``), the narrow/shallow one first.
        anchor_args: per anchor, ``(name, value)`` pairs of extra constructor arguments (plain data).
        stitch: the configuration id (``len(model.configs)`` of them; 0 and 1 are the anchors alone).
        lora_r: rank of the stitching layers' LoRA update (0 = a plain Linear; the official S-B config uses 64).
    """

    kind = "vit"
    has_attention = True
    takes_img_size = True
    min_input_size = 16
    input_multiple = 16
    no_weight_decay_keys = ("pos_embed", "cls_token")

    def __init__(self, anchors: tuple[str, str] = ("deit_small_patch16_224", "deit_base_patch16_224"),
                 anchor_args: tuple = ((), ()), stitch: int = 0, lora_r: int = 0, img_size: int = 224, *,
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if len(anchors) != 2 or len(anchor_args) != 2:
            raise ValueError(f"snnet: anchors and anchor_args must name two anchors, got {anchors!r}, {anchor_args!r}")
        self.anchors = nn.ModuleList([
            create_model(name, num_classes=0, in_chans=in_chans, img_size=img_size, drop_path_rate=drop_path_rate,
                         **dict(extra)) for name, extra in zip(anchors, anchor_args)])
        for name, a in zip(anchors, self.anchors):
            if getattr(a, "num_prefix_tokens", None) != 1 or not hasattr(a, "norm"):
                raise ValueError(f"snnet: anchor {name!r} must be a plain ViT with one class token")
        self.in_chans = in_chans
        self.dims = tuple(a.embed_dim for a in self.anchors)
        self.depths = tuple(len(a.stage_modules()) for a in self.anchors)
        if self.depths[0] > self.depths[1] or self.depths[1] % self.depths[0]:
            raise ValueError(f"snnet: the first anchor must be the shallow one and the depths must divide, got "
                             f"depths {self.depths}")
        patch = self.anchors[0].patch_embed.patch_size[0]
        self.min_input_size = self.input_multiple = patch
        self.configs = stitch_configs(self.depths)
        n_sl = self.depths[0]
        n_ls = sum(1 for c in self.configs if c["comb"] == (1, 0))
        self.stitch_layers = nn.ModuleList([
            nn.ModuleList([*[StitchingLayer(self.dims[0], self.dims[1], lora_r) for _ in range(n_sl)], nn.Identity()]),
            nn.ModuleList([*[StitchingLayer(self.dims[1], self.dims[0], lora_r) for _ in range(n_ls)], nn.Identity()]),
        ])
        self.stitch_ids = [i for i, c in enumerate(self.configs)
                           if not (c["comb"] == (0, 1) and c["route"][0][1] == self.depths[0] - 1)]
        self.init_head(self.dims[1], num_classes, head=SNNetHead(self.dims, num_classes, drop_rate))
        for m in self.stitch_layers.modules():
            if isinstance(m, nn.Linear) and not m.weight.is_meta:
                init_linear(m, std=0.02)
        init_linear(self.head.fc_small)
        init_linear(self.head.fc)
        self.set_stitch(stitch)

    @property
    def first_conv(self) -> str:
        """The patch embedding of the route's first anchor."""
        return f"anchors.{self._segments[0][0]}.patch_embed.proj"

    # --- stitches ---------------------------------------------------------------------------------------
    def set_stitch(self, stitch: int) -> None:
        """Run configuration ``stitch`` from now on (``feature_info``, ``num_features`` and the head follow)."""
        if not isinstance(stitch, int) or not 0 <= stitch < len(self.configs):
            raise ValueError(f"snnet: stitch must be an int in 0..{len(self.configs) - 1}, got {stitch!r}")
        self.stitch = stitch
        cfg = self.configs[stitch]
        self._segments = [(a, b, e, lid) for a, (b, e), lid in zip(cfg["comb"], cfg["route"], cfg["layers"])]
        self.num_features = self.dims[cfg["comb"][-1]]
        self.head.set_active(cfg["comb"][-1])
        patch = self.min_input_size
        self.set_feature_info([FeatureInfo(self.dims[a], patch, f"anchors.{a}.blocks.{j}")
                               for a, b, e, _ in self._segments for j in range(b, e + 1)])

    def idle_names(self) -> list[str]:
        """What the current route leaves out: the unused anchor, blocks outside the route, the stems of all but the
        first anchor, the norms of all but the last, the other stitching layers and the other classifier."""
        comb = [a for a, *_ in self._segments]
        idle = [f"anchors.{a}" for a in range(2) if a not in comb]
        for a in set(comb):
            used = {j for s, b, e, _ in self._segments if s == a for j in range(b, e + 1)}
            idle += [f"anchors.{a}.blocks.{j}" for j in range(self.depths[a]) if j not in used]
            if a != comb[0]:
                idle += [f"anchors.{a}.{n}" for n in ("patch_embed", "cls_token", "pos_embed")]
            if a != comb[-1]:
                idle.append(f"anchors.{a}.norm")
        used_layers = {(a, lid) for a, _, _, lid in self._segments if lid >= 0}
        idle += [f"stitch_layers.{g}.{i}" for g, group in enumerate(self.stitch_layers) for i in range(len(group) - 1)
                 if (g, i) not in used_layers]
        idle.append("head.fc" if self.head.active == 0 else "head.fc_small")
        return idle

    def sample_stitch(self) -> int:
        """Set and return a configuration drawn uniformly from ``stitch_ids`` (for training)."""
        self.set_stitch(random.choice(self.stitch_ids))
        return self.stitch

    @torch.no_grad()
    def init_stitching(self, x: Tensor) -> None:
        """Least-squares init of every stitching layer from the anchors' block outputs on ``x`` (official
        ``ps_inv``): ``[X_front, 1] @ [W^T; b] ~= X_end``."""
        feats = []
        for a in self.anchors:
            h, outs = a.forward_stem(x), []
            for block in a.stage_modules():
                h = block(h)
                outs.append(h.reshape(-1, h.shape[-1]))
            feats.append(outs)
        for c in self.configs:
            if len(c["comb"]) != 2:
                continue
            front, end = c["comb"]
            src, dst = feats[front][c["route"][0][1]], feats[end][c["route"][1][0] - 1]
            sol = torch.linalg.pinv(torch.cat([src, torch.ones_like(src[:, :1])], dim=1)) @ dst  # (C_in + 1, C_out)
            layer = self.stitch_layers[front][c["layers"][0]].transform
            layer.weight.copy_(sol[:-1].t())
            layer.bias.copy_(sol[-1])

    # --- forward ----------------------------------------------------------------------------------------
    def stage_modules(self) -> list[nn.Module]:
        return [self.anchors[a].stage_modules()[j] for a, b, e, _ in self._segments for j in range(b, e + 1)]

    def _run(self, x: Tensor, idx: list[int] | None = None) -> tuple[Tensor, list[Tensor]]:
        H, W = x.shape[-2] // self.min_input_size, x.shape[-1] // self.min_input_size
        x = self.anchors[self._segments[0][0]].forward_stem(x)  # (B, C, H, W) -> (B, 1 + HW, D)
        outs, k = [], 0
        for a, b, e, lid in self._segments:
            blocks = self.anchors[a].stage_modules()
            for j in range(b, e + 1):
                x = self.run_stage(blocks[j], x)
                if idx is not None and k in idx:
                    outs.append(x[:, 1:].reshape(x.shape[0], H, W, -1).permute(0, 3, 1, 2))  # -> (B, D, H, W)
                k += 1
            x = self.stitch_layers[a][lid](x)
        return x, outs

    def forward_features(self, x: Tensor) -> Tensor:
        """Tokens ``(B, 1 + N, D)`` after the route's last anchor's final norm (``D``: that anchor's width)."""
        self.check_input(x)
        x, _ = self._run(x)
        return self.anchors[self._segments[-1][0]].norm(x)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None
                              ) -> list[Tensor]:
        """Patch tokens of the chosen route blocks (before any stitching layer) as ``(B, D, H/p, W/p)`` maps."""
        idx = resolve_indices(indices, len(self.stage_modules()), self.name)
        self.check_input(x)
        return self._run(x, idx)[1]

    # --- checkpoints ------------------------------------------------------------------------------------
    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official SN-Netv2 keys -> ours: ``anchors.0.head`` -> ``head.fc_small``, ``anchors.1.head`` ->
        ``head.fc``; a DeiT III position table without a class row gets a zero one; layer scales ``gamma_1`` /
        ``gamma_2`` are folded into ``attn.proj`` / ``mlp.fc2``. Keys already ours pass unchanged."""
        out = dict(state_dict)
        for k in list(out):
            if k.startswith("anchors.") and k.split(".")[2] == "head" and k.count(".") == 3:
                name = "fc_small" if k.split(".")[1] == "0" else "fc"
                out[f"head.{name}.{k.rsplit('.', 1)[1]}"] = out.pop(k)
            elif k.startswith("anchors.") and k.endswith(".pos_embed"):
                pos = out[k]
                side = math.isqrt(pos.shape[1])
                if side * side == pos.shape[1]:  # no class-token row (DeiT III adds none to the class token)
                    out[k] = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
        for k in [k for k in out if k.endswith((".gamma_1", ".gamma_2"))]:
            gamma, prefix = out.pop(k), k.rsplit(".", 1)[0]
            target = f"{prefix}.attn.proj" if k.endswith("gamma_1") else f"{prefix}.mlp.fc2"
            out[f"{target}.weight"] = out[f"{target}.weight"] * gamma[:, None]
            out[f"{target}.bias"] = out[f"{target}.bias"] * gamma
        return out


_TEST = (("vit_test", "vit_test"), ((("embed_dim", 16), ("depth", 4)), (("embed_dim", 32), ("depth", 4))))
_RES = "official classification/results/stitches_res_s_l.txt (SN-Netv2 DeiT3-S + DeiT3-L, cfg_id 0)"
_SL = ("anchors deit_small_patch16_224 + vit_large_patch16_224: the structure of the official DeiT III S + L pair "
       "(its released weights remap exactly: layer scales folded, a zero class-token position row), lora_r=64 as "
       "the official config. params: ours; the official SNNetv2 counts 337.567312 M with its DeiT III anchors "
       "(+58368 layer-scale weights, -1408 class-token position rows). gmacs and top-1: stitch 0 (the small "
       "anchor); 134 stitches from 4.6 to 61.6 GMACs, top-1 82.9 to 87.0 in the official results file. The S-B "
       "and B-L pairs are built with anchors=(...); no numbers are published for them outside the paper's "
       "figures, so they are not registered")
VARIANTS = {
    "snnet_test":        Variant(dict(anchors=_TEST[0], anchor_args=_TEST[1], lora_r=4), params_m=0.156912,
                                 input_size=64),
    "snnet_small_large": Variant(dict(anchors=("deit_small_patch16_224", "vit_large_patch16_224"), lora_r=64),
                                 params_m=337.510352, gmacs=4.608, paper=Paper(None, 4.608, 82.906, _RES), notes=_SL),
}
register_family(SNNet, VARIANTS, paper="arXiv:2307.00154", kind="vit",
                code="ziplab/SN-Netv2@dd17607f350c classification/snnet.py")
