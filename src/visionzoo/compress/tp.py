"""The Torch-Pruning engine (``prune(..., engine="torch-pruning")``): DepGraph prunes every coupled group, the
residual stream (embedding widths) included, as its ViT example does (``examples/transformers/prune_timm_vit.py``:
``MetaPruner`` with ``num_heads``, head dims pruned, head count kept, the classifier ignored).

Heads are handed to it from the attention seam: our own head probe (``groups._head_group``) names the layer that
produces q, k and v of each ``AttentionCore``; after pruning, the owner's ``num_heads`` and ``head_dim`` follow the
new widths. Families whose graph Torch-Pruning cannot follow raise with the reason (use ``engine="visionzoo"``).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from visionzoo.errors import ArgumentError, BackendUnavailable
from visionzoo.layers import AttentionCore


def prune_with_torch_pruning(model: nn.Module, ratio: float, importance: str, batches: list[Tensor] | None,
                             labels, x: Tensor) -> nn.Module:  # noqa: ANN001
    try:
        import torch_pruning as tp
    except ImportError as e:
        raise BackendUnavailable("engine='torch-pruning' needs Torch-Pruning: pip install 'visionzoo[prune]' "
                                 "(or pip install torch-pruning)") from e
    from visionzoo.compress.groups import _head_group
    from visionzoo.compress.prune import PruneResult, _taylor_grads

    mods = dict(model.named_modules())
    num_heads, owners = {}, []
    for name, m in mods.items():
        if isinstance(m, AttentionCore):
            g = _head_group(model, x, name)
            if g is not None and len(g.producers) == 1:
                producer = mods[g.producers[0][0]]
                num_heads[producer] = g.units
                owners.append((mods[g.owner], producer, sum(len(c) for c in g.producers[0][1].values()) // g.units))
    imp = tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude" else \
        tp.importance.GroupTaylorImportance()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    ignored = [classifier] if isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Identity) else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=ratio, ignored_layers=ignored,
                                          num_heads=num_heads, prune_head_dims=True, prune_num_heads=False,
                                          global_pruning=False)
            if importance == "taylor":
                _taylor_grads(model, batches, list(labels) if labels is not None else None)
            pruner.step()
        except Exception as e:  # noqa: BLE001
            name = getattr(model, "name", type(model).__name__)
            raise ArgumentError(f"Torch-Pruning cannot prune {name}: {type(e).__name__}: {str(e)[:200]}; "
                             f"use engine='visionzoo'") from e
    model.zero_grad(set_to_none=True)
    for owner, producer, per_head_old in owners:
        heads = pruner.num_heads.get(producer, owner.num_heads)
        owner.num_heads = heads
        if isinstance(getattr(owner, "head_dim", None), int):
            width = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
            tensors = per_head_old // owner.head_dim if owner.head_dim else 1
            owner.head_dim = width // (tensors * heads)
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:  # noqa: BLE001
        name = getattr(model, "name", type(model).__name__)
        raise ArgumentError(f"Torch-Pruning pruned {name} into a model that no longer runs ({type(e).__name__}: "
                         f"{str(e)[:200]}); use engine='visionzoo'") from e
    model.prune_result = PruneResult(engine="torch-pruning")
    return model
