"""The seams every tool uses (STYLE.md section 3), checked on every ``*_test`` variant: attention, stages,
head, fuse, dtype/device."""
from __future__ import annotations

import pytest
import torch

import visionzoo
from conftest import TEST_MODELS, make_input, randomize_bn
from visionzoo.backbone import Backbone, is_idle
from visionzoo.layers import AttentionCore, ClassifierHead

pytestmark = pytest.mark.parametrize("name", TEST_MODELS)


def test_stages_are_registered_modules(name, tiny_model):
    model = tiny_model(name)
    names = {id(m): n for n, m in model.named_modules()}
    stages = model.stage_modules()
    assert len(stages) == len(model.stage_info)
    for i, (stage, info) in enumerate(zip(stages, model.stage_info)):
        assert isinstance(stage, torch.nn.Module), f"stage {i} is a {type(stage).__name__}, not a module"
        assert id(stage) in names, f"stage {i} is not a registered submodule: hooks on it would be lost"
        assert names[id(stage)] == info.module, (names[id(stage)], info.module)
    assert model.stage_modules()[0] is stages[0], "stage_modules() builds new modules on every call"


def test_one_head_protocol(name, tiny_model):
    model = tiny_model(name)
    if model.output == "image":  # an image-to-image model declares that it has no head
        assert model.output in ("logits", "image") and "head" not in dict(model.named_children())
        with pytest.raises(ValueError, match="no classifier head"):
            model.get_classifier()
        return
    assert isinstance(model.head, ClassifierHead)
    assert model.get_classifier() is model.head.fc
    assert "_linear_head" not in vars(model)


def test_reset_classifier_keeps_device_and_dtype(name):
    with torch.device("meta"):
        model = visionzoo.create_model(name)
    if model.output == "image":
        with pytest.raises(ValueError, match="no classifier head"):
            model.reset_classifier(7)
        return
    model.reset_classifier(7)
    assert model.get_classifier().weight.is_meta and model.get_classifier().out_features == 7
    model = visionzoo.create_model(name, num_classes=3).to(torch.float64)
    model.reset_classifier(5)
    fc = model.get_classifier()
    assert fc.weight.dtype == torch.float64 and fc.out_features == 5
    assert torch.all(fc.bias == 0) and fc.weight.std() < 0.05, "the library's init (trunc-normal 0.02, zero bias)"
    with torch.no_grad():
        assert model(make_input(model).double()).shape == (2, 5)


def test_fuse_is_the_base_walk(name):
    cls = visionzoo.get_variant(name).cls
    assert cls.fuse is Backbone.fuse, f"{cls.__name__} overrides fuse(); give its blocks a fuse() instead"


def test_attention_declared(name, tiny_model):
    model = tiny_model(name)
    cores = [m for m in model.modules() if isinstance(m, AttentionCore)]
    assert model.has_attention == bool(cores), (
        f"{name}: has_attention={model.has_attention} but it has {len(cores)} AttentionCore modules")


def test_record_attention(name, tiny_model):
    model = tiny_model(name)
    randomize_bn(model)
    x = make_input(model)
    if not model.has_attention:
        with pytest.raises(ValueError, match="no softmax attention"):
            visionzoo.explain.record_attention(model)
        return
    with torch.no_grad():
        ref = model(x)
        with visionzoo.explain.record_attention(model) as rec:
            out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert rec.maps, "no attention was recorded"
    names = dict(model.named_modules())
    assert {m.name for m in rec.maps} == {n for n, m in names.items()
                                          if isinstance(m, AttentionCore) and not is_idle(model, n)}
    for m in rec.maps:
        assert m.probs.ndim >= 4
        torch.testing.assert_close(m.probs.sum(-1), torch.ones_like(m.probs.sum(-1)), atol=1e-5, rtol=0)
        assert m.grid is not None, f"{m.name}: no query grid"
        assert m.grid[0] * m.grid[1] + m.prefix_tokens == m.probs.shape[-2], (m.name, m.grid, m.probs.shape)
    assert all(c.observer is None for c in model.modules() if isinstance(c, AttentionCore))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_any_dtype(name, dtype, tiny_model):
    model = tiny_model(name)
    randomize_bn(model)
    x = make_input(model)
    with torch.no_grad():
        ref = model(x)
        out = model.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-4 if dtype == torch.float64 else 0.15 * ref.abs().max().item() + 0.05
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=0.05 if dtype == torch.bfloat16 else 1e-4)


def test_first_conv_is_the_first_layer_the_input_meets(name, tiny_model):
    """``first_conv`` (used to adapt ``in_chans`` of checkpoints, by TrAct, by SPT) names the first conv or linear
    layer the image goes through, taking the model's input channels."""
    model = tiny_model(name)
    first = model.get_submodule(model.first_conv)
    assert isinstance(first, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)), type(first)
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n)) for n, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))]
    with torch.no_grad():
        model(make_input(model))
    for h in hooks:
        h.remove()
    assert order[0] == model.first_conv, f"the input meets {order[0]} first, first_conv says {model.first_conv}"
