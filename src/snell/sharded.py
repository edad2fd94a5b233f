"""Whole tensors and shards of FSDP2's DTensors: what the core (the SNELLA allocator) and the training harness
(snell.train.fsdp, checkpoints) both need when a model's parameters are sharded over processes."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (collective: all-gathered, bits copied); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``target``: this process's shard of it when ``target`` is sharded."""
    if not isinstance(target, DTensor):
        return value
    # src_data_rank=None: every process holds the whole value and keeps its own slice, with no communication.
    return distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
