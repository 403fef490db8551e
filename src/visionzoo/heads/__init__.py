"""Dense prediction on any backbone: segmentation, detection and super-resolution heads (``DenseModel``)."""
from visionzoo.heads.dense import HEADS, TASKS, DenseModel, register_head
from visionzoo.heads.fcos import FCOSHead
from visionzoo.heads.pyramid import SimpleFeaturePyramid, check_pyramid
from visionzoo.heads.seg import FPNSegHead, SegFormerHead, UPerHead
from visionzoo.heads.sr import ESPCNHead, psnr, ssim

__all__ = ["HEADS", "TASKS", "DenseModel", "ESPCNHead", "FCOSHead", "FPNSegHead", "SegFormerHead",
           "SimpleFeaturePyramid", "UPerHead", "check_pyramid", "psnr", "register_head", "ssim"]
