"""Parameter groups, layer ids over every registered family, SAM, the cosine schedule."""
from __future__ import annotations

import math

import pytest
import torch

import visionzoo
from visionzoo.train.optim import SAM, create_optimizer, layer_ids, param_groups
from visionzoo.train.sched import CosineWarmup

# each family's first full-size variant, built on the meta device
FAMILIES = [next((v for v in f.variants if not v.endswith("_test")), f.variants[0]) for f in visionzoo.list_families()]


def _check_layer_ids(model):
    ids, n = layer_ids(model)
    names = [k for k, _ in model.named_parameters()]
    assert set(ids) == set(names)
    assert min(ids.values()) in (0, 1)  # 1: no stem outside the stages (CvT)
    # the head's id is the last one; an image-to-image model (output == "image") has no head after its stages
    assert max(ids.values()) == (n - 2 if model.output == "image" else n - 1)
    heads = [model.classifier] if isinstance(model.classifier, str) else list(model.classifier)
    for k in names:
        if any(k.startswith(h + ".") for h in heads):
            assert ids[k] == n - 1, k
    # stage by stage, ids never go down and stay strictly between the stem and the head
    prev = 0
    for info in model.stage_info:
        inside = [ids[k] for k in names if k.startswith(info.module + ".")]
        assert inside and min(inside) >= max(prev, 1) and max(inside) < n - 1
        prev = max(inside)
    return ids, n


@pytest.mark.parametrize("name", visionzoo.list_models("*_test"))
def test_layer_ids_every_test_model(name, tiny_model):
    _check_layer_ids(tiny_model(name))


@pytest.mark.parametrize("name", FAMILIES + ["resnet50", "vit_base_patch16_224", "swin_tiny_patch4_window7_224"])
def test_layer_ids_full_variants_on_meta(name):
    if name not in visionzoo.list_models():
        pytest.skip(f"{name} is not registered")
    with torch.device("meta"):
        model = visionzoo.create_model(name)
    ids, n = _check_layer_ids(model)
    if name == "vit_base_patch16_224":
        assert n == 14 and ids["cls_token"] == 0 and ids["blocks.11.mlp.fc1.weight"] == 12
        assert ids["head.fc.weight"] == 13


def test_param_groups_no_weight_decay_and_layer_decay(tiny_model):
    model = tiny_model("vit_test")
    groups = param_groups(model, 0.05, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    for n in model.no_weight_decay():
        assert by_name[n]["weight_decay"] == 0.0
    assert by_name["blocks.0.attn.qkv.bias"]["weight_decay"] == 0.0  # 1-d: biases and norms
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    _, n = layer_ids(model)  # 0 stem, 1-2 blocks, 3 head
    assert by_name["head.fc.weight"]["lr_scale"] == 1.0
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == 0.5 ** (n - 1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    assert {g["lr"] for g in opt.param_groups} == {1e-3 * 0.5 ** k for k in range(n)}
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(model, 0.05, layer_decay=1.5)
    with pytest.raises(ValueError, match="opt must be one of"):
        create_optimizer(model, "lamb")


def test_sam_descends_and_round_trips():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8))
    opt = SAM(torch.optim.SGD([w], lr=0.1), rho=0.05)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(20)]
    assert losses[-1] < 0.1 * losses[0]
    w0 = w.detach().clone()
    closure()
    opt.first_step()
    assert not torch.equal(w, w0)  # perturbed to the sharpest nearby point
    closure()
    opt.second_step()
    assert torch.allclose(w, w0 * (1 - 0.1 * 2 * (1 + 0.05 / w0.norm())), atol=1e-6)
    opt2 = SAM(torch.optim.SGD([w], lr=0.1, momentum=0.9), rho=0.05)
    opt2.load_state_dict(opt2.state_dict())
    with pytest.raises(ValueError, match="rho"):
        SAM(torch.optim.SGD([w], lr=0.1), rho=0)


def test_cosine_warmup_schedule_and_state():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr_scale": 0.5}], lr=1.0)
    s = CosineWarmup(opt, total_steps=10, base_lr=1.0, warmup_steps=2, min_lr=0.1)
    lrs = [s.get_last_lr()[0]]
    for _ in range(10):
        s.step()
        lrs.append(s.get_last_lr()[0])
    assert lrs[:3] == [0.0, 0.25, 0.5]  # linear warm-up, times lr_scale 0.5
    assert math.isclose(lrs[-1], 0.05) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    s2 = CosineWarmup(opt, total_steps=10, base_lr=1.0, warmup_steps=2, min_lr=0.1)
    s2.load_state_dict({"last_step": 5})
    assert s2.get_last_lr() == [lrs[5]]
    with pytest.raises(ValueError, match="warmup_steps"):
        CosineWarmup(opt, total_steps=10, base_lr=1.0, warmup_steps=20)
