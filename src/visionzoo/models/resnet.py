"""ResNet, from "Deep Residual Learning for Image Recognition" (He et al., 2016). https://arxiv.org/abs/1512.03385

Differs from the paper: the stride-2 of a downsampling bottleneck sits in its 3x3 conv, not its first 1x1 conv
("ResNet v1.5", as torchvision and timm build it), and the last BatchNorm of every residual branch starts at zero.
Follows torchvision / timm ``resnet.py`` (BSD-3-Clause / Apache-2.0); the state-dict layout is theirs (``conv1``,
``bn1``, ``layer1``..``layer4``) except the classifier, which is ``head.fc`` like every family's (``ResNet.remap``
renames their ``fc.*``).
"""
from __future__ import annotations

from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import DropPath, LayerType, drop_path_rates, get_act, get_norm, is_meta
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["ResNet"]


def _act(act_layer: LayerType) -> nn.Module:
    cls = get_act(act_layer)
    try:
        return cls(inplace=True)
    except TypeError:  # activations without an in-place form (GELU, Identity)
        return cls()


def _shortcut(in_dim: int, out_dim: int, stride: int, norm_layer: LayerType) -> nn.Sequential | None:
    """A strided 1x1 projection + norm when the residual changes shape, else ``None`` (identity)."""
    if stride == 1 and in_dim == out_dim:
        return None
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, stride=stride, bias=False), get_norm(norm_layer)(out_dim))


