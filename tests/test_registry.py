"""The registry: names, families, variant records, create_model arguments."""
from __future__ import annotations

import pytest

import visionzoo
from visionzoo.registry import KINDS, get_variant, list_families

ALL = visionzoo.list_models(include_test=True)


def test_names_unique_and_prefixed_by_family():
    assert len(ALL) == len(set(ALL))
    for name in ALL:
        v = get_variant(name)
        assert name.startswith(v.family), f"{name} does not start with its family {v.family}"
        assert name == name.lower()


def test_every_family_has_a_test_variant():
    for fam in list_families():
        assert f"{fam.name}_test" in fam.variants, fam.name
        assert fam.kind in KINDS


@pytest.mark.parametrize("name", ALL)
def test_variant_records(name):
    v = get_variant(name)
    for val in v.args.values():
        assert isinstance(val, (int, float, str, bool, tuple, type(None))), (name, val)
    if not name.endswith("_test"):
        assert v.params_m is not None, f"{name}: params_m (official exact count) missing"
        assert v.paper.source, f"{name}: the paper numbers need a source"
        assert v.paper.params_m is not None or v.paper.top1 is not None, f"{name}: no reported numbers"
    assert len(v.mean) == 3 and len(v.std) == 3 and 0 < v.crop_pct <= 1


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean.*convnext_tiny"):
        visionzoo.create_model("convnext_tiyn")


def test_list_models_patterns_and_filters():
    assert "convnext_tiny" in visionzoo.list_models("convnext_*")
    assert all(n.startswith("swin") for n in visionzoo.list_models("swin*"))
    assert visionzoo.list_models("*", family="resnet") == visionzoo.list_models("resnet*")
    assert not [n for n in visionzoo.list_models(exclude_test=True) if n.endswith("_test")]
    both = visionzoo.list_models(["resnet50", "convnext_tiny"])
    assert set(both) == {"resnet50", "convnext_tiny"}


def test_unknown_override_is_named():
    with pytest.raises(TypeError, match="unknown argument.*bogus"):
        visionzoo.create_model("convnext_test", bogus=3)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        visionzoo.create_model("convnext_test", num_classes=-1)


def test_out_indices_needs_features_only():
    with pytest.raises(ValueError, match="features_only"):
        visionzoo.create_model("convnext_test", out_indices=(0, 1))


def test_model_info_has_sources():
    info = visionzoo.model_info("convnext_tiny")
    assert info["paper"]["source"] and info["params_m"] > 28
    assert info["input_size"] == (3, 224, 224)
