"""Variant tables, one registration call per family, and ``create_model``."""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionzoo.errors import ArgumentError, UnknownArgumentError, UnknownModelError, VisionZooError

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
    code: str | None = ""


_VARIANTS: dict[str, Variant] = {}
_FAMILIES: dict[str, Family] = {}


def register_family(cls: type[nn.Module], variants: dict[str, Variant], *, paper: str, kind: str,
                    family: str | None = None, code: str | None = "") -> None:
    """Register every row of a family's variant table under its name.

    ``family`` defaults to the module's short name (``visionzoo.models.convnext`` -> ``convnext``). ``code`` names
    the reference implementation the family follows (a parity fixture in ``tests/fixtures`` is then required);
    ``None`` declares that no official code exists, so the family is built from the paper's text and its
    numbers are the paper's (the variant ``notes`` say which section each choice comes from).
    """
    family = family or cls.__module__.rsplit(".", 1)[-1]
    if kind not in KINDS:
        raise ValueError(f"register_family({family}): kind must be one of {KINDS}, got {kind!r}")
    if code is None and not all(v.notes for v in variants.values()):
        raise ValueError(f"register_family({family}): a family built from the paper (code=None) says in every "
                         f"variant's notes where its structure comes from")
    if family in _FAMILIES:
        raise ValueError(f"family {family!r} is registered twice")
    for name, v in variants.items():
        if name in _VARIANTS:
            raise ValueError(f"model {name!r} is registered twice ({_VARIANTS[name].family} and {family})")
        _VARIANTS[name] = replace(v, name=name, family=family, cls=cls, kind=kind)
    _FAMILIES[family] = Family(family, cls, paper, kind, tuple(variants), code)


def _ensure_loaded() -> None:
    import visionzoo.models  # noqa: F401  (imports every family, which registers itself)


def list_families() -> list[Family]:
    _ensure_loaded()
    return list(_FAMILIES.values())


def list_models(pattern: str | list[str] = "*", family: str | None = None, kind: str | None = None,
                include_test: bool | None = None, exclude_test: bool | None = None) -> list[str]:
    """Registered names matching an fnmatch ``pattern`` (or any of several), in registration order.

    The tiny ``*_test`` variants (for tests) are left out, as ``visionzoo list`` leaves them out, unless
    ``include_test=True`` or every pattern names test variants (``"*_test"``, ``"convnext_test"``).
    ``exclude_test`` is the older spelling (``exclude_test=False`` is ``include_test=True``).
    """
    _ensure_loaded()
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    if include_test is None:
        include_test = (not exclude_test) if exclude_test is not None else all(p.endswith("_test") for p in patterns)
    out = []
    for name, v in _VARIANTS.items():
        if family is not None and v.family != family:
            continue
        if kind is not None and v.kind != kind:
            continue
        if not include_test and name.endswith("_test"):
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
        raise UnknownModelError(f"unknown model {name!r}; {hint}see visionzoo.list_models('{name[:4]}*') or "
                                f"`visionzoo list '{name[:4]}*'`")
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
        raise UnknownArgumentError(f"{name}: unknown argument(s) {unknown}; {v.cls.__name__} takes {allowed}")
    return args


def create_model(name: str, *, pretrained: bool | str = False, num_classes: int = 1000, in_chans: int = 3,
                 img_size: int | None = None, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 features_only: bool = False, out_indices: tuple[int, ...] | list[int] | None = None,
                 checkpoint_path: str | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a registered name (``visionzoo.list_models()``), optionally with a weights tag
            (``"convnext_tiny.fb_in1k"``) that ``pretrained=True`` then loads.
        pretrained: ``True`` loads the variant's default ImageNet weights, a string loads those of that tag
            (``visionzoo weights NAME --tags`` lists them). They are downloaded on first use into
            ``$VISIONZOO_CACHE`` (see ``visionzoo.pretrained``); the model takes their preprocessing in
            ``model.data_config``. Another ``num_classes`` keeps the backbone and re-initialises the classifier.
        img_size: build for this input size (position tables, windows); the variant's size when ``None``. A size
            the model cannot take is refused here, with the message its forward would give.
        features_only: return a model whose ``forward`` gives a list of NCHW maps, one per ``out_indices``.
        checkpoint_path: our format (``.safetensors``), a timm-layout or an official-layout state dict.
        overrides: any structural argument of the family's constructor (``depths=(1, 1, 1, 1)``).
    """
    from visionzoo.pretrained import split_name

    name, tag = split_name(name)  # registered names have no dot
    v = get_variant(name)
    if not isinstance(pretrained, (bool, str)):
        raise ArgumentError(f"{name}: pretrained must be True, False or a weights tag, got {pretrained!r}")
    if num_classes < 0:
        raise ArgumentError(f"{name}: num_classes must be >= 0, got {num_classes}")
    if in_chans < 1:
        raise ArgumentError(f"{name}: in_chans must be >= 1, got {in_chans}")
    spec = weights_file = None
    if pretrained is not False or tag is not None:
        from visionzoo.pretrained import download, get_weights

        spec = get_weights(name if tag is None else f"{name}.{tag}", pretrained if pretrained is not False else True)
        if pretrained is not False:
            if checkpoint_path is not None:
                raise ArgumentError(f"{name}: give pretrained= or checkpoint_path=, not both")
            weights_file = download(spec)  # before the build: a missing file should not cost a build first
        if img_size is None and getattr(v.cls, "takes_img_size", False) and spec.input_size != v.input_size:
            img_size = spec.input_size
    args = build_kwargs(name, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                        drop_path_rate=drop_path_rate, img_size=img_size, **overrides)
    model = _construct(name, v.cls, args)
    model.variant = (name, args)
    model.data_config = spec.data_config(in_chans) if spec is not None else v.data_config
    if img_size is not None:
        if hasattr(model, "check_input"):  # the forward's own message, before any forward runs
            try:
                model.check_input(torch.empty(1, in_chans, img_size, img_size, device="meta"))
            except ValueError as e:
                raise ArgumentError(str(e)) from None
        model.data_config["input_size"] = (in_chans, img_size, img_size)
    if weights_file is not None:
        from visionzoo.weights import load_checkpoint

        load_checkpoint(model, weights_file, state_key=spec.state_key)
    elif checkpoint_path is not None:
        from visionzoo.weights import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    if features_only:
        try:
            model.set_features_only(out_indices)
        except ValueError as e:
            raise ArgumentError(str(e)) from None
    elif out_indices is not None:
        raise ArgumentError(f"{name}: out_indices is only used with features_only=True")
    return model


def _construct(name: str, cls: type[nn.Module], args: dict[str, Any]) -> nn.Module:
    """``cls(**args)``; a ValueError or TypeError the family raises about its arguments becomes ours, naming ``name``.

    Only errors raised in visionzoo's own code (the checks families make, per the style guide) or by the call
    itself are turned into ``ArgumentError``/``UnknownArgumentError``; others are bugs and keep their traceback.
    """
    try:
        return cls(**args)
    except VisionZooError:
        raise
    except (ValueError, TypeError) as e:
        tb = e.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        where = tb.tb_frame.f_code.co_filename
        ours = tb is e.__traceback__ or "visionzoo" in Path(where).parts
        if not ours:
            raise
        msg = str(e) if str(e).startswith(name) else f"{name}: {e}"
        raise (ArgumentError if isinstance(e, ValueError) else UnknownArgumentError)(msg) from e
