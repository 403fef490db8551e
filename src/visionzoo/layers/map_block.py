"""A pre-norm transformer block over the tokens of an ``(H, W)`` map, with the attention passed in (PVT v1, CvT)."""
from __future__ import annotations

from torch import Tensor, nn

from .act import LayerType
from .drop import DropPath
from .mlp import Mlp
from .norm import get_norm


class MapTokenBlock(nn.Module):
    """``x + drop_path(attn(norm1(x), size))``, then ``x + drop_path(mlp(norm2(x)))``.

    ``attn`` is any module called as ``attn(tokens, (H, W))`` that keeps the token shape (spatial-reduction
    attention, convolutional-projection attention). One ``drop_path`` serves both branches, and the keys
    (``norm1``, ``attn``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) are those of the PVT and CvT reference code.
    """

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4.0, proj_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: LayerType = "gelu", norm_layer: LayerType = "ln") -> None:
        super().__init__()
        norm = get_norm(norm_layer)
        self.norm1 = norm(dim)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))
