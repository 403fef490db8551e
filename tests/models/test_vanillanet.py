"""VanillaNet-specific checks: the deep-training ramp, fuse refusal before it ends, deploy-form checkpoints, the head
across forms, official keys."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import randomize_bn
from visionzoo import create_model, load_model, save
from visionzoo.models.vanillanet import _OFFICIAL_PREFIXES, VanillaNet
from visionzoo.weights import CheckpointError

torch.set_num_threads(1)


def _tiny(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("vanillanet_test", num_classes=10, **kwargs).eval()
    randomize_bn(model)
    return model


def test_fuse_refused_before_ramp_ends():
    model = _tiny(act_learn=0.4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(ValueError, match=r"act_learn is 0.4.*set_act_ramp\(1.0\)"):
        model.fuse()
    assert hasattr(model.stem, "conv1") and not model.deploy  # no conv pair was merged
    with torch.no_grad():
        mid = model(x)
        torch.testing.assert_close(mid, before, atol=1e-5, rtol=0)  # at most BNs were folded: the same function
        model.set_act_ramp(1.0)
        ref = model(x)
        model.fuse()
        out = model(x)
    assert not torch.allclose(mid, ref, atol=1e-3)  # the ramp changes the function: fusing at 0.4 would be wrong
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_set_act_ramp_reaches_every_layer_and_checks_range():
    model = _tiny()
    assert model.act_learn == 1.0  # default: a trained network
    model.set_act_ramp(0.0)
    assert {b.act_learn for b in [model.stem, *model.stages, model.head.pre_logits]} == {0.0}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.set_act_ramp(1.5)
    model.set_act_ramp(1.0)
    model.fuse()
    with pytest.raises(ValueError, match="deploy form"):
        model.set_act_ramp(0.5)


def test_ramp_zero_is_relu_between_pairs():
    model = _tiny(act_learn=0.0)
    block = model.stages[0]
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        want = block.act(block.pool(block.conv2(torch.relu(block.conv1(x)))))
        torch.testing.assert_close(block(x), want)


def test_deploy_checkpoint_loads_into_deploy_model(tmp_path):
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)
    model.fuse()
    with torch.no_grad():
        ref = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    path = tmp_path / "deploy.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    deploy = create_model("vanillanet_test", num_classes=10, deploy=True, checkpoint_path=str(path)).eval()
    assert {k: v.shape for k, v in deploy.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), ref, atol=0, rtol=0)
    assert deploy.fuse() is deploy  # already fused: a no-op
    again = load_model(save(model, tmp_path / "ours.safetensors")).eval()  # our format records deploy=True
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref, atol=0, rtol=0)
    train_form = create_model("vanillanet_test", num_classes=10, checkpoint_path=str(path)).eval()
    assert train_form.deploy  # a deploy-form checkpoint: the model fused first
    with torch.no_grad():
        torch.testing.assert_close(train_form(x), ref, atol=0, rtol=0)
    with pytest.raises(CheckpointError), pytest.warns(UserWarning, match="build with deploy=True"):
        create_model("vanillanet_test", num_classes=10, act_learn=0.5, checkpoint_path=str(path))


def test_other_class_count_reinitialises_the_whole_head(tmp_path):
    model = _tiny()
    path = tmp_path / "train.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.warns(UserWarning, match="classifier"):
        other = create_model("vanillanet_test", num_classes=5, checkpoint_path=str(path))
    assert other.head.pre_logits.norm.running_mean.shape == (5,)
    assert torch.equal(other.stages[1].act.weight, model.stages[1].act.weight)
    with pytest.warns(UserWarning, match="classifier"):
        headless = create_model("vanillanet_test", num_classes=0, checkpoint_path=str(path)).eval()
    with torch.no_grad():
        assert headless(torch.randn(2, 3, 64, 64)).shape == (2, 128)


def test_head_across_forms_and_resets():
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)
    assert model.head_hidden_size == 10 and model.get_classifier() is model.head.fc  # train form: 10-wide hidden
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        ref = model.forward_head(feats)
    torch.testing.assert_close(model.head.fc(pre), ref)
    model.fuse()
    assert model.head_hidden_size == model.num_features == 128 and isinstance(model.head.pre_logits, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(feats), ref, atol=1e-5, rtol=0)
    model.reset_classifier(4)
    assert model.head.fc.weight.shape == (4, 128) and model.head_hidden_size == 128  # deploy form: one Linear
    train = _tiny()
    train.reset_classifier(0)
    assert train.head_hidden_size == 128
    train.reset_classifier(6)
    assert train.head.pre_logits.fc.weight.shape == (6, 128) and train.head_hidden_size == 6
    with torch.no_grad():
        assert train(x).shape == (2, 6)


def _official_keys(ours: dict) -> dict:
    """Our keys written the official way (the head's Linear weights as 1x1 convs)."""
    deploy = "stem.conv.weight" in ours
    out = {}
    for k, v in ours.items():
        for old, new in _OFFICIAL_PREFIXES:
            if k.startswith(new) and (old in ("stem.0.", "stem.1.", "cls.2.")) == deploy:
                k = old + k[len(new):]
                v = v[:, :, None, None] if k.startswith("cls") and v.ndim == 2 else v  # (K, C) -> (K, C, 1, 1)
                break
        out[k] = v
    return out


def test_key_layout_matches_official():
    with torch.device("meta"):
        train = create_model("vanillanet_5").state_dict()
        deploy = create_model("vanillanet_5", deploy=True).state_dict()
    official_train, official_deploy = _official_keys(train), _official_keys(deploy)
    assert len(official_train) == 89 and len(official_deploy) == 18  # official, before / after switch_to_deploy
    assert {"stem1.0.weight", "stem1.1.running_var", "stem2.0.bias", "stem2.2.weight", "stem2.2.bn.weight",
            "stages.0.conv1.0.weight", "stages.2.conv2.1.running_mean", "stages.2.act.bn.bias", "cls1.2.weight",
            "cls1.3.running_var", "cls2.0.weight"} <= set(official_train)
    assert {"stem.0.weight", "stem.1.weight", "stem.1.bias", "stages.1.conv.weight", "stages.1.act.bias",
            "cls.2.weight", "cls.2.bias"} <= set(official_deploy)
    assert official_train["cls1.2.weight"].shape == (1000, 4096, 1, 1)
    assert official_deploy["cls.2.weight"].shape == (1000, 4096, 1, 1)
    for ours, official in ((train, official_train), (deploy, official_deploy)):
        mapped = VanillaNet.remap(official)
        assert list(mapped) == list(ours) and all(mapped[k].shape == v.shape for k, v in ours.items())
        assert list(VanillaNet.remap(ours)) == list(ours)  # our own keys pass through
