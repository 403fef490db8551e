"""Patch embedding: a strided convolution from image to patch tokens."""
from __future__ import annotations

from torch import Tensor, nn

from .act import LayerType
from .norm import get_norm


def to_2tuple(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = patch size, then an optional norm.

    Args:
        img_size: the size the model is built for; ``grid_size`` follows from it.
        output_fmt: ``"NLC"`` flattens to tokens ``(B, N, C)``; ``"NHWC"`` and ``"NCHW"`` keep the grid.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, norm_layer: LayerType | None = None, bias: bool = True,
                 output_fmt: str = "NLC") -> None:
        super().__init__()
        if output_fmt not in ("NLC", "NHWC", "NCHW"):
            raise ValueError(f"patch_embed: output_fmt must be NLC, NHWC or NCHW, got {output_fmt!r}")
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.output_fmt = output_fmt
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = get_norm(norm_layer)(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        if self.output_fmt == "NCHW":
            return self.norm(x)
        x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        if self.output_fmt == "NLC":
            x = x.flatten(1, 2)  # (B, H, W, C) -> (B, N, C)
        return self.norm(x)
