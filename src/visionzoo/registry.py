"""Variant tables, one registration call per family, and ``create_model``."""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
KINDS = ("convnet", "vit", "hybrid")


@dataclass(frozen=True)
class Paper:
    """Numbers a paper (or its official repo) reports for a variant, and where each comes from.

    ``gmacs`` are multiply-accumulates (most papers call them FLOPs); ``top1`` is ImageNet-1k top-1 at
    ``img_size`` (the variant's input size when ``None``).
    """

    params_m: float | None = None
    gmacs: float | None = None
    top1: float | None = None
    source: str = ""
    img_size: int | None = None


@dataclass(frozen=True)
class Variant:
    """One row of a family's variant table.

    ``args`` holds the structural constructor arguments (plain data only). ``params_m`` is the exact
    parameter count of the official (or timm) implementation with a 1000-class head, in millions, which
    the tests check ours against; ``gmacs`` is the official implementation's MAC count at ``input_size``
    when known. ``paper`` holds the rounded figures the paper reports. Re-parameterisable families also
    record the official deploy form (after ``model.fuse()``) in ``deploy_params_m`` / ``deploy_gmacs``.
    """

    args: dict[str, Any]
    params_m: float | None = None
    gmacs: float | None = None
    deploy_params_m: float | None = None
    deploy_gmacs: float | None = None
    paper: Paper = field(default_factory=Paper)
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    notes: str = ""
    # filled in by register_family
    name: str = ""
    family: str = ""
    cls: type[nn.Module] | None = field(default=None, repr=False)
    kind: str = ""

    @property
    def data_config(self) -> dict[str, Any]:
        return dict(input_size=(3, self.input_size, self.input_size), mean=self.mean, std=self.std,
                    crop_pct=self.crop_pct, interpolation=self.interpolation)


@dataclass(frozen=True)
class Family:
    name: str
    cls: type[nn.Module]
    paper: str
    kind: str
    variants: tuple[str, ...]


_VARIANTS: dict[str, Variant] = {}
_FAMILIES: dict[str, Family] = {}


def register_family(cls: type[nn.Module], variants: dict[str, Variant], *, paper: str, kind: str,
                    family: str | None = None) -> None:
    """Register every row of a family's variant table under its name.

    ``family`` defaults to the module's short name (``visionzoo.models.convnext`` -> ``convnext``).
    """
    family = family or cls.__module__.rsplit(".", 1)[-1]
    if kind not in KINDS:
        raise ValueError(f"register_family({family}): kind must be one of {KINDS}, got {kind!r}")
    if family in _FAMILIES:
        raise ValueError(f"family {family!r} is registered twice")
    for name, v in variants.items():
        if name in _VARIANTS:
            raise ValueError(f"model {name!r} is registered twice ({_VARIANTS[name].family} and {family})")
        _VARIANTS[name] = replace(v, name=name, family=family, cls=cls, kind=kind)
    _FAMILIES[family] = Family(family, cls, paper, kind, tuple(variants))


def _ensure_loaded() -> None:
    import visionzoo.models  # noqa: F401  (imports every family, which registers itself)


def list_families() -> list[Family]:
    _ensure_loaded()
    return list(_FAMILIES.values())


def list_models(pattern: str | list[str] = "*", family: str | None = None, kind: str | None = None,
                exclude_test: bool = False) -> list[str]:
    """Registered names matching an fnmatch ``pattern`` (or any of several), in registration order."""
    _ensure_loaded()
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    out = []
    for name, v in _VARIANTS.items():
        if family is not None and v.family != family:
            continue
        if kind is not None and v.kind != kind:
            continue
        if exclude_test and name.endswith("_test"):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            out.append(name)
    return out


def get_variant(name: str) -> Variant:
    """The registered ``Variant`` for ``name``; an unknown name raises with the closest registered names."""
    _ensure_loaded()
    if name not in _VARIANTS:
        close = difflib.get_close_matches(name, list(_VARIANTS), n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown model {name!r}; {hint}see visionzoo.list_models('{name[:4]}*')")
    return _VARIANTS[name]


def model_info(name: str) -> dict[str, Any]:
    """Everything the registry records for ``name``: structure, data config, reported numbers and sources."""
    v = get_variant(name)
    return dict(name=v.name, family=v.family, kind=v.kind, cls=v.cls.__name__, args=dict(v.args),
                params_m=v.params_m, gmacs=v.gmacs, paper=vars(v.paper).copy(), notes=v.notes,
                paper_ref=_FAMILIES[v.family].paper, **v.data_config)


def build_kwargs(name: str, **kwargs: Any) -> dict[str, Any]:
    """The full constructor arguments for ``name`` with ``kwargs`` applied on top of the variant's."""
    v = get_variant(name)
    args = {**v.args, **kwargs}
    params = inspect.signature(v.cls.__init__).parameters
    takes_img_size = getattr(v.cls, "takes_img_size", False)
    if args.get("img_size") is None:
        args.pop("img_size", None)
        if takes_img_size:
            args["img_size"] = v.input_size
    elif not takes_img_size:
        args.pop("img_size")  # ConvNets take any size that is a multiple of their stride
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in args if k not in params] if not accepts_any else []
    if unknown:
        allowed = sorted(k for k in params if k != "self")
        raise TypeError(f"{name}: unknown argument(s) {unknown}; {v.cls.__name__} takes {allowed}")
    return args


def create_model(name: str, *, num_classes: int = 1000, in_chans: int = 3, img_size: int | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, features_only: bool = False,
                 out_indices: tuple[int, ...] | list[int] | None = None, checkpoint_path: str | None = None,
                 **overrides: Any) -> nn.Module:
    """Build a registered model.

    Args:
        img_size: build for this input size (position tables, windows); the variant's size when ``None``.
        features_only: return a model whose ``forward`` gives a list of NCHW maps, one per ``out_indices``.
        checkpoint_path: our format (``.safetensors``), a timm-layout or an official-layout state dict.
        overrides: any structural argument of the family's constructor (``depths=(1, 1, 1, 1)``).
    """
    v = get_variant(name)
    if num_classes < 0:
        raise ValueError(f"{name}: num_classes must be >= 0, got {num_classes}")
    if in_chans < 1:
        raise ValueError(f"{name}: in_chans must be >= 1, got {in_chans}")
    args = build_kwargs(name, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                        drop_path_rate=drop_path_rate, img_size=img_size, **overrides)
    model = v.cls(**args)
    model.variant = (name, args)
    model.data_config = v.data_config
    if img_size is not None:
        model.data_config["input_size"] = (in_chans, img_size, img_size)
    if checkpoint_path is not None:
        from visionzoo.weights import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    if features_only:
        model.set_features_only(out_indices)
    elif out_indices is not None:
        raise ValueError(f"{name}: out_indices is only used with features_only=True")
    return model
