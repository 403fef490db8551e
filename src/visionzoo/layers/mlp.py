"""Two-layer MLPs on tokens (Linear) and on feature maps (1x1 conv)."""
from __future__ import annotations

from torch import Tensor, nn

from .act import LayerType, get_act
from .norm import get_norm


class Mlp(nn.Module):
    """Linear, activation, dropout, optional norm, Linear, dropout."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: LayerType = "gelu", norm_layer: LayerType | None = None, bias: bool = True,
                 drop: float = 0.0) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = get_act(act_layer)()
        self.drop1 = nn.Dropout(drop)
        self.norm = get_norm(norm_layer)(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))


class ConvMlp(nn.Module):
    """The same MLP on NCHW maps, with 1x1 convolutions."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: LayerType = "relu", norm_layer: LayerType | None = None, bias: bool = True,
                 drop: float = 0.0) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1, bias=bias)
        self.norm = get_norm(norm_layer)(hidden_features) if norm_layer is not None else nn.Identity()
        self.act = get_act(act_layer)()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm(self.fc1(x)))
        return self.fc2(self.drop(x))
