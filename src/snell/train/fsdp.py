"""Sharded training (`snell train --fsdp`): FSDP2 ``fully_shard`` per transformer block and at the root.

Parameters become DTensors split over the processes. A block's forward all-gathers its weights, so SNELL's
fused function reads a whole ``self.weight`` as without sharding, and backward reduce-scatters the gradients;
frozen and trainable parameters share a block (FSDP2 keeps ``requires_grad`` per parameter). Everything
written to disk is whole: trainable tensors via ``full_tensor()``, the optimizer as a full state dict, the
adapter from whole copies of the parameters held while it is saved. So a checkpoint or an adapter of a sharded
run reads like one of an unsharded run.

Every function here that touches a sharded model is collective: all processes must call it, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from snell.train.config import UserError


def block_names(model: nn.Module) -> set[str]:
    """Class names of the blocks to shard one by one: transformers' ``_no_split_modules`` (LlamaDecoderLayer...)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def check_fsdp_processes(world: int) -> None:
    """--fsdp needs several processes to shard over."""
    if world < 2:
        raise UserError("--fsdp shards over several processes: launch with torchrun or accelerate launch")


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place over all processes: each block, then the root (embeddings, head, final norm).

    A model without ``_no_split_modules`` (timm) is sharded at the root only: correct, but every forward then
    gathers the whole model, so it saves memory between steps only.
    """
    check_fsdp_processes(dist.get_world_size() if dist.is_initialized() else 1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    names = block_names(model)
    model.to(device)
    for module in list(model.modules()):
        if type(module).__name__ in names:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Shard again what a forward left whole: with no backward to follow, an evaluation leaves the root's
    parameters (embeddings, head) as plain tensors, which the optimizer and the checkpoint do not know."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Hold whole copies of the parameters as plain tensors, for saving with code that knows nothing of shards.

    Copies, not FSDP's own ``unshard()``: saving may expose a tensor to numpy (safetensors), after which FSDP
    can no longer free the storage it gathered into. A parameter shared by two modules (tied embeddings) stays
    one tensor.
    """
    # A group left whole by an evaluation would be set back to shards by FSDP's state_dict pre-hook (saving
    # calls module.state_dict()), undoing the swap below; a sharded group's hook does nothing.
    reshard(model)
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    whole: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                if id(param) not in whole:
                    whole[id(param)] = nn.Parameter(param.detach().full_tensor(), param.requires_grad)
                swapped.append((module, name, param))
                module._parameters[name] = whole[id(param)]
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def optimizer_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict, whole (on the main process) when the model is sharded."""
    if not is_sharded(model):
        return optimizer.state_dict()
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to the main process only
    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=whole)


def load_optimizer_state(model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a state of :func:`optimizer_state`; each process takes its shard of the whole state."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(
        model, getattr(optimizer, "optimizer", optimizer), state, options=StateDictOptions(full_state_dict=True)
    )
