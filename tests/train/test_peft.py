"""Parameter-efficient fine-tuning (LoRA, VQT, visual prompts, BitFit, linear probe), TrAct, SPT, LSA and DHVT."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import visionzoo
import visionzoo.tokens
from visionzoo.errors import ArgumentError
from visionzoo.layers import DAFF, SOPE, Attention
from visionzoo.train.optim import TrAct
from visionzoo.train.peft import apply_peft
from visionzoo.train.small_data import HeadInteraction, ShiftedPatchTokenization, apply_dhvt, apply_lsa, apply_spt

TEST_MODELS = visionzoo.list_models("*_test")


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return visionzoo.create_model(name, num_classes=10)


def _x(model: nn.Module) -> torch.Tensor:
    """A batch of 2 at the model's own input size."""
    c, h, w = model.data_config["input_size"]
    return torch.randn(2, c, h, w)


def _has_linear(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for n, m in model.named_modules() if not n.startswith("head"))


def _expected(method: str, name: str, before: set[str]) -> bool:
    """Whether ``name`` should train: what lora/prompt/vqt add (names new after apply_peft), biases for bitfit."""
    added = name not in before
    return {"lora": lambda n: added and "lora_" in n, "bitfit": lambda n: n.endswith("bias"),
            "linear": lambda n: False, "prompt": lambda n: added and n.endswith("token_hook.prompts"),
            "vqt": lambda n: added and n.endswith("token_hook.queries")}[method](name)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_peft_freezes_exactly_what_it_says(name):
    """Trainable = the method's parameters + the classifier, nothing else; one step changes only those."""
    for method in ("lora", "bitfit", "linear", "prompt", "vqt"):
        model = _model(name).train()
        heads = [model.classifier] if isinstance(model.classifier, str) else list(model.classifier)
        before = {n for n, _ in model.named_parameters()}
        if model.output != "logits":  # an image-to-image model has no classifier to tune
            with pytest.raises(ArgumentError, match="no classifier head"):
                apply_peft(model, method, rank=2, prompts=2)
            continue
        try:
            h = apply_peft(model, method, rank=2, prompts=2)
        except ArgumentError as e:
            assert method in ("prompt", "vqt", "lora") and "use --peft" in str(e)
            assert method != "lora" or not _has_linear(model)
            continue
        names = [n for n, _ in model.named_parameters()]
        want = {n for n in names if _expected(method, n, before) or any(n.startswith(c + ".") for c in heads)}
        assert set(h.trainable) == want, (method, set(h.trainable) ^ want)
        assert h.trainable_params == sum(p.numel() for n, p in model.named_parameters() if n in want)
        if method in ("bitfit", "linear", "lora"):  # a step moves the trainable parameters only
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
            model(_x(model)).square().mean().backward()
            opt.step()
            for n, p in model.named_parameters():
                if n not in want:
                    assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("name", ["vit_test", "crossvit_test", "tnt_test", "resnet_test"])
def test_peft_positions_trains_the_position_tables_too(name):
    """--peft-positions adds exactly ``position_tables()`` to what LoRA trains; a model without one is refused."""
    model = _model(name).train()
    tables = set(model.position_tables())
    if not tables:
        with pytest.raises(ArgumentError, match="no.*position_tables.*drop --peft-positions"):
            apply_peft(model, "bitfit", positions=True)
        assert all(p.requires_grad for p in model.parameters())  # refused before freezing anything
        return
    plain = set(apply_peft(_model(name), "lora", rank=2).trainable)
    h = apply_peft(model, "lora", rank=2, positions=True)
    assert set(h.trainable) == plain | tables and not plain & tables
    assert h.spec == "lora:rank=2,alpha=2.0,positions=True"
    model(_x(model)).square().mean().backward()
    assert all(model.get_parameter(n).grad is not None for n in tables)


