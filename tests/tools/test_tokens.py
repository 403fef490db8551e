"""visionzoo.tokens: ToMe, EViT, ATS, MCTF and token slimming on the plain-token models, refusals elsewhere."""
from __future__ import annotations

import copy

import pytest
import torch

import visionzoo
from conftest import TEST_MODELS, make_input
from visionzoo import tokens
from visionzoo.layers import TokenBlock
from visionzoo.tokens.ats import inverse_transform_sample
from visionzoo.tokens.evit import keep_rate_at
from visionzoo.tokens.tome import bipartite_groups, r_schedule

PLAIN = ["vit_test", "deit_test"]
IDENTITY = [("tome", dict(r=0)), ("evit", dict(keep=1.0, blocks=[0, 1])), ("mctf", dict(r=0)),
            ("slim", dict(keep=1.0)), ("ats", dict(blocks=[]))]
REDUCE = [("tome", dict(r=4)), ("evit", dict(keep=0.5, blocks=[0, 1])), ("ats", dict(blocks=[0, 1], tokens=8)),
          ("mctf", dict(r=3)), ("mctf", dict(r=3, one_step_ahead=False, blocks=[0])),
          ("slim", dict(keep=0.5, blocks=[0]))]


def _run(model, x):
    with torch.no_grad():
        return model(x)


# --- every registered family: plain-token models take it, the others refuse with the reason ------------------
@pytest.mark.parametrize("name", TEST_MODELS)
def test_identity_or_refusal_on_every_family(name, tiny_model):
    model = tiny_model(name)
    x = make_input(model)
    has_seam = any(isinstance(m, TokenBlock) for m in model.modules())
    if not has_seam:
        with pytest.raises(ValueError, match="cannot take token reduction") as e:
            tokens.apply(model, "tome", r=2)
        assert "layers.TokenBlock" in str(e.value) and model.name in str(e.value)
        assert getattr(model, "token_reduction", None) is None
        return
    ref = _run(model, x)
    for method, params in IDENTITY:
        tokens.apply(model, method, **params)
        torch.testing.assert_close(_run(model, x), ref, atol=1e-6, rtol=0)
        tokens.remove(model)


@pytest.mark.parametrize("name, why", [("swin_test", "windows, stripes or stages"),
                                       ("convnext_test", "no softmax attention")])
def test_hierarchical_and_convnet_families_are_refused(name, why, tiny_model):
    for method in tokens.METHODS:
        with pytest.raises(ValueError, match=why):
            tokens.apply(tiny_model(name), method)
    assert tokens.can_apply(tiny_model(name)) is not None and tokens.can_apply(tiny_model("vit_test")) is None


# --- the seam itself -------------------------------------------------------------------------------------------
def test_unused_seam_traces_and_costs_nothing(tiny_model):
    model = tiny_model("deit_test")
    x = make_input(model)
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x), _run(model, x), atol=0, rtol=0)
    assert not any("token_hook" in str(n.target) for n in gm.graph.nodes)


def test_qkv_observer_keeps_the_fused_path(tiny_model, monkeypatch):
    from visionzoo.layers import AttentionCore

    model = tiny_model("vit_test")
    x = make_input(model)
    ref = _run(model, x)
    seen, explicit = [], []
    monkeypatch.setattr(AttentionCore, "_probs", lambda self, *a: explicit.append(1) or torch.softmax(
        (a[0] * a[3]) @ a[1].transpose(-2, -1), -1))
    for b in model.blocks:
        b.attn.core.qkv_observer = lambda core, q, k, v, bias, scale: seen.append((q.shape, k.shape, v.shape, scale))
    torch.testing.assert_close(_run(model, x), ref, atol=0, rtol=0)
    assert len(seen) == 2 and seen[0][1] == (2, 2, 17, 32) and seen[0][3] == 32 ** -0.5 and not explicit


def test_extra_bias_combines_with_a_boolean_mask():
    from visionzoo.layers import AttentionCore

    core = AttentionCore()
    q = k = v = torch.randn(1, 1, 3, 4)
    mask = torch.tensor([[True, True, False]])  # (N_q or 1, N_k)
    core.extra_bias = torch.tensor([[0.0, 1.0, 0.0]])
    out = core(q, k, v, mask)
    logits = (q @ k.transpose(-2, -1)) * 0.5 + torch.tensor([0.0, 1.0, float("-inf")])
    torch.testing.assert_close(out, logits.softmax(-1) @ v)


