"""ConvNeXt-specific checks: official-layout remap, Linear <-> 1x1-conv MLP weights, layer scale, block layout."""
from __future__ import annotations

import re

import torch

from visionzoo import create_model, load_checkpoint
from visionzoo.models.convnext import ConvNeXt

torch.set_num_threads(1)


def _to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (timm) keys -> facebookresearch/ConvNeXt keys; the inverse of ConvNeXt.remap."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
        k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[k] = v
    return out


def _randomized(**kwargs) -> ConvNeXt:
    torch.manual_seed(0)
    model = create_model("convnext_test", num_classes=10, **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if p.ndim == 1 and not name.endswith("bias") else
                    0.2 * torch.randn_like(p))
    return model


def test_remap_round_trip_and_official_load():
    model = _randomized()
    sd = model.state_dict()
    official = _to_official(sd)
    assert "downsample_layers.0.1.weight" in official and "stages.3.0.pwconv2.weight" in official
    assert "norm.weight" in official and "head.weight" in official
    assert ConvNeXt.remap(official).keys() == sd.keys()
    assert ConvNeXt.remap(sd).keys() == sd.keys()  # our own keys pass through unchanged

    fresh = create_model("convnext_test", num_classes=10).eval()
    assert load_checkpoint(fresh, official) == "official"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_linear_and_conv_mlp_checkpoints_are_interchangeable():
    linear = _randomized()
    conv = create_model("convnext_test", num_classes=10, conv_mlp=True).eval()
    assert conv.state_dict()["stages.0.blocks.0.mlp.fc1.weight"].ndim == 4
    load_checkpoint(conv, linear.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), linear(x), atol=1e-5, rtol=1e-5)
    back = create_model("convnext_test", num_classes=10).eval()
    load_checkpoint(back, conv.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(back(x), linear(x), atol=1e-5, rtol=1e-5)


def test_layer_scale_optional_and_excluded_from_weight_decay():
    model = create_model("convnext_test")
    gammas = {n for n, _ in model.named_parameters() if n.endswith("gamma")}
    assert len(gammas) == 4 and gammas <= model.no_weight_decay()
    torch.testing.assert_close(model.stages[0].blocks[0].gamma.detach(), torch.full((16,), 1e-6))
    plain = create_model("convnext_test", ls_init=None)
    assert not any(n.endswith("gamma") for n, _ in plain.named_parameters())
    assert plain(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_block_returns_nchw_contiguous_and_layout():
    model = create_model("convnext_test").eval()
    assert isinstance(model.stages[0].downsample, torch.nn.Identity)
    assert model.stages[1].downsample[1].stride == (2, 2)
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        y = model.stages[0].blocks[0](x)
    assert y.shape == x.shape and y.is_contiguous()


def test_drop_path_rates_rise_linearly_to_the_last_block():
    model = create_model("convnext_test", drop_path_rate=0.3, depths=(1, 1, 2, 1))
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
             for s in model.stages for b in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 5))


def test_chunked_inference_path_equals_the_plain_one(monkeypatch):
    import visionzoo.models.convnext as convnext_module

    monkeypatch.setattr(convnext_module, "CHUNK_ROWS", 7)  # many chunks, a ragged last one
    model = create_model("convnext_test", num_classes=10).eval()
    with torch.no_grad():
        for blk in model.modules():
            if isinstance(getattr(blk, "gamma", None), torch.nn.Parameter):
                blk.gamma.normal_()
        x = torch.randn(2, 3, 64, 96)
        chunked = model(x)
    with torch.enable_grad():
        plain = model(x)  # grad mode takes the unchunked path
    torch.testing.assert_close(chunked, plain.detach(), atol=1e-5, rtol=1e-5)


def test_chunked_path_is_skipped_while_tracing():
    stage = create_model("convnext_test", num_classes=10).eval().stages[1]
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():  # grad off on CPU: eager takes the chunked path
        gm = torch.fx.symbolic_trace(stage)
        assert "empty_like" not in gm.code and "mlp" in gm.code  # the plain per-block MLP, no chunk loop
        torch.testing.assert_close(gm(x), stage(x), atol=1e-5, rtol=1e-5)
