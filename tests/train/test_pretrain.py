"""Self-supervised pretraining (visionzoo.train.pretrain): masking, SparK's sparse encoder, rotations, each method's
loss on a fixed batch, exact resume, refusals naming the alternative, and the pretrain -> train --init path."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import visionzoo
from visionzoo.errors import ArgumentError
from visionzoo.train.augment import AugConfig
from visionzoo.train.loop import TrainConfig, build_model, load_train_state
from visionzoo.train.pretrain import (
    MAE,
    RotNet,
    SiT,
    SparK,
    _rotate_each,
    build_pretext,
    is_plain_token_model,
    pretrain,
    random_masking,
)

TEST_MODELS = visionzoo.list_models("*_test")


def _model(name: str, size: int | None = 64, chans: int = 3, patch: int = 4) -> nn.Module:
    """``name`` at ``size`` px, or at the nearest size it takes that is a multiple of 16 (the masks below)."""
    torch.manual_seed(0)
    probe = build_model(name, 10, chans, patch_size=patch if size is not None and size < 64 else None)
    step = math.lcm(probe.input_multiple, 16)
    if getattr(probe, "fixed_input_size", False):
        size = probe.data_config["input_size"][-1]
    elif size is None or size % step:
        size = -(-probe.data_config["input_size"][-1] // step) * step
    torch.manual_seed(0)
    return build_model(name, 10, chans, img_size=size, patch_size=patch if size < 64 else None)


def _size(model: nn.Module) -> int:
    return model.data_config["input_size"][-1]


@pytest.mark.parametrize("n,ratio,rounding,keep", [(16, 0.75, "floor", 4), (64, 0.75, "floor", 16),
                                                   (49, 0.75, "floor", 12), (16, 0.6, "round", 6),
                                                   (4, 0.6, "round", 2), (10, 0.55, "floor", 4)])
def test_masking_ratio_is_exact(n, ratio, rounding, keep):
    mask, ids_keep = random_masking(7, n, ratio, rounding)
    assert mask.shape == (7, n) and ids_keep.shape == (7, keep)
    assert (mask.sum(1) == n - keep).all()
    assert not mask.gather(1, ids_keep).any()  # the kept indices are exactly the unmasked ones


def test_mae_encoder_sees_only_the_visible_tokens():
    pm = MAE(_model("deit_test"), mask_ratio=0.75)  # 2 prefix tokens, 4x4 = 16 patches at 64 px
    seen = []
    pm.backbone.stage_modules()[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    pm(torch.randn(3, 3, 64, 64))
    assert seen == [2 + 4]


@pytest.mark.parametrize("name", [n for n in TEST_MODELS if not is_plain_token_model(_model(n))])
def test_spark_sparse_encoder_zeros_masked_positions(name):
    """Every conv output and every feature map is exactly zero at masked positions (train mode: BatchNorm statistics
    from visible positions only), at any resolution."""
    try:
        pm = SparK(_model(name), mask_ratio=0.6, mask_stride=16).train()
    except ArgumentError as e:  # the probe found attention/global mixing, or no classifier: refused with the reason
        assert any(w in str(e) for w in ("stay zero at masked cells", "powers of two", "image-to-image")), str(e)
        return
    convs: list[torch.Tensor] = []
    for m in pm.backbone.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, a, y: convs.append(y.detach()))  # after SparK's re-mask hook
    torch.manual_seed(1)
    g = _size(pm.backbone) // 16
    mask, _ = random_masking(2, g * g, 0.6, "round")
    visible = (~mask).float().view(2, 1, g, g)
    feats = pm.encode(torch.randn(2, 3, 16 * g, 16 * g), visible)
    pm.visible = visible
    try:
        assert len(feats) == len(pm.levels) and convs
        convs = [c for c in convs if c.shape[0] == 2]  # convs on windows (batch x windows) are re-masked per stage
        for i, f in enumerate(feats + convs):
            v = pm.vis_at(f)
            hidden = (v == 0).expand_as(f)
            assert (f[hidden] == 0).all()
            # a pooled conv output (coarser than the mask) is visible where any of its cells is
            assert hidden.any() or i >= len(feats) or pm.levels[i] > pm.mask_stride
            assert (f[(v == 1).expand_as(f)] != 0).any()
    finally:
        pm.visible = None


def test_spark_batchnorm_statistics_ignore_masked_positions():
    """BatchNorm running statistics come from visible positions: with the whole image visible they equal a dense
    BatchNorm's, and content in masked cells changes nothing."""
    pm = SparK(_model("resnet_test"), mask_stride=16).train()
    bn = next(m for m in pm.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randn(2, 3, 64, 64)
    mask, _ = random_masking(2, 16, 0.6, "round")
    visible = (~mask).float().view(2, 1, 4, 4)
    pm.encode(x, visible)
    first = bn.running_mean.clone()
    bn.reset_running_stats()
    pm.visible = visible
    hidden = pm.vis_at(x) == 0
    pm.visible = None
    pm.encode(torch.where(hidden, torch.randn_like(x) * 50, x), visible)
    assert torch.equal(bn.running_mean, first)
    dense = _model("resnet_test").train()
    dense_bn = next(m for m in dense.modules() if isinstance(m, nn.BatchNorm2d))
    dense.forward_features(x)
    bn.reset_running_stats()
    pm.encode(x, torch.ones(2, 1, 4, 4))
    assert torch.allclose(bn.running_mean, dense_bn.running_mean, atol=1e-5)


def test_rotation_labels():
    x = torch.randn(3, 1, 8, 8)
    xs, y = RotNet.rotations(x)
    assert y.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for j in range(12):  # undoing the labelled rotation gives the original image
        assert torch.equal(torch.rot90(xs[j], -int(y[j]), (1, 2)), x[j % 3])
    assert torch.equal(xs[3], torch.rot90(x[0], 1, (1, 2)))  # label 1 = 90 degrees counter-clockwise
    k = torch.tensor([0, 3, 2])
    r = _rotate_each(x, k)
    assert all(torch.equal(r[i], torch.rot90(x[i], int(k[i]), (1, 2))) for i in range(3))


@pytest.mark.parametrize("name,method", [("vit_test", "mae"), ("vit_test", "sit"), ("vit_test", "rotnet"),
                                         ("resnet_test", "spark"), ("convnext_test", "rotnet")])
def test_loss_falls_on_a_fixed_batch(name, method):
    """Same images and the same masks / rotations every step (the RNG reseeded): the pretext loss falls."""
    opts = {"spark": {"mask_stride": 8}, "mae": {"decoder_dim": 64, "decoder_depth": 1}}.get(method, {})
    pm = build_pretext(_model(name, 32, 1), method, **opts)
    x = torch.randn(4, 1, 32, 32)
    opt = torch.optim.AdamW(pm.parameters(), lr=3e-4)
    losses = []
    for _ in range(8):
        torch.manual_seed(0)
        loss = pm(x)[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name,method,alt", [("convnext_test", "mae", "spark"), ("resnet_test", "sit", "spark"),
                                             ("vit_test", "spark", "mae")])
