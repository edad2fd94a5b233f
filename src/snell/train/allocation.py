"""SNELLA's sparsity allocation in a `snell train` run: the allocator a run makes from its options, and what each
epoch's metrics record of it. The loop calls the allocator itself (once per optimizer step, and per epoch)."""

from __future__ import annotations

from typing import Any

from torch import nn

from snell.allocator import SparsityAllocator
from snell.train.config import TrainConfig


def make_allocator(config: TrainConfig, model: nn.Module) -> SparsityAllocator | None:
    """snella's allocator over the (unwrapped) model's SNELL layers, each starting at ``--init-sparsity``; None for
    every other method."""
    if config.method != "snella":
        return None
    return SparsityAllocator(model, config.allocation_schedule())


def sparsity_record(allocator: SparsityAllocator) -> dict[str, Any]:
    """What metrics.jsonl holds about the allocation after an epoch: the overall ratio (size-weighted, what
    ``--target-sparsity`` aims at), the unweighted mean, min and max over all matrices, and every layer's
    sparsities (one per adapter group: q, k and v of a fused projection are three)."""
    layers = allocator.sparsity()
    values = [s for groups in layers.values() for s in groups]
    return {
        "overall": 1.0 - allocator.kept_ratio(),
        "mean": sum(values) / len(values),
        "min": min(values),
        "max": max(values),
        "layers": layers,
    }
