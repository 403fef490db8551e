"""DeepMAD, from "DeepMAD: Mathematical Architecture Design for Deep Convolutional Neural Network" (Shen et al.,
CVPR 2023). https://arxiv.org/abs/2303.02165

DeepMAD designs ConvNets training-free (maximising a network-entropy score under FLOPs/params budgets); what it
releases are the searched structures. Each one is a 3x3/2 conv stem, five "super-blocks" of ``L`` residual blocks
(the first with the super-block's stride and width change), and for the SoTA models a final 1x1 conv:
ResNet-like 1x1-kxk-1x1 bottlenecks with ReLU (``block="k1kxk1"``: DeepMAD-R18/R34/R50) or inverted bottlenecks
1x1 expand, depthwise kxk, squeeze-excite, 1x1 project with SiLU (``block="k1dwsek1"``: DeepMAD-29M/50M/89M).

Differs from the paper: head dropout (``drop_rate``) sits before the classifier (the official code applies it to the
logits); ``drop_path_rate`` is per-sample stochastic depth on the residual branch (the official ``dropout_layer``
drops the branch for the whole batch; both are off by default). Stages: the official ``stage_idx`` split (one output
before every stride-2 super-block, and the last block), without its stride-2 first entry, so four maps at strides
4/8/16/32; a stage with a stride-1 super-block (or the final 1x1 conv) holds both, and stride-1 super-blocks right
after the stem conv open the first stage. Inputs: any side that is a multiple of the total stride (32 for every
released structure); no padding.
Follows alibaba/lightweight-neural-architecture-search (Apache-2.0) ``tinynas/deploy/cnnnet`` (the copy the README
says to train with) and the structure files ``configs/classification/models/deepmad-*.txt``. The official layout is
flat (``block_list.{i}`` = the stem conv, the super-blocks and the final conv; ``fc_linear``); ours is ``stem``,
``stages.{s}.{j}`` (the official blocks of stage ``s``, block names kept) and ``head.fc``. ``DeepMAD.remap`` renames
the stem and the classifier; which stage an official block index falls in depends on the structure's strides, which
a checkpoint does not hold, so ``adapt_state_dict`` renames those with the model's own split.
"""
from __future__ import annotations

import math
import re

from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import DropPath, drop_path_rates, is_meta
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["DeepMAD"]

BLOCKS = ("k1kxk1", "k1dwsek1")


class DeepMADConvBN(nn.Module):
    """A bias-free conv (padding (k-1)//2) and BatchNorm, with ReLU when ``act`` (the official ConvKXBN[RELU])."""

    fuse_pairs = (("conv1", "bn1"),)

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(out_dim)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn1(self.conv1(x)))