def test_a_method_that_does_not_apply_names_the_alternative(name, method, alt):
    with pytest.raises(ArgumentError, match=f"--method {alt}"):
        build_pretext(_model(name), method)
    with pytest.raises(ArgumentError, match="method must be one of"):
        build_pretext(_model(name), "simclr")


def test_cli_refusal_is_one_line(tmp_path):
    from visionzoo.cli import main

    assert main(["pretrain", "--model", "resnet_test", "--method", "mae", "--img-size", "32", "--limit-train", "8",
                 "--out", str(tmp_path)]) == 2


def test_every_family_takes_rotnet_and_a_masked_method_or_a_reason():
    takes = 0
    for name in TEST_MODELS:
        m = _model(name)
        masked = "mae" if is_plain_token_model(m) else "spark"
        if m.output != "logits":
            with pytest.raises(ArgumentError, match="image-to-image"):
                build_pretext(m, "rotnet")
            continue
        try:
            assert isinstance(build_pretext(m, masked), MAE if masked == "mae" else SparK)
            takes += 1
        except ArgumentError as e:  # SparK on a model whose features leak into masked cells
            assert masked == "spark" and "--method rotnet" in str(e) or "powers of two" in str(e), str(e)
        assert isinstance(build_pretext(_model(name), "rotnet"), RotNet)
    assert takes >= 20
    assert isinstance(build_pretext(_model("deit_test"), "sit"), SiT)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=2, batch_size=32, lr=1e-3, warmup_epochs=0.5, progress=False,
                                 aug=AugConfig(hflip=0.5, smoothing=0.0)), **kw})


@pytest.mark.parametrize("name,method", [("vit_test", "mae"), pytest.param("resnet_test", "spark",
                                                                            marks=pytest.mark.slow)])
def test_pretrain_resume_is_exact(digits_small, tmp_path, name, method):
    def run(out, resume=None, **kw):
        opts = {"mask_stride": 8} if method == "spark" else {"decoder_dim": 32, "decoder_depth": 1}
        return pretrain(_model(name, 32, 1, patch=8), digits_small, method, _cfg(**kw), out, resume=resume, log=None,
                        **opts)

    full = run(tmp_path / "full")
    run(tmp_path / "part", stop_after=1)
    rest = run(tmp_path / "part", resume="auto")
    def strip(history):  # nan (no pretext accuracy) compared as None
        return [{k: None if v != v else v for k, v in r.items() if k != "epoch_time_s"} for r in history]

    assert strip(full.history) == strip(rest.history)
    a, b = load_train_state(tmp_path / "full" / "latest.pt"), load_train_state(tmp_path / "part" / "latest.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (tmp_path / "part" / "backbone.safetensors").is_file()


@pytest.mark.slow
def test_pretrain_then_init_fine_tunes_the_pretrained_weights(tmp_path):
    from safetensors.torch import load_file

    from visionzoo.cli import main

    common = ["--img-size", "32", "--patch-size", "4", "--limit-train", "64", "--limit-val", "20", "--batch-size",
              "32", "--no-progress", "--threads", "1", "--hflip", "0"]
    assert main(["pretrain", "--model", "vit_test", "--method", "rotnet", "--epochs", "1", "--out",
                 str(tmp_path / "pre"), *common]) == 0
    state = load_file(tmp_path / "pre" / "backbone.safetensors")
    assert "head.fc.weight" not in state and "blocks.0.attn.qkv.weight" in state
    model = _model("vit_test", 32, 1)
    from visionzoo.weights import load_checkpoint

    load_checkpoint(model, tmp_path / "pre" / "backbone.safetensors", strict=True)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    init = str(tmp_path / "pre" / "backbone.safetensors")
    assert main(["train", "--model", "vit_test", "--epochs", "1", "--init", init, "--out", str(tmp_path / "ft"),
                 *common]) == 0


@pytest.mark.slow
def test_pretrain_under_torchrun(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "visionzoo",
           "pretrain", "--model", "vit_test", "--method", "mae", "--img-size", "32", "--patch-size", "4", "--epochs",
           "1", "--limit-train", "64", "--limit-val", "30", "--batch-size", "16", "--no-progress", "--threads", "1",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    state = load_train_state(out / "latest.pt")
    assert len(state["rng"]) == 2 and state["step"] == 2
    assert (out / "backbone.safetensors").is_file()
