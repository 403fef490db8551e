"""VanillaNet, from "VanillaNet: the Power of Minimalism in Deep Learning" (Chen et al., 2023).
https://arxiv.org/abs/2305.12972

A plain stack of layers: no residuals, no attention. Each layer is a 1x1 conv, an optional max-pool and the
"series informed activation" (ReLU, then a depthwise (2n+1)x(2n+1) conv). At train time every 1x1 conv is a pair
of 1x1 convs with BatchNorm and a ``leaky_relu(x, act_learn)`` between them ("deep training"): ``act_learn``
ramps from 0 (a ReLU, two non-linear layers) to 1 (identity) over the first epochs, after which each pair is one
linear map. ``fuse()`` then merges every pair and folds every BatchNorm, as the official ``switch_to_deploy``.

``act_learn`` defaults to 1.0, the state of a trained network (and of the released checkpoints), so a model
built for inference fuses and loads as is. A training recipe sets it to 0 with ``model.set_act_ramp(0.0)`` and
raises it each epoch (the official recipe: linearly to 1 over ``decay_epochs=100``). ``deploy=True`` builds the
fused structure directly, to load checkpoints written by the official ``switch_to_deploy``.

Differs from the paper: none. ``features_only`` gives one map per layer after the stem (the strides of the
layers, so VanillaNet-5 has no stride-4 map). The ``ada_pool`` variant (adaptive max-pool to fixed sizes, tied to
one input size) is left out. Follows huawei-noah/VanillaNet ``models/vanillanet.py`` (MIT); the state-dict
layout is the official one in both forms (``stem1``/``stem2``/``cls1``/``cls2`` at train time, ``stem``/``cls``
after fusion), so official checkpoints load with no remap.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import fold_bn, is_meta
from visionzoo.registry import Paper, Variant, register_family

__all__ = ["VanillaNet"]


def _bn(dim: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(dim, eps=1e-6)


@torch.no_grad()
def _then_1x1(first: nn.Conv2d, second: nn.Conv2d) -> nn.Conv2d:
    """One conv computing ``second(first(x))``, where ``second`` is a 1x1 conv; both have a bias."""
    w2 = second.weight.flatten(1)  # (O, C, 1, 1) -> (O, C)
    w = first.weight
    fused = nn.Conv2d(first.in_channels, second.out_channels, first.kernel_size, first.stride, first.padding,
                      device=w.device, dtype=w.dtype)
    fused.weight.copy_(torch.einsum("oc,cikl->oikl", w2, w))
    fused.bias.copy_(w2 @ first.bias + second.bias)
    return fused


class VanillaNetAct(nn.Module):
    """Series informed activation: ReLU, then a depthwise (2n+1)x(2n+1) conv with BN (train) or a bias (deploy)."""

    def __init__(self, dim: int, act_num: int = 3, deploy: bool = False) -> None:
        super().__init__()
        self.act_num = act_num
        self.weight = nn.Parameter(torch.empty(dim, 1, 2 * act_num + 1, 2 * act_num + 1))
        if deploy:
            self.bias = nn.Parameter(torch.zeros(dim))
            self.bn = None
        else:
            self.register_parameter("bias", None)
            self.bn = _bn(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(F.relu(x), self.weight, self.bias, padding=self.act_num, groups=self.weight.shape[0])
        return x if self.bn is None else self.bn(x)

    @torch.no_grad()
    def fuse(self) -> None:
        if self.bn is None:
            return
        bn = self.bn
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        self.weight = nn.Parameter(self.weight * scale.reshape(-1, 1, 1, 1))
        self.bias = nn.Parameter(bn.bias - bn.running_mean * scale)
        self.bn = None


class VanillaNetBlock(nn.Module):
    """One layer: 1x1 conv (two with BN and leaky_relu(act_learn) between at train time), max-pool, activation."""

    def __init__(self, dim: int, out_dim: int, stride: int = 1, act_num: int = 3, deploy: bool = False,
                 act_learn: float = 1.0) -> None:
        super().__init__()
        self.deploy = deploy
        self.act_learn = act_learn
        if deploy:
            self.conv = nn.Conv2d(dim, out_dim, 1)
        else:
            self.conv1 = nn.Sequential(nn.Conv2d(dim, dim, 1), _bn(dim))
            self.conv2 = nn.Sequential(nn.Conv2d(dim, out_dim, 1), _bn(out_dim))
        self.pool = nn.MaxPool2d(stride) if stride > 1 else nn.Identity()
        self.act = VanillaNetAct(out_dim, act_num, deploy)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            x = self.conv(x)
        else:
            x = self.conv2(F.leaky_relu(self.conv1(x), self.act_learn))
        return self.act(self.pool(x))

    def fuse(self) -> None:
        if self.deploy:
            return
        self.conv = _then_1x1(fold_bn(*self.conv1), fold_bn(*self.conv2))
        del self.conv1, self.conv2
        self.act.fuse()
        self.deploy = True


class VanillaNet(Backbone):
    """VanillaNet: a 4x4/4 conv stem, then plain layers (1x1 conv, max-pool, activation), then a 1x1-conv head.

    Args:
        dims: the stem width, then the output width of each layer (``len(strides) + 1`` entries).
        strides: the max-pool stride of each layer (1 = no pool).
        act_num: the activation's depthwise kernel is ``2 * act_num + 1``.
        deploy: build the fused (inference) structure, as after ``fuse()``.
        act_learn: slope of the leaky_relu between paired convs; 0 starts deep training, 1 is a trained network.
    """

    kind = "convnet"
    cpu_channels_last = True  # oneDNN convs are faster on NHWC (see Backbone)

    def __init__(self, dims: tuple[int, ...] = (512, 1024, 2048, 4096), strides: tuple[int, ...] = (2, 2, 2),
                 act_num: int = 3, deploy: bool = False, act_learn: float = 1.0, *, in_chans: int = 3,
                 num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if len(dims) != len(strides) + 1 or not strides:
            raise ValueError(f"vanillanet: dims needs one entry more than strides (the stem width first), got "
                             f"dims={tuple(dims)} and strides={tuple(strides)}")
        if any(s < 1 for s in strides):
            raise ValueError(f"vanillanet: every stride must be >= 1, got strides={tuple(strides)}")
        if drop_path_rate:
            raise ValueError(f"vanillanet: drop_path_rate must be 0 (the network has no residual branch to drop), "
                             f"got {drop_path_rate}")
        self._check_ramp(act_learn)
        if deploy and act_learn != 1.0:
            raise ValueError(f"vanillanet: a deploy=True model is already fused, so act_learn must be 1.0, got "
                             f"{act_learn}")
        self.in_chans = in_chans
        self.deploy = deploy
        self.act_learn = act_learn
        self.drop_rate = drop_rate
        if deploy:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), VanillaNetAct(dims[0], act_num, True))
        else:
            self.stem1 = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), _bn(dims[0]))
            self.stem2 = nn.Sequential(nn.Conv2d(dims[0], dims[0], 1), _bn(dims[0]), VanillaNetAct(dims[0], act_num))
        self.first_conv = "stem.0" if deploy else "stem1.0"

        self.stages = nn.ModuleList()
        infos, reduction = [], 4
        for i, stride in enumerate(strides):
            self.stages.append(VanillaNetBlock(dims[i], dims[i + 1], stride, act_num, deploy, act_learn))
            reduction *= stride
            infos.append(FeatureInfo(dims[i + 1], reduction, f"stages.{i}"))
        self.set_feature_info(infos)
        self.input_multiple = self.min_input_size = reduction

        self.num_features = self.head_hidden_size = dims[-1]
        self._make_head(num_classes)
        self.apply(_init_weights)

    # --- head: pool, dropout, then 1x1 conv + BN, leaky_relu, 1x1 conv (train) or one 1x1 conv (deploy) -------
    def _make_head(self, num_classes: int) -> None:
        dim = self.num_features
        pool_drop = [nn.AdaptiveAvgPool2d(1), nn.Dropout(self.drop_rate)]
        for name in ("cls", "cls1", "cls2"):
            if hasattr(self, name):
                delattr(self, name)
        if self.deploy:
            self.cls = nn.Sequential(*pool_drop, *([nn.Conv2d(dim, num_classes, 1)] if num_classes else []))
            self.classifier = "cls.2"
        else:
            self.cls1 = nn.Sequential(*pool_drop, *([nn.Conv2d(dim, num_classes, 1), _bn(num_classes)]
                                                    if num_classes else []))
            self.cls2 = nn.Sequential(nn.Conv2d(num_classes, num_classes, 1)) if num_classes else nn.Sequential()
            self.classifier = ("cls1.2", "cls1.3", "cls2.0")
        self.num_classes = num_classes

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        head = self.cls if self.deploy else self.cls1
        x = head[1](head[0](x))  # pool + dropout: (B, C, H, W) -> (B, C, 1, 1)
        if pre_logits or not self.num_classes:
            return x.flatten(1)  # (B, C, 1, 1) -> (B, C)
        if self.deploy:
            x = head[2](x)
        else:
            x = self.cls2(F.leaky_relu(head[3](head[2](x)), self.act_learn))
        return x.flatten(1)  # (B, K, 1, 1) -> (B, K)

    def get_classifier(self) -> nn.Module:
        if not self.num_classes:
            return nn.Identity()
        return self.cls[2] if self.deploy else self.cls2[0]

    def reset_classifier(self, num_classes: int) -> None:
        if num_classes < 0:
            raise ValueError(f"{self.name}: num_classes must be >= 0, got {num_classes}")
        w = self.stages[0].act.weight
        with torch.device(w.device):
            self._make_head(num_classes)
        for m in (self.cls,) if self.deploy else (self.cls1, self.cls2):
            m.to(w.dtype).apply(_init_weights)

    # --- body ------------------------------------------------------------------------------------------
    def forward_stem(self, x: Tensor) -> Tensor:
        if self.deploy:
            return self.stem(x)
        return self.stem2(F.leaky_relu(self.stem1(x), self.act_learn))

    # --- deep training and re-parameterisation -----------------------------------------------------------
    @staticmethod
    def _check_ramp(value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"vanillanet: act_learn (the deep-training ramp) must be in [0, 1], got {value}")

    def set_act_ramp(self, value: float) -> None:
        """Set ``act_learn``, the leaky_relu slope between paired convs: 0 at the start of training, 1 when done."""
        self._check_ramp(value)
        if self.deploy and value != 1.0:
            raise ValueError(f"{self.name}: the model is in deploy form (fused), where act_learn is fixed at 1.0; "
                             f"got {value}")
        self.act_learn = float(value)
        for block in self.stages:
            block.act_learn = float(value)

    def fuse(self) -> VanillaNet:
        """Merge each conv pair and fold every BatchNorm, in place (the official ``switch_to_deploy``)."""
        if self.deploy:
            return self
        ramps = {self.act_learn, *(b.act_learn for b in self.stages)}
        if ramps != {1.0}:
            raise ValueError(f"{self.name}: fuse() is exact only when the deep-training ramp has reached 1 "
                             f"(leaky_relu is then the identity), but act_learn is {sorted(ramps)}; call "
                             f"model.set_act_ramp(1.0) when training is done, then fuse()")
        conv, act = fold_bn(*self.stem1), self.stem2[2]
        act.fuse()
        self.stem = nn.Sequential(_then_1x1(conv, fold_bn(*self.stem2[:2])), act)
        del self.stem1, self.stem2
        for block in self.stages:
            block.fuse()
        head = list(self.cls1)
        if self.num_classes:
            head[2:] = [_then_1x1(fold_bn(*head[2:4]), self.cls2[0])]
        del self.cls1, self.cls2
        self.cls = nn.Sequential(*head)
        self.deploy = True
        self.first_conv, self.classifier = "stem.0", "cls.2"
        if self.variant is not None:  # a saved fused model rebuilds in deploy form
            self.variant = (self.variant[0], {**self.variant[1], "deploy": True})
        return self

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Keep this model's head BN statistics when the checkpoint's class count differs (the head is re-made)."""
        own = self.state_dict()
        for k in [k for k in state_dict if k.startswith("cls1.3.") and not k.endswith(("weight", "bias"))]:
            if k not in own:
                del state_dict[k]
            elif own[k].shape != state_dict[k].shape:
                state_dict[k] = own[k]
        deploy_ckpt = "stem.0.weight" in state_dict
        if deploy_ckpt != self.deploy:
            hint = ("build with deploy=True" if deploy_ckpt else "build with deploy=False, load, then call fuse()")
            warnings.warn(f"{self.name}: the checkpoint is in {'deploy' if deploy_ckpt else 'train'} form and the "
                          f"model in {'deploy' if self.deploy else 'train'} form; {hint}", stacklevel=3)
        return state_dict