@pytest.mark.parametrize("name", [n for n in TEST_MODELS if _has_linear(_model(n)) and _model(n).output == "logits"])
def test_lora_merge_is_exact(name):
    model = _model(name).eval()
    keys = set(model.state_dict())
    x = _x(model)
    plain = model(x)
    h = apply_peft(model, "lora", rank=4)
    assert torch.allclose(model(x), plain, atol=1e-6, rtol=0)  # B = 0: training starts at the frozen model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.05)
    adapted = model(x)
    assert not torch.equal(adapted, plain)  # (layer scale 1e-6 keeps the change small in ConvNeXt-like blocks)
    h.merge()
    assert set(model.state_dict()) == keys  # a plain model's checkpoint again
    merged = model(x)
    assert torch.allclose(merged, adapted, atol=1e-6, rtol=0), (merged - adapted).abs().max()
    if name == "vit_test":
        assert torch.equal(merged, adapted)


def test_lora_gives_q_k_and_v_their_own_update():
    """A fused qkv Linear gets one rank-r update per projection: the q block of B changes only the q rows."""
    from visionzoo.train.peft import LoRA

    model = _model("vit_test")
    apply_peft(model, "lora", rank=2)
    qkv = model.stage_modules()[0].attn.qkv
    lora = qkv.parametrizations.weight[0]
    dim = qkv.in_features
    assert isinstance(lora, LoRA) and lora.groups == 3 and lora.lora_A.shape == (3 * 2, dim)
    fc1 = model.stage_modules()[0].mlp.fc1
    assert fc1.parametrizations.weight[0].groups == 1
    with torch.no_grad():
        lora.lora_B[:dim].normal_()  # the q block only
        delta = lora.delta()
    assert delta[:dim].abs().sum() > 0 and delta[dim:].abs().sum() == 0
    b, a = lora.lora_B[:dim], lora.lora_A[:2]
    assert torch.allclose(delta[:dim], b @ a * lora.scaling)


@pytest.mark.parametrize("name", ["vit_test", "deit_test"])
def test_vqt_queries_leave_the_frozen_features_unchanged(name):
    model = _model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model.forward_features(x)
    apply_peft(model, "vqt", prompts=3)
    out = model.forward_features(x)
    assert torch.allclose(out, ref, atol=1e-5)
    logits = model(x)
    assert logits.shape == (2, 10)
    hooks = [b.token_hook for b in model.stage_modules()]
    assert all(h.out.shape == (2, model.stage_info[-1].channels) for h in hooks)
    logits.sum().backward()
    assert all(h.queries.grad is not None and h.queries.grad.abs().sum() > 0 for h in hooks)


def test_visual_prompts_shallow_and_deep():
    model = _model("vit_test").eval()
    depth, dim = len(model.stage_modules()), model.stage_info[-1].channels
    shallow = apply_peft(model, "prompt", prompts=5)
    assert shallow.trainable_params == 5 * dim + sum(p.numel() for p in model.head.fc.parameters())
    n_tokens = []
    model.stage_modules()[-1].register_forward_hook(lambda m, a, y: n_tokens.append(y.shape[1]))
    out = model.forward_features(torch.randn(2, 3, 64, 64))
    assert out.shape[1] == 1 + 16 and n_tokens == [1 + 16]  # prompts dropped after the last block
    deep = apply_peft(_model("vit_test"), "prompt", prompts=5, deep=True)
    assert deep.trainable_params - shallow.trainable_params == (depth - 1) * 5 * dim


@pytest.mark.parametrize("name,method,alt", [("resnet_test", "vqt", "--peft bitfit or linear"),
                                             ("resnet_test", "lora", "--peft bitfit or linear"),
                                             ("convnext_test", "prompt", "--peft lora, bitfit or linear")])
def test_peft_refusals_name_what_applies(name, method, alt):
    with pytest.raises(ArgumentError, match=alt):
        apply_peft(_model(name), method)