def test_attention_probs_and_attend_reproduce_the_attention(tiny_model):
    attn = tiny_model("vit_test").blocks[0].attn
    x = torch.randn(2, 17, 64)
    probs = attn.attention_probs(x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 17))
    torch.testing.assert_close(attn(x, attend=lambda v: probs @ v), attn(x), atol=1e-6, rtol=1e-5)


# --- token counts after each block, as each paper specifies ---------------------------------------------------
@pytest.mark.parametrize("name, prefix", [("vit_test", 1), ("deit_test", 2)])
@pytest.mark.parametrize("method, params, counts", [
    ("tome", dict(r=4), [17, 13, 9]),  # 16 patches: 4 fewer per block
    ("tome", dict(r=12), [17, 9, 5]),  # at most half the patches in one block
    ("evit", dict(keep=0.5, blocks=[0, 1]), [17, 10, 7]),  # ceil(0.5 * 16) + fused, ceil(0.5 * 9) + fused
    ("evit", dict(keep=0.5, blocks=[1], fuse=False), [17, 17, 9]),
    ("mctf", dict(r=3), [17, 17, 14]),  # the default leaves block 0 alone
    ("slim", dict(keep=0.5, blocks=[0]), [17, 9, 9]),
])
def test_token_counts(name, prefix, method, params, counts, tiny_model):
    model = tiny_model(name)
    h = tokens.apply(model, method, **params)
    out = _run(model, make_input(model))
    assert out.shape == (2, 10)
    assert h.token_counts() == [c + prefix - 1 for c in counts]


def test_evit_on_deit_small_keeps_197_140_100_72():
    with torch.device("meta"):
        model = visionzoo.create_model("deit_small_patch16_224")
    h = tokens.apply(model, "evit", keep=0.7)
    model(torch.empty(1, 3, 224, 224, device="meta"))
    assert sorted(set(h.token_counts()), reverse=True) == [197, 140, 100, 72]


def test_tome_schedules():
    assert r_schedule(8, 3) == [8, 8, 8]
    assert r_schedule([4, 2], 3) == [4, 2, 0]
    assert r_schedule((8, -1), 5) == [16, 12, 8, 4, 0]  # the paper's decreasing schedule
    with pytest.raises(ValueError, match="r lists 3 values but the model has 2 blocks"):
        r_schedule([1, 2, 3], 2)
    model = visionzoo.create_model("vit_test", num_classes=10).eval()
    h = tokens.apply(model, "tome", r=[2, 5])
    _run(model, make_input(model))
    assert h.token_counts() == [17, 15, 10]


def test_bipartite_matching_merges_the_most_similar_pairs():
    metric = torch.tensor([[[1.0, 0], [0.99, 0.1], [0, 1], [-1, 0.05]]])  # A = 0, 2; B = 1, 3
    group, G = bipartite_groups(metric, 1)
    assert G == 3 and group.tolist() == [[1, 1, 0, 2]]  # token 0 joins its twin 1; token 2 stays


def test_mctf_applies_the_fused_map_without_building_it():
    from visionzoo.tokens.core import scatter_groups
    from visionzoo.tokens.mctf import _fused_attention

    g = torch.Generator().manual_seed(0)
    B, h, N, P, d, G = 2, 3, 11, 1, 4, 7
    probs = torch.rand(B, h, N, N, generator=g).softmax(-1)
    group = torch.tensor([[0, 0, 1, 2, 2, 3, 4, 5, 5, 6], [6, 5, 4, 3, 2, 1, 0, 0, 1, 2]])
    w, v = torch.rand(B, N - P, generator=g), torch.randn(B, h, P + G, d, generator=g)
    cols = torch.cat([probs[..., :P], scatter_groups(probs[..., P:], group, G, dim=-1)], dim=-1)  # keys summed
    rows = scatter_groups(cols[:, :, P:] * w[:, None, :, None], group, G, dim=2)
    fused = torch.cat([cols[:, :, :P], rows / scatter_groups(w, group, G)[:, None, :, None]], dim=2)
    torch.testing.assert_close(fused.sum(-1), torch.ones(B, h, P + G))  # still a distribution per query
    torch.testing.assert_close(_fused_attention(probs, group, G, w, P)(v), fused @ v)