class ResNetBasicBlock(nn.Module):
    """Two 3x3 convs with BN and ReLU, plus the (projected) input."""

    expansion = 1
    fuse_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, in_dim: int, out_dim: int, stride: int = 1, act_layer: LayerType = "relu",
                 norm_layer: LayerType = "bn", drop_path: float = 0.0) -> None:
        super().__init__()
        norm = get_norm(norm_layer)
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_dim)
        self.act1 = _act(act_layer)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False)
        self.bn2 = norm(out_dim)
        self.act2 = _act(act_layer)
        self.downsample = _shortcut(in_dim, out_dim, stride, norm_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        if getattr(self.bn2, "weight", None) is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(self.drop_path(x) + shortcut)


class ResNetBottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BN, plus the (projected) input."""

    expansion = 4
    fuse_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, in_dim: int, out_dim: int, stride: int = 1, act_layer: LayerType = "relu",
                 norm_layer: LayerType = "bn", drop_path: float = 0.0) -> None:
        super().__init__()
        norm = get_norm(norm_layer)
        width = out_dim // self.expansion
        self.conv1 = nn.Conv2d(in_dim, width, 1, bias=False)
        self.bn1 = norm(width)
        self.act1 = _act(act_layer)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(width)
        self.act2 = _act(act_layer)
        self.conv3 = nn.Conv2d(width, out_dim, 1, bias=False)
        self.bn3 = norm(out_dim)
        self.act3 = _act(act_layer)
        self.downsample = _shortcut(in_dim, out_dim, stride, norm_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(self.drop_path(x) + shortcut)


BLOCKS = {"basic": ResNetBasicBlock, "bottleneck": ResNetBottleneck}


class ResNet(Backbone):
    """ResNet: a 7x7/2 conv + 3x3/2 max-pool stem, then stages of basic or bottleneck residual blocks.

    Args:
        depths: blocks per stage.
        dims: output channels of each stage (for bottleneck blocks, 4x the 3x3 conv's width).
        block: ``"basic"`` (two 3x3 convs; ResNet-18/34) or ``"bottleneck"`` (1x1-3x3-1x1; ResNet-50 and up).
        stem_width: channels of the stem conv.
    """

    kind = "convnet"
    cpu_channels_last = True  # oneDNN convs are faster on NHWC (see Backbone)
    cpu_channels_last_min_batch = 2  # resnet50, 2 cores: NHWC/NCHW 0.97 at batch 1, 1.07 at 2, 1.19 at 8
    first_conv = "conv1"
    fuse_pairs = (("conv1", "bn1"),)

    def __init__(self, depths: tuple[int, ...] = (3, 4, 6, 3), dims: tuple[int, ...] = (256, 512, 1024, 2048),
                 block: str = "bottleneck", stem_width: int = 64, act_layer: LayerType = "relu",
                 norm_layer: LayerType = "bn", *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"resnet: block must be one of {sorted(BLOCKS)}, got {block!r}")
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"resnet: depths {tuple(depths)} and dims {tuple(dims)} must be non-empty and of "
                             f"equal length (one entry per stage)")
        block_cls = BLOCKS[block]
        if any(d % block_cls.expansion for d in dims):
            raise ValueError(f"resnet: with block={block!r} every entry of dims must be a multiple of "
                             f"{block_cls.expansion}, got {tuple(dims)}")
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = get_norm(norm_layer)(stem_width)
        self.act1 = _act(act_layer)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        in_dim, infos = stem_width, []
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            blocks = [block_cls(in_dim if j == 0 else dim, dim, stride=2 if i > 0 and j == 0 else 1,
                                act_layer=act_layer, norm_layer=norm_layer, drop_path=dpr[i][j])
                      for j in range(depth)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            infos.append(FeatureInfo(dim, 4 * 2**i, f"layer{i + 1}"))
            in_dim = dim
        self.num_stages = len(depths)
        self.set_feature_info(infos)

        self.init_head(dims[-1], num_classes, drop_rate)
        self.apply(_init_weights)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))

    def stage_modules(self) -> list[nn.Module]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """torchvision / timm keys -> ours: only the classifier moves, ``fc.*`` -> ``head.fc.*`` (idempotent)."""
        return {f"head.{k}" if k.startswith("fc.") else k: v for k, v in state_dict.items()}


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d) and not is_meta(m):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, (ResNetBasicBlock, ResNetBottleneck)) and not is_meta(m.conv1):
        m.zero_init_last()  # the residual branch starts as zero, each block as an identity


_TV = "torchvision IMAGENET1K_V1 weights (paper recipe), top-1 as re-measured in timm results-imagenet.csv (tv_in1k, " \
      "224, crop 0.875 bilinear); GMACs = torchvision docs 'GFLOPS'"
_TV_DATA = dict(crop_pct=0.875, interpolation="bilinear")  # timm's pretrained cfg for the <name>.tv_in1k weights

VARIANTS = {
    "resnet_test": Variant(dict(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), stem_width=16), params_m=0.386904,
                           input_size=64, notes="tiny bottleneck config for tests"),
    "resnet18":    Variant(dict(depths=(2, 2, 2, 2), dims=(64, 128, 256, 512), block="basic"), params_m=11.689512,
                           gmacs=1.81, paper=Paper(11.69, 1.81, 69.752, _TV), **_TV_DATA),
    "resnet34":    Variant(dict(depths=(3, 4, 6, 3), dims=(64, 128, 256, 512), block="basic"), params_m=21.797672,
                           gmacs=3.66, paper=Paper(21.80, 3.66, 73.298, _TV), **_TV_DATA),
    "resnet50":    Variant(dict(depths=(3, 4, 6, 3)), params_m=25.557032, gmacs=4.09,
                           paper=Paper(25.56, 4.09, 76.156, _TV + "; refs_convs.md ResNet-50 (fvcore 4.112 GMACs)"),
                           **_TV_DATA),
    "resnet101":   Variant(dict(depths=(3, 4, 23, 3)), params_m=44.549160, gmacs=7.80,
                           paper=Paper(44.55, 7.80, 77.404, _TV), **_TV_DATA),
    "resnet152":   Variant(dict(depths=(3, 8, 36, 3)), params_m=60.192808, gmacs=11.51,
                           paper=Paper(60.19, 11.51, 78.330, _TV), **_TV_DATA),
}
register_family(ResNet, VARIANTS, paper="arXiv:1512.03385", kind="convnet", family="resnet")