def test_tract_matches_the_reference_update():
    """The official implementation's own example (Felix-Petersen/tract ``tract.py``, MIT): the same weight
    gradient of a 2->5 3x3 conv, and an unchanged bias gradient."""
    torch.manual_seed(0)
    x, y = torch.randn(30, 2, 6, 4), torch.randn(30, 5, 4, 2)
    model = nn.Module()
    model.stem = nn.Conv2d(2, 5, 3)
    model.first_conv = "stem"
    tract = TrAct(model, 0.1)
    (y - model.stem(x)).pow(2).mean().backward()
    tract.precondition()
    ref = torch.tensor([[-0.0501, -0.0166, 0.0214], [-0.0230, 0.0324, 0.0655], [0.0010, 0.0600, 0.0290]])
    assert torch.allclose(model.stem.weight.grad[0, 0], ref, atol=1e-4)
    assert torch.allclose(model.stem.bias.grad, torch.tensor([0.0052, -0.0397, 0.1093, 0.0464, -0.1079]), atol=1e-4)
    with pytest.raises(ArgumentError, match="lambda must be > 0"):
        TrAct(model, 0.0)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_tract_takes_every_family(name):
    model = _model(name).train()
    if not isinstance(model.get_submodule(model.first_conv), (nn.Conv2d, nn.Linear)):  # ChannelViT's Conv3d
        with pytest.raises(ArgumentError, match="must be a Conv2d without groups or a Linear"):
            TrAct(model)
        return
    tract = TrAct(model)
    model(_x(model)).sum().backward()
    w = model.get_submodule(model.first_conv).weight
    g = w.grad.clone()
    tract.precondition()
    assert tract.rows == 0 and tract.gram is None and tract.rows_seen > 0  # consumed by the step
    assert not torch.equal(w.grad, g)
    tract.remove()


def test_spt_shifts_and_replaces_the_patch_embedding():
    spt = ShiftedPatchTokenization(1, 8, 4)
    x = torch.arange(64.0).view(1, 1, 8, 8)
    s = spt.shifted(x)
    assert s.shape == (1, 5, 8, 8) and torch.equal(s[:, 0], x[:, 0])
    assert torch.equal(s[0, 1, :6, :6], x[0, 0, 2:, 2:]) and (s[0, 1, 6:] == 0).all()  # moved up-left by p/2
    model = _model("vit_test").eval()
    apply_spt(model)
    assert isinstance(model.get_submodule(model.first_conv), ShiftedPatchTokenization)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    with pytest.raises(ArgumentError, match="plain ViTs"):
        apply_spt(_model("swin_test"))


def test_lsa_masks_the_diagonal_and_learns_a_temperature_per_head():
    from visionzoo.explain.attention import record_attention

    model = _model("vit_test").eval()
    apply_lsa(model)
    x = torch.randn(2, 3, 64, 64)
    with record_attention(model) as rec:
        model(x)
    assert len(rec.maps) == len(model.stage_modules())
    for amap in rec.maps:
        assert (amap.probs.diagonal(dim1=-2, dim2=-1) == 0).all()
    temps = [n for n, p in model.named_parameters() if n.endswith("temperature")]
    assert len(temps) == len(model.stage_modules())
    with pytest.raises(ArgumentError, match="plain ViTs"):
        apply_lsa(_model("resnet_test"))


def test_dhvt_parts_go_into_a_plain_vit():
    model = _model("vit_test")
    apply_dhvt(model)
    blocks = model.stage_modules()
    assert isinstance(model.get_submodule(model.first_conv.removesuffix(".proj.0.0")), SOPE)
    assert all(isinstance(b.mlp, DAFF) and isinstance(b.attn, HeadInteraction) for b in blocks)
    TrAct(model).remove()  # first_conv names SOPE's first conv, so TrAct takes it
    with pytest.raises(ArgumentError, match="DAFF"):
        visionzoo.tokens.apply(model, "tome", r=2)
    x = torch.randn(4, 3, 64, 32)  # not square: DAFF reads the map's size from the input
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    y = torch.randint(0, 10, (4,))
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ArgumentError, match="plain ViTs"):
        apply_dhvt(_model("resnet_test"))
    with pytest.raises(ArgumentError, match="one of --spt and --dhvt"):
        apply_dhvt(apply_spt(_model("vit_test")))


