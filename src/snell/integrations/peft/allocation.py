"""SNELLA's sparsity allocator over one adapter of a peft model."""

from __future__ import annotations

import torch
from torch import nn

from snell.allocator import AllocatorConfig, SparsityAllocator
from snell.integrations.peft.config import SnellPeftConfig
from snell.integrations.peft.layer import SnellPeftLayer
from snell.spec import SnellSpec


class PeftAdapterSlot:
    """An :class:`snell.allocator.AdapterSlot` over one adapter of a peft SNELL layer. Setting its spec also records
    the sparsities in the adapter's config (``layer_sparsity``), which ``save_pretrained`` writes."""

    def __init__(self, layer: SnellPeftLayer, adapter_name: str, name: str, config: SnellPeftConfig) -> None:
        self.layer, self.adapter_name, self.name, self.config = layer, adapter_name, name, config

    def factor(self, name: str) -> torch.Tensor:
        return getattr(self.layer, name)[self.adapter_name]

    def spec(self) -> SnellSpec:
        return self.layer.snell_specs[self.adapter_name]

    def set_spec(self, spec: SnellSpec) -> None:
        self.layer.snell_specs[self.adapter_name] = spec
        layers = dict(self.config.layer_sparsity or {})
        layers[self.name] = [spec.sparsity_of(g) for g in range(spec.groups)]
        self.config.layer_sparsity = layers

    def merged(self) -> bool:
        return self.adapter_name in self.layer.merged_adapters


def snella_allocator(model: nn.Module, config: AllocatorConfig, adapter_name: str = "default") -> SparsityAllocator:
    """A SNELLA allocator over adapter ``adapter_name`` of a peft model made with ``SnellPeftConfig`` (mixk is what
    the authors pair it with; any SNELL kernel works). Layers are named as ``layer_sparsity`` and peft's injection
    name them (module names in the base model). Call ``accumulate()`` after each optimizer step and ``update(epoch)``
    before each epoch, or let :class:`snell.integrations.transformers.SnellaCallback` do it inside a Trainer."""
    peft_configs = getattr(model, "peft_config", None)
    if not isinstance(peft_configs, dict) or not isinstance(peft_configs.get(adapter_name), SnellPeftConfig):
        raise ValueError(f"{type(model).__name__} has no SNELL peft adapter named {adapter_name!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    slots = {
        name: PeftAdapterSlot(module, adapter_name, name, peft_configs[adapter_name])
        for name, module in base.named_modules()
        if isinstance(module, SnellPeftLayer) and adapter_name in module.snell_A
    }
    return SparsityAllocator(model, config, slots)
