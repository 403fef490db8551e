"""Shared building blocks, re-exported by name."""
from .act import LayerType, get_act
from .attention import Attention, AttentionCore
from .class_token import LastStageClassTokenMixin
from .conv import fold_bn, fold_bn_into_conv, fold_channel_scale, fold_conv_bn_children, fuse_conv_bn_pairs
from .conv_tokens import DAFF, SOPE, Affine, head_tokens, square_grid
from .drop import DropPath, drop_path, drop_path_rates
from .head import ClassifierHead
from .init import init_linear, init_trunc_normal, is_meta
from .linear_attention import MODEL_ATTN_TYPES, GaussianMixtureMask, SimpleRMSNorm, attn_types_per_block
from .map_block import MapTokenBlock
from .mlp import ConvMlp, Mlp
from .norm import FrozenBatchNorm2d, LayerNorm, LayerNorm2d, get_norm
from .patch_embed import PatchEmbed, to_2tuple
from .pos_embed import resample_abs_pos_embed
from .spectral import SpectralGatingFilter, global_filter
from .spectral_stages import (
    ClassAttentionHead,
    SpectralAttention,
    SpectralStage,
    build_spectral_stages,
    conv_bn_relu_stem,
    remap_spectral_stages,
)
from .sr_attention import SpatialReductionAttention
from .stage import DownsampleStage
from .token_block import PreNormBlock, TokenBlock
from .tracing import is_tracing, trace_leaf
from .wavelet import HaarDWT, haar_dwt2d
from .window import (
    PARTITIONS,
    block_partition,
    block_reverse,
    grid_partition,
    grid_reverse,
    window_partition,
    window_reverse,
)

__all__ = [
    "MODEL_ATTN_TYPES", "Attention", "AttentionCore", "GaussianMixtureMask", "SimpleRMSNorm",
    "attn_types_per_block", "ClassifierHead", "ConvMlp", "DownsampleStage", "DropPath", "FrozenBatchNorm2d",
    "HaarDWT",
    "LastStageClassTokenMixin", "LayerNorm", "LayerNorm2d", "LayerType", "MapTokenBlock", "Mlp", "PatchEmbed",
    "SpatialReductionAttention", "TokenBlock", "drop_path", "drop_path_rates", "fold_bn", "fold_bn_into_conv",
    "fold_channel_scale", "fold_conv_bn_children", "fuse_conv_bn_pairs", "get_act", "get_norm", "haar_dwt2d",
    "init_linear", "init_trunc_normal", "is_meta", "is_tracing", "resample_abs_pos_embed", "to_2tuple", "trace_leaf",
    "window_partition", "window_reverse", "PARTITIONS", "block_partition", "block_reverse", "grid_partition",
    "grid_reverse",
]
__all__ += ["ClassAttentionHead", "SpectralAttention", "SpectralGatingFilter", "SpectralStage", "build_spectral_stages",
            "conv_bn_relu_stem", "global_filter", "remap_spectral_stages"]
__all__ += ["DAFF", "SOPE", "Affine", "head_tokens", "square_grid"]
__all__ += ["PreNormBlock"]
