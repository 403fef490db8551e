"""FCOS: a single-stage anchor-free detector head (Tian et al., 2019, "FCOS: Fully Convolutional One-Stage Object
Detection", arXiv:1904.01355; tianzhi0549/FCOS, BSD-2, read for facts).

Every location of every pyramid level (stride >= ``min_stride``, P3.. in the paper) predicts class scores, the
distances ``(l, t, r, b)`` to the sides of its box and a centerness. Shared towers of ``num_convs`` 3x3 conv + GN +
ReLU (paper: 4), class bias ``-log((1 - 0.01) / 0.01)``, a learnable scale per level. Training targets: a location
is positive for the smallest-area box that contains it, inside that box's centre region of ``center_radius``
strides ("center sampling"), whose largest side distance falls in the level's range ``(4 s, 8 s]`` (the paper's
0/64/128/256/512/inf for P3..P7, written per stride; the first level starts at 0, the last has no upper end).
Losses: sigmoid focal loss (alpha 0.25, gamma 2; Lin et al., 2017) over all locations / positives; GIoU loss on
positives weighted by the centerness target; centerness BCE / positives. These are the "FCOS improvements" of the
official repo (centerness on the regression branch, center sampling, GIoU, normalised regression targets).
Decoding: score ``sqrt(sigmoid(cls) * sigmoid(centerness))``, threshold 0.05, top 1000, class-wise NMS at 0.6,
top 100.

Differs from the paper: the FPN is built on whatever pyramid the backbone (or the simple feature pyramid) gives,
no P6/P7 levels are added.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.errors import ArgumentError
from visionzoo.heads.boxes import FCOSBoxCoder, batched_nms, giou_loss
from visionzoo.heads.seg import FPN, conv_norm_act

__all__ = ["FCOSHead", "sigmoid_focal_loss"]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Summed focal loss of independent sigmoid classifiers (``targets`` in {0, 1}, the shape of ``logits``)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    w = alpha * targets + (1 - alpha) * (1 - targets)
    return (w * ce * (1 - p_t) ** gamma).sum()


class FCOSHead(nn.Module):
    """FPN + FCOS towers; ``forward`` gives flattened per-location outputs, ``loss`` and ``postprocess`` use them."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], num_classes: int, dim: int = 128,
                 num_convs: int = 2, min_stride: int = 8, prior: float = 0.01, center_radius: float = 1.5,
                 score_thresh: float = 0.05, nms_thresh: float = 0.6, max_dets: int = 100) -> None:
        super().__init__()
        self.levels = [i for i, s in enumerate(strides) if s >= min_stride]
        if not self.levels:
            raise ArgumentError(f"head 'fcos' needs pyramid levels at stride >= {min_stride}, the backbone gives "
                                f"{list(strides)}; include later stages in out_indices")
        self.strides = [strides[i] for i in self.levels]
        self.num_classes, self.center_radius = num_classes, center_radius
        self.score_thresh, self.nms_thresh, self.max_dets = score_thresh, nms_thresh, max_dets
        self.fpn = FPN(channels, dim)
        self.cls_tower = nn.Sequential(*[conv_norm_act(dim, dim) for _ in range(num_convs)])
        self.reg_tower = nn.Sequential(*[conv_norm_act(dim, dim) for _ in range(num_convs)])
        self.cls_logits = nn.Conv2d(dim, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(dim, 4, 3, padding=1)
        self.centerness = nn.Conv2d(dim, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.levels)))
        for m in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior) / prior))

    def forward(self, feats: list[Tensor], out_size: Sequence[int]) -> dict[str, Tensor]:
        """``cls (B, N, K)`` logits, ``reg (B, N, 4)`` distances / stride, ``ctr (B, N)`` logits, ``points (N, 2)``,
        ``strides (N,)`` and ``ranges (N, 2)`` (the levels' regression ranges) over all N locations."""
        pyr = self.fpn(feats)
        cls, reg, ctr, points, strides, ranges = [], [], [], [], [], []
        for k, (i, s) in enumerate(zip(self.levels, self.strides)):
            x = pyr[i]
            B, _, H, W = x.shape
            c, r = self.cls_tower(x), self.reg_tower(x)
            cls.append(self.cls_logits(c).flatten(2).transpose(1, 2))  # (B, K, H, W) -> (B, HW, K)
            reg.append(F.relu(self.scales[k] * self.bbox_pred(r)).flatten(2).transpose(1, 2))  # (B, HW, 4)
            ctr.append(self.centerness(r).flatten(1))  # (B, 1, H, W) -> (B, HW)
            ys, xs = torch.meshgrid(torch.arange(H, device=x.device), torch.arange(W, device=x.device), indexing="ij")
            points.append(torch.stack([xs, ys], -1).reshape(-1, 2).float() * s + s // 2)  # (HW, 2) pixel centres
            strides.append(torch.full((H * W,), float(s), device=x.device))
            lo = 0.0 if k == 0 else 4.0 * s
            hi = math.inf if k == len(self.levels) - 1 else 8.0 * s
            ranges.append(torch.tensor([lo, hi], device=x.device).expand(H * W, 2))
        return dict(cls=torch.cat(cls, 1), reg=torch.cat(reg, 1), ctr=torch.cat(ctr, 1), points=torch.cat(points),
                    strides=torch.cat(strides), ranges=torch.cat(ranges),
                    image_size=torch.tensor(tuple(out_size), device=pyr[0].device))

    # --- training -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def assign(self, out: dict[str, Tensor], boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """One image's targets: ``(N,)`` class per location (-1 = background) and ``(N, 4)`` its box."""
        points, strides, ranges = out["points"], out["strides"], out["ranges"]
        N = len(points)
        if len(boxes) == 0:
            return torch.full((N,), -1, dtype=torch.long, device=points.device), points.new_zeros(N, 4)
        px, py = points[:, 0, None], points[:, 1, None]  # (N, 1)
        ltrb = torch.stack([px - boxes[:, 0], py - boxes[:, 1], boxes[:, 2] - px, boxes[:, 3] - py], -1)  # (N, M, 4)
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        rad = self.center_radius * strides[:, None]
        in_center = ((px > torch.maximum(boxes[:, 0], cx - rad)) & (px < torch.minimum(boxes[:, 2], cx + rad))
                     & (py > torch.maximum(boxes[:, 1], cy - rad)) & (py < torch.minimum(boxes[:, 3], cy + rad)))
        far = ltrb.max(-1).values
        ok = in_center & (ltrb.min(-1).values > 0) & (far > ranges[:, :1]) & (far <= ranges[:, 1:])
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(N, -1)
        area = torch.where(ok, area, torch.full_like(area, math.inf))
        best, j = area.min(1)
        cls_t = torch.where(torch.isfinite(best), labels[j].long(), torch.full_like(j, -1))
        return cls_t, boxes[j].float()

    def loss(self, out: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
        """Focal + GIoU + centerness losses of a batch; ``targets``: per image ``boxes (M, 4)``, ``labels (M,)``."""
        if len(targets) != out["cls"].shape[0]:
            raise ArgumentError(f"fcos loss: {len(targets)} targets for a batch of {out['cls'].shape[0]}")
        assigned = [self.assign(out, t["boxes"].to(out["points"]), t["labels"].to(out["points"].device))
                    for t in targets]
        cls_t = torch.stack([a[0] for a in assigned])  # (B, N)
        box_t = torch.stack([a[1] for a in assigned])  # (B, N, 4)
        pos = cls_t >= 0
        num_pos = max(float(pos.sum()), 1.0)
        onehot = torch.zeros_like(out["cls"])
        onehot[pos] = F.one_hot(cls_t[pos], self.num_classes).to(onehot)
        loss_cls = sigmoid_focal_loss(out["cls"], onehot) / num_pos
        if not pos.any():
            return loss_cls + 0 * (out["reg"].sum() + out["ctr"].sum())
        points = out["points"].expand(len(targets), -1, -1)[pos]
        strides = out["strides"].expand(len(targets), -1)[pos]
        ltrb_t = FCOSBoxCoder.encode(points, box_t[pos])  # pixels
        lr, tb = ltrb_t[:, [0, 2]], ltrb_t[:, [1, 3]]
        ctr_t = ((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values)).sqrt()
        pred_boxes = FCOSBoxCoder.decode(points, out["reg"][pos], strides)
        loss_box = (giou_loss(pred_boxes, box_t[pos]) * ctr_t).sum() / ctr_t.sum().clamp(min=1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(out["ctr"][pos], ctr_t, reduction="sum") / num_pos
        return loss_cls + loss_box + loss_ctr

    # --- inference ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def postprocess(self, out: dict[str, Tensor], pre_nms: int = 1000) -> list[dict[str, Tensor]]:
        """Per image ``boxes (D, 4)``, ``scores (D,)``, ``labels (D,)``, at most ``max_dets``."""
        H, W = out["image_size"].tolist()
        scores = (out["cls"].sigmoid() * out["ctr"].sigmoid()[..., None]).sqrt()  # (B, N, K)
        boxes = FCOSBoxCoder.decode(out["points"], out["reg"], out["strides"])  # (B, N, 4)
        boxes = torch.stack([boxes[..., 0].clamp(0, W), boxes[..., 1].clamp(0, H), boxes[..., 2].clamp(0, W),
                             boxes[..., 3].clamp(0, H)], -1)
        K = scores.shape[-1]
        results = []
        for s, b in zip(scores, boxes):
            flat = s.flatten()
            cand = (flat > self.score_thresh).nonzero().squeeze(1)
            cand = cand[flat[cand].topk(min(pre_nms, len(cand))).indices]
            loc, lab = cand // K, cand % K
            bb, ss = b[loc], flat[cand]
            keep = batched_nms(bb, ss, lab, self.nms_thresh)[:self.max_dets]
            results.append(dict(boxes=bb[keep], scores=ss[keep], labels=lab[keep]))
        return results
