"""SReT specifics: weight sharing across the recursion, the sliced group attention (contiguous runs, then shuffled
groups: interleaved in evaluation, random in training), the learned residual scalars, official keys, and the refusal
of token reduction."""
from __future__ import annotations

import torch

import visionzoo
from visionzoo import tokens

torch.set_num_threads(1)


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return visionzoo.create_model("sret_test", num_classes=5, **kwargs).eval()


def _grouped_reference(attn, x, order):
    """Plain softmax attention within contiguous groups of ``x[:, order]``, put back in token order."""
    B, N, C = x.shape
    G = N // len(order[0])
    out = torch.empty_like(x)
    for idx in order:
        t = x[:, idx]
        q, k, v = attn.qkv(t).reshape(B, len(idx), 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        y = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1) @ v
        out[:, idx] = y.transpose(1, 2).reshape(B, len(idx), C)
    assert G == len(order)
    return attn.proj(out)


def test_recursion_shares_the_block_and_sets_nonshared_layers_between():
    stage = _model().transformers[0]
    kinds = [type(b).__name__ for b in stage.blocks]
    assert kinds == ["SReTBlock", "NonProj", "SReTBlock", "NonProj"]
    assert stage.blocks[0] is stage.blocks[2] and stage.blocks[1] is not stage.blocks[3]


def test_group_attention_first_and_recursive_pass():
    attn = _model().transformers[0].blocks[0].attn  # groups1 = 8, groups2 = 2, on an 8x8 map
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        rows = [torch.arange(8 * g, 8 * g + 8) for g in range(8)]  # contiguous runs of 8 tokens
        torch.testing.assert_close(attn(x, (8, 8), False), _grouped_reference(attn, x, rows), atol=1e-5, rtol=1e-5)
        columns = [torch.arange(g, 64, 2) for g in range(2)]  # token i in group i mod 2
        torch.testing.assert_close(attn(x, (8, 8), True), _grouped_reference(attn, x, columns), atol=1e-5, rtol=1e-5)
        attn.train()
        torch.manual_seed(1)
        a = attn(x, (8, 8), True)
        torch.manual_seed(1)
        perm = torch.randperm(64)
        shuffled = [perm[:32], perm[32:]]
        torch.testing.assert_close(a, _grouped_reference(attn, x, shuffled), atol=1e-5, rtol=1e-5)


def test_learned_scalars_scale_the_residual_branches():
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        for m in model.modules():
            if type(m).__name__ == "NonProj":
                m.coefficient2.bias.zero_()  # NLL layers become the identity times coefficient1 (= 1)
        assert not torch.allclose(model(x), ref)
        block = model.transformers[2].blocks[1]
        y = torch.randn(1, 4, 64)
        torch.testing.assert_close(block(y), y)


def test_official_keys_and_no_token_reduction():
    model = _model()
    sd = model.state_dict()
    names = {"head.fc.weight": "head.weight", "head.fc.bias": "head.bias", "head.norm.weight": "norm.weight",
             "head.norm.bias": "norm.bias"}
    official = {names.get(k, k): v for k, v in sd.items()}
    assert "transformers.0.blocks.2.attn.qkv.weight" in official  # the shared block under both of its indices
    assert type(model).remap(official).keys() == sd.keys() == type(model).remap(sd).keys()
    assert "spatial map" in tokens.can_apply(model)
