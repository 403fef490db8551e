"""visionzoo.explain over the registry: every family's ``*_test`` variant gives a map from every method that applies
(no reshape argument), rollout is row-stochastic, CAMs have the input's size, the window placement inverts the
partitions, the head mask seam, faithfulness and TokenCut on known answers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TEST_MODELS, make_input, randomize_bn
from visionzoo.errors import ArgumentError
from visionzoo.explain import (
    METHODS,
    applicable_methods,
    attention_maps,
    attention_rollout,
    cam,
    deletion_insertion,
    explain,
    head_importance,
    pointing_game,
    random_pointing_baseline,
    record_attention,
    token_matrix,
    tokencut,
)
from visionzoo.explain.attention import AttentionMap, place_windows, stage_reduction
from visionzoo.explain.tokencut import box_iou, ncut
from visionzoo.layers import AttentionCore
from visionzoo.layers.window import window_partition


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", TEST_MODELS)
def test_every_family_gives_a_map(name, method, tiny_model):
    model = tiny_model(name)
    randomize_bn(model)
    x = make_input(model)
    if method not in applicable_methods(model):
        why = "no class logits" if model.output == "image" else "no softmax attention"
        with pytest.raises(ArgumentError, match=why):
            explain(model, x, method)
        return
    e = explain(model, x, method)
    assert e.maps.shape == (2, *x.shape[-2:])
    assert torch.isfinite(e.maps).all() and e.maps.min() >= 0 and e.maps.max() <= 1 + 1e-6
    assert e.targets.shape == (2,)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_per_block_per_head_maps(name, tiny_model):
    """Every attention call gives one map per head on the token map it covers: windows, stripes and rows put back
    on the image through the recorded grid and the stage's stride."""
    model = tiny_model(name)
    x = make_input(model)
    if not model.has_attention:
        with pytest.raises(ValueError, match="no softmax attention"):
            attention_maps(model, x)
        return
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    maps = attention_maps(model, x)
    assert [m.name for m in maps] == [a.name for a in rec.maps]
    H, W = x.shape[-2:]
    for hm, amap in zip(maps, rec.maps):
        B, heads, h, w = hm.maps.shape
        assert (B, heads) == (2, amap.heads), hm.name
        assert torch.isfinite(hm.maps).all() and hm.maps.min() >= 0
        red = stage_reduction(model, hm.name)
        if red is not None and amap.windows > 1:  # windowed calls cover their stage's whole map
            assert (h, w) == (-(-H // red), -(-W // red)), (hm.name, (h, w), red)
        if hm.kind == "received" and amap.windows > 1:
            # each window hands out one unit of attention per head: windows that are not padded keep all of it
            total = hm.maps.sum((-2, -1))  # (B, heads)
            assert (total <= amap.windows + 1e-4).all(), hm.name
            if h % amap.grid[0] == 0 and w % amap.grid[1] == 0:
                torch.testing.assert_close(total, torch.full_like(total, float(amap.windows)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_head_importance_and_tokencut_every_family(name, tiny_model):
    model = tiny_model(name)
    x = make_input(model)
    r = tokencut(model, x)  # any family: a stage's features from forward_intermediates
    assert r.masks.shape[0] == 2 and r.masks.any((1, 2)).all() and (r.boxes[:, 2:] > r.boxes[:, :2]).all()
    if not model.has_attention:
        with pytest.raises(ValueError, match="no softmax attention"):
            head_importance(model, x)
        return
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    heads = {a.name: a.heads for a in rec.maps}
    imp = head_importance(model, x)
    assert len(imp.rows) == sum(heads.values())
    assert all(c.head_mask is None for c in model.modules() if isinstance(c, AttentionCore))


@pytest.mark.parametrize("name", TEST_MODELS)
def test_rollout_rows_sum_to_one(name, tiny_model):
    model = tiny_model(name)
    x = make_input(model)
    if not model.has_attention:
        with pytest.raises(ValueError, match="no softmax attention"):
            attention_rollout(model, x)
        return
    for fusion, discard in (("mean", 0.0), ("max", 0.5), ("min", 0.9)):
        r = attention_rollout(model, x, fusion, discard)
        N = r.prefix_tokens + r.grid[0] * r.grid[1]
        assert r.matrix.shape == (2, N, N)
        torch.testing.assert_close(r.matrix.sum(-1), torch.ones(2, N), atol=1e-5, rtol=0)
        assert (r.matrix >= 0).all() and r.maps.shape == (2, *r.grid)
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    for amap in rec.maps:  # every call that has a token-to-token matrix is row-stochastic, windows included
        try:
            m = token_matrix(amap, stage_reduction(model, amap.name))
        except ValueError as e:
            assert "rollout" in str(e)
            continue
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), atol=1e-5, rtol=0)


def test_rollout_windowed_is_block_sparse(tiny_model):
    model = tiny_model("swin_test")
    x = make_input(model)
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    first = rec.maps[0]  # layers.0: 16x16 tokens in 4x4 windows, not shifted
    assert first.windows == 16 and first.shift == (0, 0)
    m = token_matrix(first, stage_reduction(model, first.name))[0, 0]  # (256, 256)
    win = (torch.arange(16)[:, None] // 4 * 4 + torch.arange(16)[None, :] // 4).flatten()  # window of each token
    assert (m[win[:, None] != win[None, :]] == 0).all()
    shifted = rec.maps[2]  # layers.1.blocks.1: shifted windows
    assert shifted.shift == (2, 2)
    torch.testing.assert_close(token_matrix(shifted, 8).sum(-1), torch.ones(2, 2, 64), atol=1e-5, rtol=0)


def _amap(probs, grid, batch, size, partition="block", shift=(0, 0)):
    return AttentionMap("x.core", probs, grid, 0, batch, size, partition, shift)


@pytest.mark.parametrize("partition", ["block", "grid"])
@pytest.mark.parametrize("shift", [(0, 0), (2, 1)])
def test_place_windows_inverts_the_partition(partition, shift):
    """Token values partitioned as the families do (roll by -shift, pad, window or grid) come back in place."""
    B, Ht, Wt, g = 2, 6, 10, (4, 4)
    values = torch.randn(B, Ht, Wt, 3)  # (B, H, W, heads)
    x = torch.roll(values, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = torch.nn.functional.pad(x, (0, 0, 0, -Wt % 4, 0, -Ht % 4))  # (B, 8, 12, heads)
    if partition == "block":
        win = window_partition(x, g).reshape(-1, 16, 3)  # (B * nW, 16, heads)
    else:  # MaxViT's grid_partition
        win = x.reshape(B, 4, 2, 4, 3, 3).permute(0, 2, 4, 1, 3, 5).reshape(-1, 16, 3)
    probs = torch.zeros(win.shape[0], 3, 16, 1)  # only the window count and grid matter here
    amap = _amap(probs, g, B, (Ht * 4, Wt * 4), partition, shift)
    back = place_windows(win.transpose(1, 2), amap, reduction=4)  # (B', heads, N) -> (B, heads, Ht, Wt)
    torch.testing.assert_close(back, values.permute(0, 3, 1, 2))


def test_cam_size_and_relu(tiny_model):
    for name in ("convnext_test", "vit_test"):
        model = tiny_model(name)
        x = make_input(model)
        for method in ("gradcam", "gradcam++", "layercam"):
            r = cam(model, x, method, normalize=False)
            assert r.maps.shape == (2, 64, 64) and (r.maps >= 0).all()
        with pytest.raises(ArgumentError, match="out of range"):
            cam(model, x, target=10)
        with pytest.raises(ArgumentError, match="stage must be"):
            cam(model, x, stage=9)


def test_cam_gradients_flow_through_the_tap(tiny_model):
    """Grad-CAM's weights equal a direct computation on the contract's NCHW map (ConvNeXt: the stage output)."""
    model = tiny_model("convnext_test")
    x = make_input(model)
    r = cam(model, x, "gradcam", stage=2, target=3, normalize=False)
    feats = model.forward_intermediates(x, [2])[0].detach().requires_grad_(True)
    rest = feats
    for stage in model.stage_modules()[3:]:
        rest = stage(rest)
    score = model.forward_head(model.forward_norm(rest))[:, 3].sum()
    (g,) = torch.autograd.grad(score, feats)
    ref = torch.relu((g.mean((2, 3), keepdim=True) * feats).sum(1))
    ref = torch.nn.functional.interpolate(ref[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(r.maps, ref.detach(), atol=1e-5, rtol=1e-4)


def test_class_token_head_taps_the_last_attention_input(tiny_model):
    """The last stage of a class-token ViT gives its patch outputs no gradient: the CAM is Grad-CAM on the last block's
    pre-norm output (pytorch-grad-cam's ``blocks[-1].norm1``), computed here by hand."""
    model = tiny_model("vit_test")
    x = make_input(model)
    r = cam(model, x, normalize=False)
    assert r.stage == len(model.stage_info) - 1 and r.where == "attention input"
    seen = {}

    def keep(m, i, o):
        o.retain_grad()
        seen["a"] = o

    h = model.blocks[-1].norm1.register_forward_hook(keep)
    logits = model(x)
    h.remove()
    logits.gather(1, r.targets[:, None]).sum().backward()
    a, g = seen["a"][:, 1:], seen["a"].grad[:, 1:]  # patch tokens (B, N, C)
    gh, gw = r.grid
    raw = (g.mean(1, keepdim=True) * a).sum(-1).reshape(-1, 1, gh, gw)
    ref = F.interpolate(F.relu(raw), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(r.maps, ref.detach(), atol=1e-5, rtol=1e-4)


def test_head_mask_seam():
    core = AttentionCore()
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    ref = core(q, k, v)
    core.head_mask = torch.ones(4)
    torch.testing.assert_close(core(q, k, v), ref)
    core.head_mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    out = core(q, k, v)
    assert out[:, 1].abs().max() == 0 and torch.equal(out[:, 0], ref[:, 0])
    core.fused = False
    torch.testing.assert_close(core(q, k, v), out)
    core.head_mask = torch.ones(3)
    with pytest.raises(ValueError, match="one entry per head"):
        core(q, k, v)


def test_head_importance(tiny_model):
    model = tiny_model("vit_test")
    x = make_input(model)
    imp = head_importance(model, x, labels=torch.tensor([1, 2]))
    assert len(imp.rows) == 4 and {r["core"] for r in imp.rows} == {"blocks.0.attn.core", "blocks.1.attn.core"}
    assert all(c.head_mask is None for c in model.modules() if isinstance(c, AttentionCore))
    again = head_importance(model, x, labels=torch.tensor([1, 2]))
    assert imp.rows == again.rows
    names, m = imp.matrix()
    assert m.shape == (2, 2) and any(abs(r["logit_drop"]) > 0 for r in imp.rows)


def test_deletion_insertion_endpoints(tiny_model):
    model = tiny_model("convnext_test")
    x = make_input(model)
    with torch.no_grad():
        p = model(x).softmax(1)
    t = p.argmax(1)
    r = deletion_insertion(model, x, torch.rand(2, 64, 64), t, steps=4)
    torch.testing.assert_close(r.deletion_curve[:, 0], p[torch.arange(2), t])  # nothing deleted yet
    torch.testing.assert_close(r.insertion_curve[:, -1], p[torch.arange(2), t])  # everything inserted
    assert ((r.deletion >= 0) & (r.deletion <= 1)).all() and r.deletion_curve.shape == (2, 5)


def test_pointing_game():
    maps = torch.zeros(2, 10, 10)
    maps[0, 2, 3] = 1.0  # inside box 0
    maps[1, 9, 9] = 1.0  # outside box 1
    boxes = torch.tensor([[1, 1, 5, 5], [0, 0, 4, 4]])
    assert pointing_game(maps, boxes).tolist() == [True, False]
    assert pointing_game(maps, boxes, tolerance=6).tolist() == [True, True]
    assert random_pointing_baseline(boxes, (10, 10)) == pytest.approx(0.16)
    plateau = torch.zeros(1, 10, 10)
    plateau[0, :6, :6] = 1.0  # a flat maximum: its centre (2.5, 2.5) counts, not its first pixel (0, 0)
    assert pointing_game(plateau, torch.tensor([[2, 2, 4, 4]])).tolist() == [True]


def test_ncut_finds_the_odd_block():
    g = torch.Generator().manual_seed(0)
    feats = torch.zeros(6, 8, 16)
    feats[..., 0] = 1.0
    feats[1:4, 2:5] = 0.0
    feats[1:4, 2:5, 1] = 1.0  # a 3x3 object with other features
    feats = feats + 0.05 * torch.randn(feats.shape, generator=g)
    mask, v = ncut(feats.reshape(-1, 16), (6, 8))
    expect = torch.zeros(6, 8, dtype=torch.bool)
    expect[1:4, 2:5] = True
    assert torch.equal(mask, expect)
    assert v[1:4, 2:5].min() > v[expect.logical_not()].max()  # the object side is the positive one


def test_tokencut_any_family(tiny_model):
    for name in ("vit_test", "convnext_test"):
        model = tiny_model(name)
        r = tokencut(model, make_input(model))
        assert r.masks.dtype == torch.bool and r.masks.any((1, 2)).all()
        assert (r.boxes[:, 2] > r.boxes[:, 0]).all() and (r.boxes[:, 3] > r.boxes[:, 1]).all()
        assert (r.boxes >= 0).all() and (r.boxes[:, 2:] <= 64).all()
    assert box_iou(torch.tensor([[0, 0, 4, 4]]), torch.tensor([[2, 0, 6, 4]])).item() == pytest.approx(1 / 3)


def test_tokencut_cuts_the_last_attention_keys(tiny_model):
    """On a global-attention stage TokenCut cuts the keys of its last attention call (the paper's features), computed
    here from the block's own qkv projection; a ConvNet has none and ``features='keys'`` says so."""
    model = tiny_model("vit_test")
    x = make_input(model)
    seen = {}
    h = model.blocks[-1].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    r = tokencut(model, x)
    h.remove()
    assert r.features == "keys"
    blk = model.blocks[-1]
    B, N, C = seen["x"].shape
    heads = blk.attn.num_heads
    with torch.no_grad():
        k = blk.attn.qkv(blk.norm1(seen["x"])).reshape(B, N, 3, heads, C // heads)[:, 1:, 1]  # (B, hw, heads, d)
    gh, gw = r.eigvecs.shape[1:]
    for b in range(B):
        mask, v = ncut(k[b].reshape(gh * gw, C), (gh, gw))
        assert torch.equal(r.masks[b], mask)
        torch.testing.assert_close(r.eigvecs[b], v)
    assert tokencut(model, x, features="stage").features == "stage"
    cnn = tiny_model("convnext_test")
    assert tokencut(cnn, make_input(cnn)).features == "stage"
    with pytest.raises(ValueError, match="features='stage'"):
        tokencut(cnn, make_input(cnn), features="keys")


@pytest.mark.slow  # importing captum takes ~10 s
def test_captum_layer_gradcam_matches_ours(tiny_model):
    captum = pytest.importorskip("captum.attr")
    from visionzoo.explain.captum import captum_layer

    model = tiny_model("vit_test")  # tokens with a class token: the adapter gives captum an NCHW layer
    x = make_input(model)
    with captum_layer(model, x) as layer:
        attr = captum.LayerGradCam(model, layer).attribute(x, target=2, relu_attributions=True)
    assert attr.shape == (2, 1, 4, 4)
    ours = cam(model, x, "gradcam", target=2, normalize=False).maps
    up = torch.nn.functional.interpolate(attr.detach(), size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(up, ours, atol=1e-5, rtol=1e-4)
