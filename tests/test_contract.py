"""Every row of the model contract (STYLE.md section 3), for every ``*_test`` variant."""
from __future__ import annotations

import math
import re

import pytest
import torch

import visionzoo
from conftest import TEST_MODELS, make_input, randomize_bn
from visionzoo.backbone import is_idle

pytestmark = pytest.mark.parametrize("name", TEST_MODELS)


def _channels(t: torch.Tensor) -> int:
    return t.shape[1] if t.ndim == 4 else t.shape[-1]


def _out_shape(model, x: torch.Tensor, classes: int) -> tuple[int, ...]:
    """What ``model(x)`` must give: ``(B, classes)`` logits, or an image of ``x``'s shape (``output == "image"``)."""
    return tuple(x.shape) if model.output == "image" else (x.shape[0], classes)


def test_forward_backward(name, tiny_model):
    model = tiny_model(name).train()
    x = make_input(model)
    out = model(x)
    assert out.shape == _out_shape(model, x, 10)
    (out.square() if model.output == "image" else out.logsumexp(1)).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None and not is_idle(model, n)]
    assert not no_grad, f"parameters that get no gradient: {no_grad}"
    idle_grad = [n for n, p in model.named_parameters() if is_idle(model, n) and p.grad is not None]
    assert not idle_grad, f"parameters declared idle (idle_names) that get a gradient: {idle_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_features_and_head(name, tiny_model):
    model = tiny_model(name)
    x = make_input(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert _channels(feats) == model.num_features
        if model.output == "image":  # no head: forward_head refuses, saying why
            assert feats.ndim == 4 and feats.shape[-2:] == x.shape[-2:]
            with pytest.raises(ValueError, match="image-to-image"):
                model.forward_head(feats)
            return
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        assert model.forward_head(feats).shape == (2, 10)


def test_no_head(name):
    model = visionzoo.create_model(name, num_classes=0).eval()
    x = make_input(model)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (tuple(x.shape) if model.output == "image" else (2, model.head_hidden_size))


def test_in_chans_1(name):
    model = visionzoo.create_model(name, num_classes=3, in_chans=1).eval()
    x = make_input(model)
    with torch.no_grad():
        assert model(x).shape == _out_shape(model, x, 3)


def test_feature_info_declared(name, tiny_model):
    model = tiny_model(name)
    modules = dict(model.named_modules())
    reductions = [f.reduction for f in model.feature_info]
    assert reductions == sorted(reductions) and reductions[0] >= 1
    for f in model.feature_info:
        assert f.module in modules, f"feature_info names {f.module!r}, which is not a module"


def test_features_only(name):
    model = visionzoo.create_model(name, features_only=True).eval()
    x = make_input(model)
    H = x.shape[-1]
    with torch.no_grad():
        feats = model(x)
    assert isinstance(feats, list) and len(feats) == len(model.feature_info)
    for f, info in zip(feats, model.feature_info):
        assert f.ndim == 4 and f.shape[1] == info.channels
        assert abs(f.shape[-1] - math.ceil(H / info.reduction)) <= 1, (f.shape, info)
    last = visionzoo.create_model(name, features_only=True, out_indices=(-1,)).eval()
    with torch.no_grad():
        (only,) = last(x)
    assert only.shape == feats[-1].shape
    assert last.feature_info.channels() == [model.feature_info[-1].channels]


def test_bad_out_indices_raise(name):
    with pytest.raises(ValueError, match="out of range"):
        visionzoo.create_model(name, features_only=True, out_indices=(0, 99))


def test_reset_classifier(name, tiny_model):
    model = tiny_model(name)
    if model.output == "image":
        with pytest.raises(ValueError, match="no classifier head"):
            model.reset_classifier(7)
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head_keys = {k for k in before if any(k.startswith(c + ".") for c in _classifiers(model))}
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(make_input(model)).shape == (2, 7)
    after = model.state_dict()
    for k, v in before.items():
        if k not in head_keys:
            assert torch.equal(v, after[k]), k
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(make_input(model)).shape == (2, model.head_hidden_size)


def _classifiers(model):
    c = model.classifier
    return [c] if isinstance(c, str) else list(c)


def test_grad_checkpointing_same_output(name, tiny_model):
    model = tiny_model(name)
    x = make_input(model)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    assert torch.allclose(ref, out, atol=1e-6)
    out.sum().backward()


def test_no_weight_decay_names_exist(name, tiny_model):
    model = tiny_model(name)
    nwd = model.no_weight_decay()
    assert isinstance(nwd, set)
    assert nwd <= set(dict(model.named_parameters()))


def test_position_tables_name_every_learned_position_table(name, tiny_model):
    """``position_tables()`` (what ``--peft-positions`` trains) names exactly the parameters named as absolute
    positions (``pos_embed``, ``pos_embed_0``, ``patch_pos``...); a family naming its table otherwise sets
    ``position_keys``. Relative bias tables are not among them."""
    model = tiny_model(name)
    tables = model.position_tables()
    named = {n for n, _ in model.named_parameters() if re.search(r"(^|_)pos(_embed)?(_\d+)?$", n.rsplit(".", 1)[-1])}
    assert set(tables) == named
    assert not any("relative" in n for n in tables)


def test_checkpoint_round_trip(name, tiny_model, tmp_path):
    model = tiny_model(name)
    x = make_input(model)
    with torch.no_grad():
        ref = model(x)
    path = visionzoo.save(model, tmp_path / "m.safetensors")
    again = visionzoo.load_model(path).eval()
    again2 = visionzoo.create_model(name, num_classes=10, checkpoint_path=path).eval()
    with torch.no_grad():
        assert torch.equal(again(x), ref)
        assert torch.equal(again2(x), ref)


def test_rebuild_from_variant(name, tiny_model):
    model = tiny_model(name)
    vname, args = model.variant
    assert vname == name
    clone = type(model)(**args).eval()
    clone.load_state_dict(model.state_dict())
    x = make_input(model)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


def test_input_size_rules(name, tiny_model):
    model = tiny_model(name)
    m = model.input_multiple
    _, h, w = model.data_config["input_size"]
    bigger = torch.randn(1, model.in_chans, h + m, w)
    if model.fixed_input_size:  # the size it was built for only, and the message says how to build another
        with pytest.raises(ValueError, match="img_size"):
            model(bigger)
        rebuilt = visionzoo.create_model(model.variant[0], num_classes=10, img_size=h + m)
        assert rebuilt(torch.randn(1, model.in_chans, h + m, h + m)).shape == (1, 10)
        return
    with torch.no_grad():
        feats = model.forward_intermediates(bigger)
        assert model(bigger).shape == _out_shape(model, bigger, 10)
    for f, info in zip(feats, model.stage_info):
        assert abs(f.shape[-2] - math.ceil((h + m) / info.reduction)) <= 1
    if m > 1:
        with pytest.raises(ValueError, match=f"multiple of {m}"):
            model(torch.randn(1, model.in_chans, h + 1, w))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, model.in_chans + 1, h, w))


def test_fuse_keeps_eval_output(name, tiny_model):
    model = tiny_model(name)
    randomize_bn(model)
    x = make_input(model)
    had_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        ref = model(x)
        n_before = sum(p.numel() for p in model.parameters())
        fused = model.fuse()
        out = fused(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()), "fuse() left a BatchNorm2d behind"
    n_after = sum(p.numel() for p in fused.parameters())
    assert n_after < n_before if had_bn else n_after <= n_before, (n_before, n_after)


def test_cpu_channels_last_is_only_a_layout(name, tiny_model):
    model = tiny_model(name)
    if not model.cpu_channels_last:
        pytest.skip(f"{name} runs NCHW")
    randomize_bn(model)
    x = make_input(model)
    with torch.no_grad():
        fast = model.forward_features(x)
        model.cpu_channels_last = False
        plain = model.forward_features(x)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
