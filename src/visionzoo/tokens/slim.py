"""Token slimming, from "Self-slimmed Vision Transformer" (Zong et al., ECCV 2022). https://arxiv.org/abs/2111.12624

A learnable token slimming module (TSM) after chosen blocks softly aggregates the ``N`` patch tokens into
``N' = N0 * keep ** s`` tokens (``N0`` the input's patch tokens, ``s`` the slimming step): a small MLP (LayerNorm,
Linear d -> d/2, GELU, Linear d/2 -> N') gives each input token ``N'`` logits, scaled by a learnable temperature
and soft-maxed over the input tokens, so each output token is a convex combination of the inputs (``W^T X``).
Nothing is dropped outright; the class and distillation tokens bypass the module. The modules are new parameters
(``blocks.i.token_hook.tsm.*`` in the state dict), so the method is for training: off the shelf a freshly
initialised TSM scrambles the tokens. ``keep=1.0`` adds no module and leaves the model unchanged.

Hyper-parameters (Sense-X/SiT @ f577808, ``models/lvvit.py``): ``keep`` (``keeping_ratio``) 0.5 at each of the
stage boundaries; SiT splits its blocks into 4 stages (e.g. [9, 3, 2, 2] for SiT-S), here, for depth D, after
blocks D/4, D/2 and 3D/4 (4 equal stages: DeiT 196 -> 98 -> 49 -> 24 patch tokens); hidden width d/2; init
trunc-normal 0.02, temperature 1. Not here: the FRD distillation of the paper (a reverse TSM after every block
matched to an unslimmed teacher's tokens, training only); fine-tune with the usual loss instead.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from visionzoo.errors import ArgumentError
from visionzoo.layers import TokenBlock, init_linear
from visionzoo.tokens.core import TokenHook, TokenReduction, TokenState, check_blocks, check_fraction

__all__ = ["TokenSlimming", "TokenSlimmingModule"]


class TokenSlimmingModule(nn.Module):
    """``(B, N, C) -> (B, N', C)``: each output token a softmax-weighted mix of the input tokens."""

    def __init__(self, dim: int, out_tokens: int, hidden_ratio: float = 0.5) -> None:
        super().__init__()
        hidden = int(dim * hidden_ratio)
        self.weight = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out_tokens))
        self.scale = nn.Parameter(torch.ones(1, 1, 1))
        self.apply(lambda m: init_linear(m, std=0.02))

    def forward(self, x: Tensor) -> Tensor:
        mix = (self.weight(x) * self.scale).softmax(dim=1)  # (B, N, N'), each column sums to 1 over the inputs
        return mix.transpose(1, 2) @ x  # (B, N', N) @ (B, N, C) -> (B, N', C)


class SlimHook(TokenHook):
    """The block, then (at a slimming block) the patch tokens through the TSM."""

    def __init__(self, state: TokenState, index: int, num_blocks: int, tsm: TokenSlimmingModule | None) -> None:
        super().__init__(state, index, num_blocks)
        self.tsm = tsm

    def run(self, block: TokenBlock, x: Tensor) -> Tensor:
        x = super().run(block, x)
        if self.tsm is None:
            return x
        P = self.state.prefix
        self.state.source = None  # a soft mix has no one-to-one source
        return torch.cat([x[:, :P], self.tsm(x[:, P:])], dim=1)


class TokenSlimming(TokenReduction):
    """Learnable soft token slimming after chosen blocks (see the module docstring)."""

    name = "slim"
    defaults: dict[str, Any] = dict(keep=0.5, blocks=None, hidden_ratio=0.5, img_size=None)

    def configure(self) -> None:
        p = self.params
        self.keep = check_fraction(self.name, "keep", p["keep"])
        self.blocks = [check_blocks(self.name, p["blocks"], len(seq), (len(seq) * k // 4 - 1 for k in (1, 2, 3)
                                                                         if len(seq) * k // 4 >= 1))
                       for seq in self.sequences]
        self.patches, self.dims = self._input_tokens(p["img_size"])
        self.out_tokens = []
        for blocks, n0 in zip(self.blocks, self.patches, strict=True):
            outs = [int(n0 * self.keep ** (s + 1)) for s in range(len(blocks))]
            if self.keep < 1 and min(outs, default=1) < 1:
                raise ArgumentError(f"slim: keep={self.keep} after {len(blocks)} slimming blocks leaves no patch token "
                                 f"of {n0}; raise keep or slim at fewer blocks")
            self.out_tokens.append(dict(zip(blocks, outs, strict=True)))

    def _input_tokens(self, img_size: int | None) -> tuple[list[int], list[int]]:
        """Patch tokens and width each sequence's first block gets, from one forward pass at ``img_size``."""
        model = self.model
        size = img_size
        if size is None and hasattr(model, "data_config"):
            size = model.data_config["input_size"][-1]
        if not isinstance(size, int) or size < 1:
            raise ArgumentError(f"slim: the module's output size depends on the token count; pass img_size (the input "
                             f"side), got {img_size!r}")
        seen: dict[int, tuple[int, int]] = {}

        def grab(block: nn.Module, args: tuple) -> None:
            seen.setdefault(id(block), (args[0].shape[1] - block.prefix_tokens, args[0].shape[-1]))

        firsts = [seq[0] for seq in self.sequences]
        handles = [b.register_forward_pre_hook(grab) for b in firsts]
        ref = next(model.parameters())
        was = model.training
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, getattr(model, "in_chans", 3), size, size, device=ref.device))
        finally:
            model.train(was)
            for h in handles:
                h.remove()
        return [seen[id(b)][0] for b in firsts], [seen[id(b)][1] for b in firsts]

    def make_hook(self, state: TokenState, index: int, num_blocks: int) -> TokenHook:
        seq = len(self.states) - 1
        out = self.out_tokens[seq].get(index) if self.keep < 1 else None
        tsm = None if out is None else TokenSlimmingModule(self.dims[seq], out, self.params["hidden_ratio"])
        return SlimHook(state, index, num_blocks, tsm)