def test_head_interaction_equals_dhvt_attention():
    """A plain ViT attention wrapped with head tokens computes what the DHVT family's HI-MHSA computes."""
    dhvt = visionzoo.create_model("dhvt_test").eval()
    hi = dhvt.blocks[0].attn
    attn = Attention(hi.qkv.in_features, hi.num_heads, qkv_bias=True)  # a plain ViT's attention
    wrapped = HeadInteraction(attn, hi.qkv.in_features, hi.num_heads, prefix=1).eval()
    own = dict(wrapped.named_parameters())
    with torch.no_grad():
        for name, p in hi.named_parameters():
            own[name if name.startswith(("ht_", "pos_")) else "attn." + name].copy_(p)
    x = torch.randn(2, 1 + 16, hi.qkv.in_features)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), hi(x, (4, 4)), atol=1e-5)
        probs = wrapped.attention_probs(x)
    assert probs.shape == (2, hi.num_heads, 17, 17)
    assert torch.allclose(probs.sum(-1), torch.ones(2, hi.num_heads, 17))


@pytest.mark.slow
def test_train_peft_lora_cli_writes_a_merged_plain_checkpoint(tmp_path):
    from visionzoo.cli import main
    from visionzoo.train.evaluate import load_trained

    assert main(["train", "--model", "vit_test", "--img-size", "32", "--patch-size", "8", "--epochs", "1",
                 "--limit-train", "64", "--limit-val", "20", "--batch-size", "32", "--no-progress", "--threads", "1",
                 "--peft", "lora", "--rank", "2", "--tract", "0.1", "--out", str(tmp_path)]) == 0
    model, _ = load_trained(tmp_path / "model.safetensors")  # a plain vit_test, no LoRA keys
    assert not any("lora" in k for k in model.state_dict())


@pytest.mark.parametrize("spec", [{"spt": True, "lsa": True, "peft": {"method": "vqt", "prompts": 2}},
                                  {"lsa": True, "peft": {"method": "prompt", "prompts": 3, "deep": True}},
                                  {"peft": {"method": "lora", "rank": 2, "alpha": 2.0}},
                                  {"peft": {"method": "lora", "rank": 2, "alpha": 2.0, "positions": True}},
                                  {"lsa": True, "dhvt": True, "peft": {"method": "bitfit"}}])
def test_adapter_spec_rebuilds_the_trained_model(spec):
    """What training records (``adapter_spec``) rebuilds a model that loads the trained state dict strictly."""
    from visionzoo.train.peft import adapter_spec, apply_adapter_spec

    a = apply_adapter_spec(_model("vit_test").eval(), spec)
    assert adapter_spec(a) == spec
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01 * torch.randn_like(p))
    b = apply_adapter_spec(_model("vit_test").eval(), adapter_spec(a))
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(a(x), b(x), atol=1e-6)


@pytest.mark.parametrize("recipe", [pytest.param(["--peft", "vqt", "--prompts", "2", "--spt", "--lsa"],
                                                 marks=pytest.mark.slow, id="vqt-spt-lsa"),
                                    pytest.param(["--dhvt", "--lsa"], id="dhvt-lsa")])
def test_eval_rebuilds_a_small_data_run(tmp_path, recipe):
    from visionzoo.cli import main
    from visionzoo.train.data import load_data
    from visionzoo.train.evaluate import eval_checkpoint, load_trained
    from visionzoo.train.loop import load_train_state

    assert main(["train", "--model", "vit_test", "--img-size", "32", "--patch-size", "8", "--epochs", "1",
                 "--limit-train", "64", "--limit-val", "20", "--batch-size", "32", "--no-progress", "--threads", "1",
                 *recipe, "--out", str(tmp_path)]) == 0
    model, meta = load_trained(tmp_path / "model.safetensors")
    m = eval_checkpoint(model, load_data("digits", limit_train=64, limit_val=20), meta)
    assert m.top1 == pytest.approx(load_train_state(tmp_path / "latest.pt")["history"][-1]["val_top1"])