# --- ATS: per-image counts in one batch -------------------------------------------------------------------------
def test_inverse_transform_sampling():
    assert inverse_transform_sample(torch.tensor([[0.0, 0, 0, 1, 0]]), 4).tolist() == [[0, 0, 0, 1, 0]]
    uniform = torch.full((1, 6), 1 / 6)
    assert int(inverse_transform_sample(uniform, 6).sum()) == 5  # the lowest CDF point is never sampled
    peaked = torch.tensor([[0.01, 0.02, 0.9, 0.03, 0.04], [0.2] * 5])
    assert inverse_transform_sample(peaked, 5).sum(1).tolist() == [3, 4]  # concentrated: fewer tokens


@pytest.mark.parametrize("name, pool", [("vit_test", "token"), ("deit_test", "token"), ("vit_test", "avg")])
def test_ats_batches_match_single_images(name, pool):
    torch.manual_seed(0)
    model = visionzoo.create_model(name, num_classes=10, **({} if pool == "token" else {"global_pool": pool})).eval()
    with torch.no_grad():
        for b in model.blocks:  # sharper attention, so the images keep different numbers of tokens
            b.attn.qkv.weight[:128] *= 4
    x = make_input(model, batch=4) * torch.tensor([0.2, 1, 3, 0.5])[:, None, None, None]
    h = tokens.apply(model, "ats", blocks=[0, 1], tokens=12)
    out = _run(model, x)
    counts = h.token_counts(per_image=True)
    assert counts.shape == (4, 3) and len(set(counts[:, -1].tolist())) > 1, counts
    assert h.token_counts() == counts.max(0).values.tolist()
    single = torch.cat([_run(model, x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(out, single, atol=1e-5, rtol=1e-5)  # padding is masked out of attention and pooling


# --- the distillation token stays where DeiT's head reads it ----------------------------------------------------
@pytest.mark.parametrize("method, params", [p for p in REDUCE if p[0] != "slim"])
def test_prefix_tokens_are_kept_in_place(method, params, tiny_model):
    model = tiny_model("deit_test")
    h = tokens.apply(model, method, trace_source=True, **params)
    _run(model, make_input(model))
    src = h.source  # (B, N, N0)
    assert src.shape[-1] == 18 and src.shape[1] == h.token_counts()[-1]
    eye = torch.eye(18)
    assert torch.equal(src[:, 0], eye[0].expand(2, -1)) and torch.equal(src[:, 1], eye[1].expand(2, -1))
    assert torch.all(src[:, 2:, :2] == 0), "no patch token absorbed the class or distillation token"
    if method in ("tome", "mctf"):
        assert torch.all(src[:, 2:].sum(1)[:, 2:] == 1), "every patch lives in exactly one merged token"


# --- remove() -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PLAIN)
@pytest.mark.parametrize("method, params", REDUCE)
def test_remove_restores_the_model(name, method, params, tiny_model):
    model = tiny_model(name)
    x = make_input(model)
    ref, keys = _run(model, x), list(model.state_dict())
    h = tokens.apply(model, method, **params)
    assert model.token_reduction is h and h.spec.startswith(method)
    assert not torch.allclose(_run(model, x), ref, atol=1e-4)
    with pytest.raises(ValueError, match="already has"):
        tokens.apply(model, "tome")
    with pytest.raises(ValueError, match="no longer form a map"):
        model.forward_intermediates(x)
    tokens.remove(model)
    assert torch.equal(_run(model, x), ref) and list(model.state_dict()) == keys
    assert all(b.token_hook is None for b in model.blocks) and "forward_intermediates" not in vars(model)
    assert len(model.forward_intermediates(x)) == 2
    with pytest.raises(ValueError, match="no token reduction applied"):
        tokens.remove(model)


def test_deepcopy_and_train_mode_gradients(tiny_model):
    model = tiny_model("deit_test")
    tokens.apply(model, "tome", r=3)
    clone = copy.deepcopy(model)
    x = make_input(model)
    torch.testing.assert_close(_run(clone, x), _run(model, x))
    assert clone.blocks[0].token_hook.state is clone.blocks[1].token_hook.state is not model.blocks[0].token_hook.state
    model.train()
    model(x).sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


# --- MACs: the profiler counts the reduced model ------------------------------------------------------------------
def _block_macs(n_attn: int, n_mlp: int, D: int) -> int:
    return 4 * n_attn * D * D + 2 * n_attn * n_attn * D + 8 * n_mlp * D * D


@pytest.mark.parametrize("method, params, extra", [
    ("tome", dict(r=4), lambda D, d: [(17, 13, 8 * 8 * d), (13, 9, 6 * 6 * d)]),  # + the A x B key similarities
    ("evit", dict(keep=0.5, blocks=[0, 1]), lambda D, d: [(17, 10, 17 * D), (10, 7, 10 * D)]),  # + class attention
])
def test_macs_follow_the_analytic_formula(method, params, extra):
    model = visionzoo.create_model("vit_test", num_classes=10).eval()
    D, d = 64, 32  # width, head width
    stem, head = 16 * D * 3 * 16 * 16, D * 10
    dense = stem + 2 * _block_macs(17, 17, D) + head
    assert visionzoo.profile(model).macs == dense
    tokens.apply(model, method, **params)
    want = stem + head + sum(_block_macs(na, nm, D) + x for na, nm, x in extra(D, d))
    assert visionzoo.profile(model).macs == want


def test_mctf_macs_count_queries_and_keys_before_merging():
    model = visionzoo.create_model("vit_test", num_classes=10).eval()
    D, n, m = 64, 17, 14  # block 1: q, k, their product and the map times the values on 17 tokens; values,
    block1 = 2 * n * D * D + n * n * D + m * D * D + n * n * D + m * D * D + 8 * m * D * D + 8 * 8 * D  # output,
    # MLP on 14; + the A x B similarities of the tokens
    tokens.apply(model, "mctf", r=3)
    want = 16 * D * 3 * 256 + _block_macs(17, 17, D) + block1 + D * 10
    assert visionzoo.profile(model).macs == want


# --- training: schedules, losses, learnable modules ---------------------------------------------------------------
def test_evit_keep_rate_warmup(tiny_model):
    assert keep_rate_at(0.0, 0.7, (0.1, 0.5)) == 1.0 and keep_rate_at(0.6, 0.7, (0.1, 0.5)) == 0.7
    assert keep_rate_at(0.3, 0.7, (0.1, 0.5)) == pytest.approx(0.85)  # half-way down the cosine
    model = tiny_model("vit_test")
    h = tokens.apply(model, "evit", keep=0.5, blocks=[0], warmup=(0.1, 0.5))
    h.on_train_step(0.0)
    model.train()
    model(make_input(model))
    assert h.token_counts() == [17, 17, 17]  # keep 1 at the start of training
    model.eval()
    _run(model, make_input(model))
    assert h.token_counts() == [17, 10, 10]  # evaluation uses the target keep rate


def test_mctf_consistency_loss_trains(tiny_model):
    torch.manual_seed(0)
    model = tiny_model("deit_test").train()
    h = tokens.apply(model, "mctf", r=3, consistency=True, r_teacher_max=2, confidence=0.0)
    x = make_input(model)
    target = torch.nn.functional.one_hot(torch.tensor([1, 2]), 10).float()
    loss, logits = h.training_loss(model, x, target)
    assert logits.shape == (2, 10) and torch.isfinite(loss)
    ce = -(target * logits.log_softmax(-1)).sum(-1).mean()
    assert loss > ce  # student CE + teacher CE + the consistency term
    loss.backward()
    assert model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert tokens.apply(tiny_model("vit_test"), "mctf").training_loss is None


def test_token_slimming_modules_learn(tiny_model):
    model = tiny_model("vit_test").train()
    tokens.apply(model, "slim", keep=0.5, blocks=[0])
    names = [n for n, _ in model.named_parameters() if "token_hook" in n]
    assert names and all(n.startswith("blocks.0.token_hook.tsm.") for n in names)
    model(make_input(model)).sum().backward()
    tsm = model.blocks[0].token_hook.tsm
    assert tsm.weight[1].weight.grad.abs().sum() > 0 and tsm.scale.grad is not None


# --- parameters and the command line -------------------------------------------------------------------------------
def test_parse_spec():
    assert tokens.parse_spec("tome:r=8") == ("tome", {"r": 8})
    assert tokens.parse_spec("evit:keep=0.7,blocks=[3,6,9],fuse=False") == (
        "evit", {"keep": 0.7, "blocks": [3, 6, 9], "fuse": False})
    assert tokens.parse_spec("tome:r=(16,-1)") == ("tome", {"r": (16, -1)})
    assert tokens.parse_spec("ats") == ("ats", {})
    with pytest.raises(ValueError, match="did you mean 'tome'"):
        tokens.parse_spec("tomee:r=8")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        tokens.parse_spec("tome:8")


@pytest.mark.parametrize("method, params, match", [
    ("tome", dict(r=-1), "r must be >= 0"),
    ("tome", dict(ratio=2), "unknown parameter"),
    ("evit", dict(keep=1.5), r"keep must be a number in \(0, 1\]"),
    ("evit", dict(blocks=[5]), "out of range for a sequence of 2 blocks"),
    ("ats", dict(tokens=1), "tokens .* must be an int >= 2"),
    ("mctf", dict(r=-2), "r must be an int >= 0"),
    ("slim", dict(keep=0.1, blocks=[0, 1]), "leaves no patch token"),
    ("nope", {}, "method must be one of"),
])
def test_bad_parameters_name_the_problem(method, params, match, tiny_model):
    model = tiny_model("vit_test")
    with pytest.raises(ValueError, match=match):
        tokens.apply(model, method, **params)
    assert getattr(model, "token_reduction", None) is None and model.blocks[0].token_hook is None


def test_plot_merges_writes_a_png(tmp_path, tiny_model):
    model = tiny_model("vit_test")
    tokens.apply(model, "tome", r=4)
    path = tokens.plot_merges(model, make_input(model)[0], tmp_path / "merges.png")
    assert path.is_file() and path.stat().st_size > 1000
    assert model.token_reduction.states[0].trace_source is False  # tracing was on for that pass only
    eye = torch.eye(5)
    source = torch.stack([eye[0], eye[1] + eye[2], eye[3], eye[4]])  # class token; patches 1 and 2 merged
    assert tokens.merge_labels(source, 1, (2, 2)).tolist() == [[0, 0], [1, 2]]


def test_train_and_eval_cli_with_tokens(tmp_path, capsys):
    from visionzoo.cli import main

    small = ["--limit-train", "32", "--limit-val", "16", "--batch-size", "16", "--no-progress", "--hflip", "0"]
    out = tmp_path / "run"
    assert main(["train", "--model", "vit_test", "--img-size", "16", "--patch-size", "4", "--epochs", "1",
                 "--tokens", "tome:r=8", "--out", str(out), *small]) == 0
    text = capsys.readouterr().out
    assert "token reduction: tome:r=8" in text and "vit_test + tome:r=8: val top-1" in text
    assert main(["eval", "--checkpoint", str(out / "model.safetensors"), "--out", str(tmp_path / "e"),
                 *small[:4]]) == 0
    assert "with tome:r=8" in capsys.readouterr().out  # the recorded reduction is applied again
    assert main(["train", "--model", "swin_test", "--tokens", "tome:r=8", "--out", str(tmp_path / "s"),
                 *small]) == 2
    assert "cannot take token reduction" in capsys.readouterr().err


def test_bench_rows_with_tokens():
    from visionzoo.bench.runner import run
    from visionzoo.bench.schema import BenchConfig

    cfg = BenchConfig(batch_sizes=(1,), repeats=1, budget=0.05, subprocess=False, tokens="tome:r=4")
    rows = run(["vit_test", "convnext_test"], cfg)
    ok = [r for r in rows if r.model == "vit_test"][0]
    assert ok.status != "error" and ok.tokens == "tome:r=4" and ok.infer_samples_per_sec > 0
    dense = visionzoo.profile("vit_test").gmacs
    assert ok.infer_gmacs < dense
    bad = [r for r in rows if r.model == "convnext_test"][0]
    assert bad.status == "error" and "no softmax attention" in bad.error
    with pytest.raises(ValueError, match="method must be one of"):
        BenchConfig(tokens="tomee:r=4").validate()