def _init_weights(m: nn.Module) -> None:
    if is_meta(m):
        return
    if isinstance(m, nn.Conv2d):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, VanillaNetAct):
        nn.init.trunc_normal_(m.weight, std=0.02)


def _deep(layers: int, width: int = 4) -> dict:
    """VanillaNet-7..13: widths 128/128/256 x ``width``, ``layers - 6`` layers at 512 x, two at 1024 x."""
    dims = (128 * width, 128 * width, 256 * width, *[512 * width] * (layers - 6), 1024 * width, 1024 * width)
    return dict(dims=dims, strides=(1, 2, 2, *[1] * (layers - 7), 2, 1))


_README = "official README 'ImageNet-1K trained models' (params/FLOPs of the deploy form)"
_NOTE = ("params_m: official train-time model (conv pairs, BNs); deploy_params_m: after fuse(), equal to the "
         "official switch_to_deploy / deploy=True model. gmacs: fvcore count of the official train-time model at 224 "
         "(it also counts BN; ours, convs only, is ~0.3% lower); deploy_gmacs: fvcore count of the deploy model")


def _row(args: dict, params_m: float, gmacs: float | None, deploy_params_m: float, deploy_gmacs: float,
         paper: tuple[float, float, float], notes: str = _NOTE) -> Variant:
    """A full-size variant: exact train / deploy counts of the official model, README (params, GFLOPs, top-1)."""
    return Variant(args, params_m=params_m, gmacs=gmacs, deploy_params_m=deploy_params_m, deploy_gmacs=deploy_gmacs,
                   paper=Paper(*paper, source=_README), notes=notes)


