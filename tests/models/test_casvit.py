"""CAS-ViT-specific checks: the additive mixer's formula, the distillation head, the official key layout."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from visionzoo import create_model
from visionzoo.models.casvit import CASViT, CASViTAdditiveMixer

torch.set_num_threads(1)


def test_additive_mixer_formula():
    torch.manual_seed(0)
    mixer = CASViTAdditiveMixer(8).eval()
    x = torch.randn(2, 8, 6, 5)
    with torch.no_grad():
        q, k, v = mixer.qkv(x).chunk(3, dim=1)

        def gate(op, t):  # spatial gate (one value per position), then channel gate (one value per channel)
            sp, ch = op[0], op[1]
            t = t * sp.block(t).sigmoid()
            return t * ch.conv(t.mean((2, 3), keepdim=True)).sigmoid()

        want = mixer.proj(mixer.dwc(gate(mixer.oper_q, q) + gate(mixer.oper_k, k)) * v)
        torch.testing.assert_close(mixer(x), want)
    assert not CASViT.has_attention  # no token-to-token softmax: attention tools refuse it


def test_distillation_head():
    torch.manual_seed(0)
    model = create_model("casvit_test", num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model(x), (model.head.fc(feats) + model.head.fc_dist(feats)) / 2)
    model.train().head.distilled_training = True
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    plain = create_model("casvit_test", num_classes=4, distilled=False)
    n_fc = sum(p.numel() for p in model.head.fc_dist.parameters())
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in model.parameters()) - n_fc
    with torch.device("meta"):  # official rcvit_xs(distillation=False)
        assert sum(p.numel() for p in create_model("casvit_xs", distilled=False).parameters()) == 2_979_700


def test_official_keys_remap_and_idempotent():
    from pathlib import Path
    official = load_file(str(Path(__file__).parents[1] / "fixtures" / "casvit_official.safetensors"))
    assert any(k.startswith("network.1.proj") for k in official) and "dist_head.weight" in official
    ours = create_model("casvit_test", num_classes=10).state_dict()
    mapped = CASViT.remap(official)
    assert mapped.keys() == ours.keys()
    assert CASViT.remap(mapped).keys() == ours.keys()
