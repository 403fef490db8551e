"""Parameter-efficient fine-tuning: a frozen backbone plus a method's few trainable parameters (and the classifier).

``apply_peft(model, method, ...)`` freezes every parameter, adds the method's own and unfreezes them with the
classifier (``model.classifier``, the one ``ClassifierHead``'s ``fc``); it returns a ``PeftHandle`` with the
trainable/total counts. Methods:

* ``lora`` (Hu et al., ICLR 2022, https://arxiv.org/abs/2106.09685; as used on ViT trackers in "Tracking Meets
  LoRA", Lin et al., ECCV 2024, https://arxiv.org/abs/2403.05231): ``W + (alpha / r) B A`` on every ``nn.Linear``
  outside the head (attention qkv/proj and MLP fc1/fc2 in transformers; ConvNeXt-style pointwise Linear layers),
  ``A`` Kaiming-uniform, ``B`` zero (so training starts at the frozen model); default ``r=8``, ``alpha=r``. A fused
  ``qkv`` gets one rank-``r`` update per projection (q, k, v), as LoRAT's code adapts timm's fused qkv. Written as a
  ``torch.nn.utils.parametrize`` parametrisation of the weight, so every use of ``weight`` (also the slices the
  attention seam reads) sees it; ``handle.merge()`` folds ``B A`` into the weights (the state dict is a plain model's
  again, and the output is the same).
* ``vqt`` (Visual Query Tuning, Tu et al., CVPR 2023, https://arxiv.org/abs/2212.03220): ``prompts`` learnable query
  tokens per block of a plain token model. They are appended to the block's input; through the attention seam's
  ``extra_bias`` the original tokens do not attend to them and they attend only to the original tokens, so the
  frozen features are unchanged. Each block's query outputs (mean over the queries) are concatenated with the pooled
  feature for a new linear classifier.
* ``prompt`` (Visual Prompt Tuning, Jia et al., ECCV 2022, https://arxiv.org/abs/2203.12119): ``prompts`` learnable
  tokens inserted after the prefix tokens before the first block (shallow) or replaced before every block (deep),
  removed after the last block; plain token models, through ``TokenBlock.token_hook``. Default 10 prompts.
* ``bitfit`` (Ben Zaken et al., ACL 2022, https://arxiv.org/abs/2106.10199): every bias.
* ``linear``: the classifier alone (linear probe).

``positions=True`` (``--peft-positions``) also trains the model's absolute position tables
(``model.position_tables()``), as LoRAT's ``pos_embed_trainable`` option does: the one part of a ViT's input embedding
that LoRA cannot adapt (a table, not a linear map). On small data it is what closes the gap to full fine-tuning
(README, "Learning with little data"). A model without such a table is refused.

Models that are not plain token models take ``lora`` (when they have Linear layers), ``bitfit`` and ``linear``; the
others are refused with the methods that apply. BatchNorm running statistics still update in training mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from visionzoo.backbone import require_logits
from visionzoo.errors import ArgumentError
from visionzoo.layers import TokenBlock

__all__ = ["PEFT_METHODS", "LoRA", "PeftHandle", "PromptHook", "VQTClassifier", "VQTHook", "adapter_spec",
           "apply_adapter_spec", "apply_peft", "count_parameters"]

PEFT_METHODS = ("lora", "vqt", "prompt", "bitfit", "linear")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _classifier_names(model: nn.Module) -> list[str]:
    c = getattr(model, "classifier", "head.fc")
    return [c] if isinstance(c, str) else list(c)


def _token_blocks(model: nn.Module) -> list[TokenBlock]:
    stages = model.stage_modules() if hasattr(model, "stage_modules") else []
    if stages and all(isinstance(s, TokenBlock) for s in stages) and hasattr(model, "num_prefix_tokens"):
        return list(stages)
    return []


@dataclass
class PeftHandle:
    """What ``apply_peft`` did: the method, its options, the trainable names and counts; ``merge()`` for LoRA."""

    method: str
    options: dict[str, Any]
    trainable: list[str]
    trainable_params: int
    total_params: int
    model: nn.Module = field(repr=False)

    @property
    def fraction(self) -> float:
        return self.trainable_params / max(1, self.total_params)

    @property
    def spec(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method}:{opts}" if opts else self.method

    def summary(self) -> str:
        return (f"peft {self.spec}: {self.trainable_params:,} of {self.total_params:,} parameters trainable "
                f"({100 * self.fraction:.2f}%)")

    def merge(self) -> nn.Module:
        """LoRA: fold ``(alpha / r) B A`` into each weight and drop the parametrisations (a plain model again, the
        same output); other methods: nothing to merge."""
        if self.method != "lora":
            return self.model
        self.model.peft_options = None  # a plain model again: nothing to re-apply when it is loaded
        for m in list(self.model.modules()):
            if isinstance(m, nn.Linear) and parametrize.is_parametrized(m, "weight"):
                trainable = m.parametrizations.weight.original.requires_grad
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
                m.weight.requires_grad_(trainable)
        return self.model


class LoRA(nn.Module):
    """The parametrisation ``W -> W + (alpha / r) B A`` of a Linear weight ``(out, in)``.

    ``groups > 1`` splits the output rows into that many equal blocks, each with its own rank-``r`` update
    (``lora_A`` ``(groups * r, in)``, ``lora_B`` ``(out, r)``): a fused ``qkv`` projection gets one update each for
    q, k and v, as separate q/k/v layers would, and as "Tracking Meets LoRA" adapts timm's fused qkv."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, groups: int = 1) -> None:
        super().__init__()
        if out_features % groups:
            raise ArgumentError(f"LoRA: {out_features} output features do not split into {groups} groups")
        self.rank, self.scaling, self.groups = rank, alpha / rank, groups
        self.lora_A = nn.Parameter(torch.empty(groups * rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as the LoRA reference code (loralib)

    def delta(self) -> Tensor:
        """``(alpha / r) B A`` ``(out, in)``; with groups, block g of the rows is ``B_g A_g``."""
        g = self.groups
        if g == 1:
            return self.lora_B @ self.lora_A * self.scaling
        out, r = self.lora_B.shape
        b = self.lora_B.view(g, out // g, r)  # (g, out/g, r)
        a = self.lora_A.view(g, r, -1)  # (g, r, in)
        return torch.bmm(b, a).reshape(out, -1) * self.scaling

    def forward(self, w: Tensor) -> Tensor:
        return w + self.delta().to(w.dtype)


class PromptHook(nn.Module):
    """``TokenBlock.token_hook`` of visual prompt tuning for block ``index`` of ``depth``: inserts (first block) or
    replaces (deep) ``prompts`` tokens after the ``prefix`` tokens, runs the block, drops them after the last."""

    def __init__(self, index: int, depth: int, prefix: int, num: int, dim: int, own: bool) -> None:
        super().__init__()
        self.index, self.depth, self.prefix, self.num = index, depth, prefix, num
        self.prompts = nn.Parameter(torch.empty(1, num, dim)) if own else None
        if own:
            val = math.sqrt(6.0 / float(3 * dim))  # VPT's uniform init (xavier over the patch dimension), simplified
            nn.init.uniform_(self.prompts, -val, val)

    def forward(self, block: TokenBlock, x: Tensor) -> Tensor:
        P, T = self.prefix, self.num
        if self.prompts is not None:
            p = self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)
            rest = x[:, P:] if self.index == 0 else x[:, P + T:]
            x = torch.cat([x[:, :P], p, rest], dim=1)
        x = x + block.attn_branch(x)
        x = x + block.mlp_branch(x)
        if self.index == self.depth - 1:
            x = torch.cat([x[:, :P], x[:, P + T:]], dim=1)
        return x


class VQTHook(nn.Module):
    """``TokenBlock.token_hook`` of visual query tuning: ``num`` query tokens appended to the block's input that only
    read the original tokens (which never read them); their outputs are kept in ``self.out`` ``(B, dim)``."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.num = num
        self.queries = nn.Parameter(torch.zeros(1, num, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.out: Tensor | None = None

    def forward(self, block: TokenBlock, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        T = self.num
        y = torch.cat([x, self.queries.to(x.dtype).expand(B, -1, -1)], dim=1)
        allow = torch.zeros(N + T, N + T, dtype=torch.bool, device=x.device)
        allow[:, :N] = True  # every token (original and query) attends to the original tokens only
        core = block.attn_core
        prev = core.extra_bias
        if prev is not None and prev is not core.__dict__.get("lsa_mask"):  # LSA re-applies its own per call
            raise ArgumentError("vqt: the attention core has another tool's extra_bias; remove it first")
        core.extra_bias = allow
        try:
            y = y + block.attn_branch(y)
        finally:
            core.extra_bias = prev
        y = y + block.mlp_branch(y)
        self.out = y[:, N:].mean(1)
        return y[:, :N]


class VQTClassifier(nn.Module):
    """The classifier of VQT: ``Linear([pooled feature, each block's query output])``; set as the head's ``fc``."""

    def __init__(self, in_features: int, extra: int, num_classes: int, hooks: list[VQTHook]) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features + extra, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)
        object.__setattr__(self, "hooks", hooks)  # not submodules here (they are the blocks'); a deepcopy follows

    def forward(self, x: Tensor) -> Tensor:
        outs = [h.out for h in self.hooks]
        if any(o is None or o.shape[0] != x.shape[0] for o in outs):
            raise RuntimeError("VQT classifier called without a forward through the blocks (the query outputs)")
        return self.fc(torch.cat([x, *outs], dim=1))


def _refuse(model: nn.Module, method: str, why: str, alternatives: str) -> ArgumentError:
    name = getattr(model, "name", type(model).__name__)
    return ArgumentError(f"{name}: --peft {method} {why}; use --peft {alternatives}")


def _is_fused_qkv(name: str, linear: nn.Linear) -> bool:
    """A fused query/key/value projection: the shared attention's ``qkv`` Linear (``layers.Attention``, timm's
    name), three equal blocks of output rows."""
    return name.rsplit(".", 1)[-1] == "qkv" and linear.out_features % 3 == 0


def apply_peft(model: nn.Module, method: str, rank: int = 8, alpha: float | None = None, prompts: int = 10,
               deep: bool = False, positions: bool = False) -> PeftHandle:
    """Freeze ``model`` and add ``method``'s trainable parameters, in place; see the module docstring."""
    if method not in PEFT_METHODS:
        raise ArgumentError(f"peft must be one of {PEFT_METHODS}, got {method!r}")
    if rank < 1:
        raise ArgumentError(f"rank must be >= 1, got {rank}")
    if prompts < 1:
        raise ArgumentError(f"prompts must be >= 1, got {prompts}")
    require_logits(model, "peft")
    if getattr(model, "num_classes", 0) <= 0:
        raise ArgumentError("peft needs a model with a classifier (num_classes > 0)")
    if getattr(model, "token_reduction", None) is not None:
        raise ArgumentError("peft cannot be combined with token reduction (both use TokenBlock.token_hook)")
    tables = model.position_tables() if positions and hasattr(model, "position_tables") else []
    if positions and not tables:
        raise ArgumentError(f"{getattr(model, 'name', type(model).__name__)}: --peft-positions trains the absolute "
                            "position tables and this model has none (position_tables() is empty); drop "
                            "--peft-positions")
    blocks = _token_blocks(model)
    head_names = _classifier_names(model)
    head_mods = {n: model.get_submodule(n) for n in head_names}
    model.requires_grad_(False)
    options: dict[str, Any] = {}
    if method == "lora":
        alpha = float(rank if alpha is None else alpha)
        options = dict(rank=rank, alpha=alpha)
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
                   and not any(n == h or n.startswith(h + ".") for h in head_names)]
        if not linears:
            raise _refuse(model, method, "adapts nn.Linear layers and this model has none outside its head",
                          "bitfit or linear")
        for n, m in linears:
            groups = 3 if _is_fused_qkv(n, m) else 1
            parametrize.register_parametrization(m, "weight", LoRA(m.out_features, m.in_features, rank, alpha,
                                                                   groups))
    elif method in ("prompt", "vqt"):
        if not blocks:
            head = tuple(head_names)
            has_linear = any(isinstance(m, nn.Linear) and not n.startswith(head) for n, m in model.named_modules())
            raise _refuse(model, method, "adds tokens to a plain token model (blocks built on layers.TokenBlock, as "
                          "ViT/DeiT)", "lora, bitfit or linear" if has_linear else "bitfit or linear")
        if any(b.token_hook is not None for b in blocks):
            raise ArgumentError(f"--peft {method}: the model's blocks already have token hooks")
        dim = model.stage_info[-1].channels
        options = dict(prompts=prompts, **({"deep": deep} if method == "prompt" else {}))
        if method == "prompt":
            for i, b in enumerate(blocks):
                b.token_hook = PromptHook(i, len(blocks), model.num_prefix_tokens, prompts, dim, i == 0 or deep)
        else:
            hooks = [VQTHook(prompts, dim) for _ in blocks]
            for b, h in zip(blocks, hooks):
                b.token_hook = h
            for name, old in list(head_mods.items()):  # each classifier (DeiT has two) reads the query outputs too
                parent, _, attr = name.rpartition(".")
                new = VQTClassifier(old.in_features, dim * len(blocks), old.out_features, hooks)
                setattr(model.get_submodule(parent) if parent else model, attr, new.to(old.weight.device))
                head_mods[name] = new
    elif method == "bitfit":
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.requires_grad_(True)
    for m in head_mods.values():
        m.requires_grad_(True)
    if positions:
        options["positions"] = True
        for n in tables:
            model.get_parameter(n).requires_grad_(True)
    for m in model.modules():  # the method's own parameters
        if isinstance(m, (LoRA, PromptHook, VQTHook)):
            m.requires_grad_(True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    t, total = count_parameters(model)
    handle = PeftHandle(method, options, trainable, t, total, model)
    model.peft_options = {"method": method, **options}  # recorded next to the trained weights (adapter_spec)
    return handle


def adapter_spec(model: nn.Module) -> dict[str, Any] | None:
    """What ``apply_adapter_spec`` needs to rebuild ``model``'s extra parameters (SPT, LSA, DHVT, PEFT), or ``None``."""
    spec = dict(getattr(model, "small_data", None) or {})
    if getattr(model, "peft_options", None):
        spec["peft"] = dict(model.peft_options)
    return spec or None


def apply_adapter_spec(model: nn.Module, spec: dict[str, Any] | None) -> nn.Module:
    """Re-apply a recorded ``adapter_spec`` to a freshly built model (before loading its trained weights)."""
    if not spec:
        return model
    from visionzoo.train.small_data import apply_small_data

    apply_small_data(model, {k: v for k, v in spec.items() if k != "peft"})
    if spec.get("peft"):
        opts = dict(spec["peft"])
        apply_peft(model, opts.pop("method"), **opts)
    return model