VARIANTS = {
    "vanillanet_test":    Variant(dict(dims=(16, 32, 64, 128), strides=(2, 2, 2)), input_size=64,
                                  notes="tiny config for tests; with 1000 classes the head alone is 1.13M params"),
    "vanillanet_5":       _row(dict(dims=(512, 1024, 2048, 4096), strides=(2, 2, 2)),
                               22.328800, 8.480, 15.523304, 5.161, (15.5, 5.2, 72.49)),
    "vanillanet_6":       _row(dict(dims=(512, 1024, 2048, 4096, 4096), strides=(2, 2, 2, 1)),
                               56.116704, 10.135, 32.509416, 5.993, (32.5, 6.0, 76.36)),
    "vanillanet_7":       _row(_deep(7), 56.670176, 11.868, 32.797672, 6.894, (32.8, 6.9, 77.98)),
    "vanillanet_8":       _row(_deep(8), 65.175520, 13.534, 37.096424, 7.736, (37.1, 7.7, 79.13)),
    "vanillanet_9":       _row(_deep(9), 73.680864, 15.200, 41.395176, 8.578, (41.4, 8.6, 79.87)),
    "vanillanet_10":      _row(_deep(10), 82.186208, 16.866, 45.693928, 9.419, (45.7, 9.4, 80.57)),
    "vanillanet_11":      _row(_deep(11), 90.691552, 18.533, 49.992680, 10.261, (50.0, 10.3, 81.08)),
    "vanillanet_12":      _row(_deep(12), 99.196896, 20.199, 54.291432, 11.103, (54.3, 11.1, 81.55)),
    "vanillanet_13":      _row(_deep(13), 107.702240, 21.865, 58.590184, 11.945, (58.6, 11.9, 82.05)),
    "vanillanet_13_x1_5": _row(_deep(13, width=6), 236.942048, None, 127.796200, 26.549, (127.8, 26.5, 82.53),
                               notes=_NOTE.replace("fvcore count of the official train-time model at 224",
                                                   "not known (ours: 48.746 at 224)")),
}
register_family(VanillaNet, VARIANTS, paper="arXiv:2305.12972", kind="convnet", family="vanillanet")
