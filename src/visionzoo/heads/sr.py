"""Super-resolution: an ESPCN sub-pixel head on a backbone's finest map, and PSNR / SSIM.

ESPCN: Shi et al., 2016, "Real-Time Single Image and Video Super-Resolution Using an Efficient Sub-Pixel
Convolutional Neural Network" (arXiv:1609.05158), Sec. 2: 5x5 conv (64) + tanh, 3x3 conv (32) + tanh, 3x3 conv to
``C * r^2`` channels and a periodic shuffle (``nn.PixelShuffle``) to ``r`` times the input size. Here the head
reads the backbone's finest map at stride ``s`` (fused with the coarser ones through an FPN) and shuffles by
``s * r``, and the result is added to a bicubic upsampling of the low-resolution image.
Differs from the paper: the features come from the backbone (the paper convolves the image itself) and the head
predicts a residual over bicubic upsampling (as VDSR, Kim et al., 2016), so an untrained head starts at bicubic.

PSNR: ``10 log10(1 / MSE)`` on images in [0, 1], over all channels. SSIM: Wang et al., 2004 (IEEE TIP 13(4)),
an 11x11 Gaussian window with sigma 1.5, K1 0.01, K2 0.03, valid positions only, averaged over channels and pixels.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.errors import ArgumentError
from visionzoo.heads.seg import FPN

__all__ = ["ESPCNHead", "psnr", "ssim"]


class ESPCNHead(nn.Module):
    """ESPCN's three convs and sub-pixel shuffle on the finest pyramid map; output = bicubic(image) + residual."""

    takes_image = True

    def __init__(self, channels: Sequence[int], strides: Sequence[int], num_classes: int = 3, dim: int = 64,
                 scale: int = 2) -> None:
        super().__init__()
        if scale < 1:
            raise ArgumentError(f"espcn: scale must be >= 1, got {scale}")
        self.scale, self.shuffle_by = scale, strides[0] * scale
        self.fpn = FPN(channels, dim)
        self.body = nn.Sequential(nn.Conv2d(dim, 64, 5, padding=2), nn.Tanh(), nn.Conv2d(64, 32, 3, padding=1),
                                  nn.Tanh(), nn.Conv2d(32, num_classes * self.shuffle_by ** 2, 3, padding=1),
                                  nn.PixelShuffle(self.shuffle_by))
        nn.init.zeros_(self.body[4].weight)  # start at bicubic
        nn.init.zeros_(self.body[4].bias)

    def forward(self, feats: list[Tensor], image: Tensor) -> Tensor:
        """``image``: the low-resolution input in [0, 1]; returns ``(B, C, r H, r W)``."""
        x = self.body(self.fpn(feats)[0])
        up = F.interpolate(image, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return up + x[..., :up.shape[-2], :up.shape[-1]]


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """``(B,)`` PSNR in dB of each image pair (``inf`` for identical images)."""
    if pred.shape != target.shape:
        raise ArgumentError(f"psnr: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0, win: int = 11, sigma: float = 1.5) -> Tensor:
    """``(B,)`` mean SSIM of each image pair (inputs ``(B, C, H, W)``, sides >= ``win``)."""
    if pred.shape != target.shape or pred.ndim != 4:
        raise ArgumentError(f"ssim: needs two (B, C, H, W) batches of one shape, got {tuple(pred.shape)} and "
                            f"{tuple(target.shape)}")
    if min(pred.shape[-2:]) < win:
        raise ArgumentError(f"ssim: images must be at least {win}x{win}, got {tuple(pred.shape[-2:])}")
    C = pred.shape[1]
    g = _gaussian(win, sigma)
    w = (g[:, None] * g[None, :]).expand(C, 1, win, win).to(pred.device)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=C)

    x, y = pred.double(), target.double()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)
