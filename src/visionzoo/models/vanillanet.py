"""VanillaNet, from "VanillaNet: the Power of Minimalism in Deep Learning" (Chen et al., 2023).
https://arxiv.org/abs/2305.12972

A plain stack of layers: no residuals, no attention. Each layer is a 1x1 conv, an optional max-pool and the
"series informed activation" (ReLU, then a depthwise (2n+1)x(2n+1) conv). At train time every 1x1 conv is a pair
of 1x1 convs with BatchNorm and a ``leaky_relu(x, act_learn)`` between them ("deep training"): ``act_learn``
ramps from 0 (a ReLU, two non-linear layers) to 1 (identity) over the first epochs, after which each pair is one
linear map. ``fuse()`` then merges every pair and folds every BatchNorm, as the official ``switch_to_deploy`` (each
layer's and the head's own ``fuse()``, run by ``Backbone.fuse()``).

``act_learn`` defaults to 1.0, the state of a trained network (and of the released checkpoints), so a model
built for inference fuses and loads as is. A training recipe sets it to 0 with ``model.set_act_ramp(0.0)`` and
raises it each epoch (the official recipe: linearly to 1 over ``decay_epochs=100``). ``deploy=True`` builds the
fused structure directly; a deploy-form checkpoint (the official ``switch_to_deploy``, or ours after ``fuse()``)
loaded into a train-form model fuses the model first.

Differs from the paper: none. ``features_only`` gives one map per layer after the stem (the strides of the
layers, so VanillaNet-5 has no stride-4 map). The ``ada_pool`` variant (adaptive max-pool to fixed sizes, tied to
one input size) is left out. Follows huawei-noah/VanillaNet ``models/vanillanet.py`` (MIT). The layers keep the
official keys in both forms; the stem is one layer module (``stem.conv1``/``stem.conv2``/``stem.act``, or
``stem.conv``/``stem.act`` fused) and the head one ``ClassifierHead`` (``head.pre_logits`` = the hidden 1x1 conv
and BN, ``head.fc`` = the last 1x1 conv, both as Linears), so official checkpoints load through ``VanillaNet.remap``.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionzoo.backbone import Backbone, FeatureInfo
from visionzoo.layers import ClassifierHead, fold_conv_bn_children, init_linear, is_meta
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
    """One layer: conv (two with BN and leaky_relu(act_learn) between at train time), max-pool, activation.

    The first conv is 1x1 (``dim -> dim``), or for the stem a ``patch_size`` patchify conv (``dim -> out_dim``,
    the official ``stem1``); the second is a 1x1 conv to ``out_dim``. ``fuse()`` merges the pair into ``conv``.
    """

    def __init__(self, dim: int, out_dim: int, stride: int = 1, act_num: int = 3, deploy: bool = False,
                 act_learn: float = 1.0, patch_size: int = 1) -> None:
        super().__init__()
        self.deploy = deploy
        self.act_learn = act_learn
        if deploy:
            self.conv = nn.Conv2d(dim, out_dim, patch_size, stride=patch_size)
        else:
            mid = dim if patch_size == 1 else out_dim
            self.conv1 = nn.Sequential(nn.Conv2d(dim, mid, patch_size, stride=patch_size), _bn(mid))
            self.conv2 = nn.Sequential(nn.Conv2d(mid, out_dim, 1), _bn(out_dim))
        self.pool = nn.MaxPool2d(stride) if stride > 1 else nn.Identity()
        self.act = VanillaNetAct(out_dim, act_num, deploy)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            x = self.conv(x)
        else:
            x = self.conv2(F.leaky_relu(self.conv1(x), self.act_learn))
        return self.act(self.pool(x))

    def fuse(self) -> None:
        """Merge the conv pair (BN-folded) into one conv, in place (the official ``switch_to_deploy``)."""
        if self.deploy:
            return
        _check_ramp_done(self.act_learn)
        for pair in (self.conv1, self.conv2):
            fold_conv_bn_children(pair)  # a no-op under Backbone.fuse(), which has folded them already
        self.conv = _then_1x1(self.conv1[0], self.conv2[0])
        del self.conv1, self.conv2
        self.act.fuse()
        self.deploy = True


class VanillaNetHidden(nn.Module):
    """The hidden layer of the train-form head, on pooled (B, C) features: dropout, the official 1x1 conv to
    ``num_classes`` (a Linear here), BN, leaky_relu(act_learn)."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0, act_learn: float = 1.0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.act_learn = act_learn
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes, device=device, dtype=dtype)
        self.norm = nn.BatchNorm1d(num_classes, eps=1e-6, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.norm(self.fc(self.drop(x))), self.act_learn)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the BN into the Linear before it."""
        bn = self.norm
        if not isinstance(bn, nn.BatchNorm1d):
            return
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        fc = nn.Linear(self.fc.in_features, self.fc.out_features, device=scale.device, dtype=scale.dtype)
        fc.weight.copy_(self.fc.weight * scale[:, None])
        fc.bias.copy_((self.fc.bias - bn.running_mean) * scale + bn.bias)
        self.fc, self.norm = fc, nn.Identity()


class VanillaNetHead(ClassifierHead):
    """Average pool, dropout, then two 1x1 convs (Linears on the pooled features) with BN and leaky_relu(act_learn)
    between them at train time (the first three as ``pre_logits``, ``hidden_size = num_classes``), or one after
    ``fuse()`` (deploy form: ``pre_logits`` empty, ``fc`` from the pooled features)."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0, deploy: bool = False,
                 act_learn: float = 1.0) -> None:
        hidden = VanillaNetHidden(dim, num_classes, drop_rate, act_learn) if num_classes and not deploy else None
        # NOTE: with a hidden layer the dropout is its first step (before the hidden conv, as the official head)
        super().__init__(dim, num_classes, "avg", 0.0 if hidden else drop_rate, pre_logits=hidden,
                         hidden_size=num_classes if hidden else None)
        self.drop_rate = drop_rate
        self.deploy = deploy
        self.act_learn = act_learn

    def reset(self, num_classes: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        """A fresh classifier of ``num_classes`` outputs; in train form its hidden layer (``num_classes`` wide) too."""
        hidden = None
        if num_classes > 0 and not self.deploy:
            hidden = VanillaNetHidden(self.in_features, num_classes, self.drop_rate, self.act_learn, device, dtype)
            hidden.apply(init_linear).train(self.training)
        self.pre_logits = hidden if hidden is not None else nn.Identity()
        self.drop = nn.Dropout(0.0 if hidden else self.drop_rate)
        self.hidden_size = num_classes if hidden else self.in_features
        super().reset(num_classes, device, dtype)

    @torch.no_grad()
    def fuse(self) -> None:
        """Merge the hidden Linear (BN-folded) and ``fc`` into one ``fc`` from the pooled features (deploy form)."""
        if self.deploy:
            return
        hidden = self.pre_logits
        if isinstance(hidden, VanillaNetHidden):
            _check_ramp_done(hidden.act_learn)
            hidden.fuse()  # a no-op under Backbone.fuse(), which has run it already
            first, second = hidden.fc, self.fc
            fc = nn.Linear(first.in_features, second.out_features, device=first.weight.device,
                           dtype=first.weight.dtype)
            fc.weight.copy_(second.weight @ first.weight)
            fc.bias.copy_(second.weight @ first.bias + second.bias)
            self.pre_logits, self.drop, self.fc = nn.Identity(), hidden.drop, fc
            self.hidden_size = self.in_features
        self.deploy = True


class VanillaNet(Backbone):
    """VanillaNet: a 4x4/4 conv stem layer, then plain layers (1x1 conv, max-pool, activation), then a 1x1-conv head.

    Args:
        dims: the stem width, then the output width of each layer (``len(strides) + 1`` entries).
        strides: the max-pool stride of each layer (1 = no pool).
        act_num: the activation's depthwise kernel is ``2 * act_num + 1``.
        deploy: build the fused (inference) structure, as after ``fuse()``.
        act_learn: slope of the leaky_relu between paired convs; 0 starts deep training, 1 is a trained network.
    """

    kind = "convnet"
    cpu_channels_last = True  # oneDNN convs are faster on NHWC (see Backbone)
    # NOTE: the hidden layer of the train-form head is num_classes wide, so a checkpoint of another class count
    # (or reset_classifier) replaces it with the classifier.
    classifier = ("head.pre_logits.fc", "head.pre_logits.norm", "head.fc")

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
        self.act_learn = act_learn
        self.stem = VanillaNetBlock(in_chans, dims[0], 1, act_num, deploy, act_learn, patch_size=4)

        self.stages = nn.ModuleList()
        infos, reduction = [], 4
        for i, stride in enumerate(strides):
            self.stages.append(VanillaNetBlock(dims[i], dims[i + 1], stride, act_num, deploy, act_learn))
            reduction *= stride
            infos.append(FeatureInfo(dims[i + 1], reduction, f"stages.{i}"))
        self.set_feature_info(infos)
        self.input_multiple = self.min_input_size = reduction

        self.init_head(dims[-1], num_classes, head=VanillaNetHead(dims[-1], num_classes, drop_rate, deploy, act_learn))
        self.classifier = type(self).classifier
        self.apply(_init_weights)

    # --- the form (train or deploy) and what follows from it ----------------------------------------------
    @property
    def deploy(self) -> bool:
        """Whether the model is in the fused (deploy) form: built with ``deploy=True``, or after ``fuse()``."""
        return self.stem.deploy

    @property
    def first_conv(self) -> str:
        return "stem.conv" if self.deploy else "stem.conv1.0"

    # --- deep training -------------------------------------------------------------------------------
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
        for m in self._ramp_modules():
            m.act_learn = float(value)

    def _ramp_modules(self) -> list[nn.Module]:
        """The model, its layers (stem included), the head and its hidden layer: all that hold ``act_learn``."""
        return [m for m in self.modules() if isinstance(m, (VanillaNet, VanillaNetBlock, VanillaNetHead,
                                                             VanillaNetHidden))]

    # --- checkpoints -----------------------------------------------------------------------------------
    @staticmethod
    def remap(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official keys -> ours. Train form: ``stem1.*``/``stem2.*`` -> ``stem.conv1.*``/``stem.conv2.*``/
        ``stem.act.*``; ``cls1.2`` -> ``head.pre_logits.fc``, ``cls1.3`` -> ``head.pre_logits.norm``, ``cls2.0`` ->
        ``head.fc``. Deploy form: ``stem.0``/``stem.1`` -> ``stem.conv``/``stem.act``, ``cls.2`` -> ``head.fc``.
        The head's 1x1 conv weights (K, C, 1, 1) become Linear weights (K, C). Keys already ours are kept."""
        out = {}
        for k, v in state_dict.items():
            for old, new in _OFFICIAL_PREFIXES:
                if k.startswith(old):
                    k = new + k[len(old):]
                    if new.startswith("head.") and k.endswith(".weight") and v.ndim == 4:
                        v = v.flatten(1)  # (K, C, 1, 1) -> (K, C)
                    break
            out[k] = v
        return out

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fit a checkpoint to this model: a deploy-form one makes a train-form model fuse first (its weights are
        then replaced); the head BN statistics stay this model's when the class count differs."""
        state_dict = self.remap(state_dict)  # a no-op when the loader has remapped already
        deploy_ckpt = "stem.conv.weight" in state_dict
        if deploy_ckpt and not self.deploy:
            if {m.act_learn for m in self._ramp_modules()} == {1.0}:
                self.fuse()
            else:
                warnings.warn(f"{self.name}: the checkpoint is in deploy form and the model in train form half-way "
                              f"up the deep-training ramp; build with deploy=True", stacklevel=3)
        elif not deploy_ckpt and self.deploy:
            warnings.warn(f"{self.name}: the checkpoint is in train form and the model in deploy form; build with "
                          f"deploy=False, load, then call fuse()", stacklevel=3)
        own = self.state_dict()
        for k in [k for k in state_dict if k.startswith("head.pre_logits.norm.") and
                  not k.endswith(("weight", "bias"))]:
            if k not in own:
                del state_dict[k]
            elif own[k].shape != state_dict[k].shape:
                state_dict[k] = own[k]
        return state_dict


def _check_ramp_done(act_learn: float) -> None:
    if act_learn != 1.0:
        raise ValueError(f"vanillanet: fuse() is exact only when the deep-training ramp has reached 1 (leaky_relu is "
                         f"then the identity), but act_learn is {act_learn}; call model.set_act_ramp(1.0) when "
                         f"training is done, then fuse()")


_OFFICIAL_PREFIXES = (
    ("stem1.", "stem.conv1."), ("stem2.0.", "stem.conv2.0."), ("stem2.1.", "stem.conv2.1."), ("stem2.2.", "stem.act."),
    ("stem.0.", "stem.conv."), ("stem.1.", "stem.act."),
    ("cls1.2.", "head.pre_logits.fc."), ("cls1.3.", "head.pre_logits.norm."), ("cls2.0.", "head.fc."),
    ("cls.2.", "head.fc."),
)


def _init_weights(m: nn.Module) -> None:
    if is_meta(m):
        return
    if isinstance(m, (nn.Conv2d, nn.Linear)):
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