class DeepMADSqueezeExcite(nn.Module):
    """Squeeze-excite whose two 1x1 convs carry BatchNorm; hidden width a multiple of 8 near dim/4, SiLU, sigmoid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = max(1, round(dim * 0.25) // 8) * 8
        self.conv1 = DeepMADConvBN(dim, hidden)
        self.conv2 = DeepMADConvBN(hidden, dim)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)  # (B, C, H, W) -> (B, C, 1, 1)
        return x * self.conv2(self.act(self.conv1(s))).sigmoid()


class DeepMADBottleneck(nn.Module):
    """ResK1KXK1: 1x1 -> kxk (stride) -> 1x1 with BN and ReLU; shortcut avg-pool 2x2 (stride 2) + 1x1 conv-BN
    projection (always in a super-block's first block); ReLU after the sum."""

    def __init__(self, in_dim: int, out_dim: int, btn_dim: int, kernel_size: int, stride: int = 1,
                 force_proj: bool = False, drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv1 = DeepMADConvBN(in_dim, btn_dim)
        self.conv2 = DeepMADConvBN(btn_dim, btn_dim, kernel_size, stride)
        self.conv3 = DeepMADConvBN(btn_dim, out_dim)
        self.act = nn.ReLU(inplace=True)
        self.residual_downsample = nn.AvgPool2d(2, 2) if stride == 2 else nn.Identity()
        self.residual_proj = DeepMADConvBN(in_dim, out_dim) if in_dim != out_dim or force_proj else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.residual_proj(self.residual_downsample(x))
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return self.act(shortcut + self.drop_path(x))


class DeepMADInvertedBottleneck(nn.Module):
    """ResK1DWSEK1: 1x1 expand -> depthwise kxk (stride) -> squeeze-excite -> 1x1 project, BN and SiLU; an
    (avg-pooled when strided) identity shortcut only when in_dim == out_dim; SiLU after the sum."""

    def __init__(self, in_dim: int, out_dim: int, btn_dim: int, kernel_size: int, stride: int = 1,
                 force_proj: bool = False, drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv1 = DeepMADConvBN(in_dim, btn_dim)
        self.conv2 = DeepMADConvBN(btn_dim, btn_dim, kernel_size, stride, groups=btn_dim)
        self.se2 = DeepMADSqueezeExcite(btn_dim)
        self.conv3 = DeepMADConvBN(btn_dim, out_dim)
        self.act = nn.SiLU(inplace=True)  # on fresh conv/sum outputs only: saves a 100M-element buffer per call
        self.has_shortcut = in_dim == out_dim or force_proj
        if self.has_shortcut:
            self.residual_downsample = nn.AvgPool2d(2, 2) if stride == 2 else nn.Identity()
            self.residual_proj = nn.Identity() if in_dim == out_dim else DeepMADConvBN(in_dim, out_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.has_shortcut else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.residual_proj(self.residual_downsample(x)) if self.has_shortcut else None
        x = self.conv3(self.se2(self.act(self.conv2(self.act(self.conv1(x))))))
        if shortcut is not None:
            x = shortcut + self.drop_path(x)
        return self.act(x)


class DeepMADSuperBlock(nn.Module):
    """``depth`` blocks; the first takes the stride and the width change (and, for k1kxk1, a forced projection)."""

    def __init__(self, block: str, in_dim: int, out_dim: int, btn_dim: int, depth: int, kernel_size: int,
                 stride: int, dpr: list[float]) -> None:
        super().__init__()
        cls = DeepMADBottleneck if block == "k1kxk1" else DeepMADInvertedBottleneck
        self.block_list = nn.ModuleList(
            cls(in_dim if i == 0 else out_dim, out_dim, btn_dim, kernel_size, stride if i == 0 else 1,
                force_proj=i == 0 and block == "k1kxk1", drop_path=dpr[i]) for i in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block_list:
            x = blk(x)
        return x


class DeepMAD(Backbone):
    """DeepMAD: a 3x3/2 conv stem, super-blocks of residual blocks, an optional 1x1 conv, pool, linear.

    Args:
        depths, dims, btn_dims, strides, kernel_sizes: per super-block, the official ``L``, ``out``, ``btn``
            (bottleneck / expanded width), ``s`` and ``k`` of the structure file.
        block: ``"k1kxk1"`` (ResK1KXK1 bottlenecks) or ``"k1dwsek1"`` (ResK1DWSEK1 inverted bottlenecks with SE).
        stem_dim: channels of the 3x3/2 stem conv.
        head_dim: channels of the final 1x1 conv-BN-ReLU (0: none, as in DeepMAD-R18/R34/R50).
    """

    kind = "convnet"
    cpu_channels_last = True  # oneDNN convs are faster on NHWC (see Backbone)
    first_conv = "stem.conv1"

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...], btn_dims: tuple[int, ...],
                 strides: tuple[int, ...], kernel_sizes: tuple[int, ...], block: str = "k1kxk1",
                 stem_dim: int = 32, head_dim: int = 0, *, in_chans: int = 3, num_classes: int = 1000,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"deepmad: block must be one of {BLOCKS}, got {block!r}")
        n, lengths = len(depths), [len(t) for t in (depths, dims, btn_dims, strides, kernel_sizes)]
        if not n or any(k != n for k in lengths):
            raise ValueError(f"deepmad: depths, dims, btn_dims, strides and kernel_sizes need one entry per "
                             f"super-block; got lengths {lengths}")
        if any(s not in (1, 2) for s in strides):
            raise ValueError(f"deepmad: every stride must be 1 or 2, got {tuple(strides)}")
        self.in_chans = in_chans
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        blocks: list[nn.Module] = [DeepMADConvBN(in_chans, stem_dim, 3, 2, act=True)]  # the official block_list
        in_dim = stem_dim
        for i in range(n):
            blocks.append(DeepMADSuperBlock(block, in_dim, dims[i], btn_dims[i], depths[i], kernel_sizes[i],
                                            strides[i], dpr[i]))
            in_dim = dims[i]
        if head_dim:
            blocks.append(DeepMADConvBN(in_dim, head_dim, 1, act=True))
            in_dim = head_dim

        # The official stage_idx: the block before every stride-2 super-block, and the last block. Its first entry
        # (stride 2) ends the stem's resolution; the others end the stages. Block 0 is the stem, stage s runs from
        # the block after the previous end to its own end.
        block_strides = [2, *strides] + ([1] if head_dim else [])
        ends = [i - 1 for i in range(1, len(blocks)) if block_strides[i] == 2] + [len(blocks) - 1]
        starts = [1] + [e + 1 for e in ends[1:-1]]
        self.stem = blocks[0]
        self.stages = nn.ModuleList(nn.Sequential(*blocks[a:b + 1]) for a, b in zip(starts, ends[1:]))
        self.official_paths = ["stem"] + [f"stages.{s}.{j}" for s, (a, b) in enumerate(zip(starts, ends[1:]))
                                          for j in range(b - a + 1)]  # our module path of official block i
        self.set_feature_info([FeatureInfo(_out_dim(blocks[e]), math.prod(block_strides[:e + 1]), f"stages.{s}")
                               for s, e in enumerate(ends[1:])])
        self.min_input_size = self.input_multiple = math.prod(block_strides)

        self.init_head(in_dim, num_classes, drop_rate)
        self.apply(_init_weights)

    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys (also visionzoo checkpoints before stage modules) -> ours, for the stem and the classifier;
        ``adapt_state_dict`` places the other official blocks in their stages."""
        out = {}
        for k, v in state_dict.items():
            k = re.sub(r"^block_list\.0\.", "stem.", k)
            k = re.sub(r"^fc_linear\.", "head.fc.", k)
            out[k] = v
        return out

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official ``block_list.{i}`` keys -> ``stages.{s}.{j}``, by this model's stage split (see the module note)."""
        out = {}
        for k, v in self.remap(state_dict).items():
            m = re.match(r"block_list\.(\d+)\.(.*)$", k)
            if m and 0 < int(m[1]) < len(self.official_paths):
                k = f"{self.official_paths[int(m[1])]}.{m[2]}"
            out[k] = v
        return out


def _out_dim(m: nn.Module) -> int:
    if isinstance(m, DeepMADConvBN):
        return m.bn1.num_features
    return m.block_list[-1].conv3.bn1.num_features


def _init_weights(m: nn.Module) -> None:
    """PyTorch's default init, except the classifier: N(0, 1/in_features), zero bias (as the official code)."""
    if isinstance(m, nn.Linear) and not is_meta(m):
        nn.init.normal_(m.weight, std=m.in_features**-0.5)
        nn.init.zeros_(m.bias)


def _structure(block: str, stem: int, stages: tuple[tuple[int, int, int, int, int], ...], head: int = 0) -> dict:
    """Variant args from a structure file: stem ``out``, (L, btn, out, s, k) per super-block, the 1x1's ``out``."""
    depths, btn_dims, dims, strides, kernel_sizes = (tuple(col) for col in zip(*stages))
    return dict(block=block, stem_dim=stem, depths=depths, btn_dims=btn_dims, dims=dims, strides=strides,
                kernel_sizes=kernel_sizes, head_dim=head)


_README = "alibaba/lightweight-neural-architecture-search README 'Results for Classification' (DeepMAD rows)"
_RES_BUDGET = ("; the README's params/FLOPs for R18/R34/R50 are ResNet-18/34/50's own (the search budget), not "
               "this network's")


def _notes(txt: str, size: int, conv: float, bn: float) -> str:
    return (f"structure configs/classification/models/{txt}; params_m = official tinynas/deploy/cnnnet CnnNet with "
            f"its fc; gmacs = fvcore on it at {size} px: convs {conv} + BN {bn} + pools/linear; ours counts convs "
            f"and the linear only; eval transforms not stated in the repo (ImageNet defaults)")


VARIANTS = {
    "deepmad_test":    Variant(_structure("k1dwsek1", 16, ((1, 32, 16, 1, 3), (1, 48, 24, 2, 3), (1, 64, 32, 2, 3),
                                                          (1, 96, 48, 2, 5), (1, 128, 64, 2, 3)), head=128),
                               params_m=0.190184, input_size=64, notes="tiny config for tests"),
    "deepmad_r18":     Variant(_structure("k1kxk1", 32, ((1, 40, 96, 2, 5), (6, 40, 384, 2, 5), (9, 64, 384, 2, 5),
                                                         (10, 104, 1024, 1, 3), (12, 104, 672, 2, 5))),
                               params_m=11.826088, gmacs=1.8284,
                               paper=Paper(11.69, 1.82, 77.7, _README + _RES_BUDGET),
                               notes=_notes("deepmad-R18.txt", 224, 1.8109, 0.0168)),
    "deepmad_r34":     Variant(_structure("k1kxk1", 24, ((1, 24, 128, 2, 5), (10, 48, 512, 2, 5), (13, 88, 896, 2, 5),
                                                         (11, 104, 1024, 1, 5), (14, 128, 616, 2, 5))),
                               params_m=21.690160, gmacs=3.6614,
                               paper=Paper(21.80, 3.68, 79.7, _README + _RES_BUDGET),
                               notes=_notes("deepmad-R34.txt", 224, 3.6343, 0.0264)),
    "deepmad_r50":     Variant(_structure("k1kxk1", 32, ((1, 40, 128, 2, 5), (11, 48, 512, 2, 5), (12, 88, 872, 2, 5),
                                                         (13, 104, 1024, 1, 5), (15, 120, 1232, 2, 5))),
                               params_m=25.441144, gmacs=4.0724,
                               paper=Paper(25.55, 4.13, 80.6, _README + _RES_BUDGET),
                               notes=_notes("deepmad-R50.txt", 224, 4.0415, 0.0296)),
    "deepmad_29m":     Variant(_structure("k1dwsek1", 40, ((2, 240, 40, 1, 5), (4, 512, 85, 2, 5), (6, 800, 134, 2, 5),
                                                           (6, 1208, 201, 2, 5), (5, 1872, 312, 2, 5)), head=1792),
                               params_m=28.669956, gmacs=4.4369, paper=Paper(29, 4.5, 82.5, _README + " (29M-224)"),
                               notes=_notes("deepmad-29M-224.txt", 224, 4.322, 0.095)),
    "deepmad_29m_288": Variant(_structure("k1dwsek1", 40, ((4, 368, 61, 2, 5), (4, 576, 96, 2, 5), (5, 872, 145, 2, 5),
                                                           (6, 1304, 217, 1, 5), (4, 1968, 328, 2, 5)), head=1792),
                               params_m=28.703630, gmacs=4.4241, input_size=288,
                               paper=Paper(29, 4.5, 82.8, _README + " (29M-288)"),
                               notes=_notes("deepmad-29M-288.txt", 288, 4.3205, 0.0864)
                               + "; a separate structure searched for 288 px input"),
    "deepmad_50m":     Variant(_structure("k1dwsek1", 48, ((7, 672, 112, 2, 5), (9, 1008, 168, 2, 5),
                                                           (7, 1512, 252, 2, 5), (3, 2272, 378, 2, 5),
                                                           (1, 3456, 576, 1, 3)), head=2048),
                               params_m=49.408964, gmacs=8.6022, paper=Paper(50, 8.7, 83.9, _README),
                               notes=_notes("deepmad-50M.txt", 224, 8.4484, 0.1272)),
    "deepmad_89m":     Variant(_structure("k1dwsek1", 56, ((10, 816, 136, 2, 5), (9, 1224, 204, 2, 5),
                                                           (7, 1952, 326, 2, 5), (4, 2944, 490, 2, 5),
                                                           (1, 4464, 744, 1, 3)), head=2560),
                               params_m=88.325780, gmacs=15.2537, paper=Paper(89, 15.4, 84.0, _README),
                               notes=_notes("deepmad-89M.txt", 224, 15.0239, 0.1894)),
}
register_family(DeepMAD, VARIANTS, paper="arXiv:2303.02165", kind="convnet", family="deepmad")
