"""The models and fine-tuning methods the benchmarks compare, built the same way in every worker process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import timm
from torch import nn

import snell
from benchmarks.reference_snell import inject_reference_snell
from snell.allocator import AllocatorConfig, SparsityAllocator

NUM_CLASSES = 100
"""A VTAB-sized classifier head (the numbers in the method doc were taken with 100 classes)."""

ADAPTED_LAYERS = r"(.*\.)?blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
"""qkv, attn.proj, mlp.fc1 and mlp.fc2 of every block, as a full-name regex.

peft's list form would match ``patch_embed.proj`` too (suffix match), so every adapter method gets this
regex and adapts exactly the same layers.
"""


@dataclass(frozen=True)
class ModelSpec:
    """A timm model with random weights and the input size it is benchmarked at."""

    timm_name: str
    image_size: int
    options: dict[str, Any] = field(default_factory=dict)

    def create(self) -> nn.Module:
        return timm.create_model(
            self.timm_name, pretrained=False, num_classes=NUM_CLASSES, img_size=self.image_size, **self.options
        )


MODELS: dict[str, ModelSpec] = {
    "vit_b16": ModelSpec("vit_base_patch16_224", 224),
    "vit_l16": ModelSpec("vit_large_patch16_224", 224),
    "vit_h14": ModelSpec("vit_huge_patch14_224", 224),
    # Seconds-long stand-in for the tests: same block structure, tiny sizes.
    "vit_tiny_test": ModelSpec("vit_tiny_patch16_224", 32, {"patch_size": 8, "depth": 2, "embed_dim": 48}),
}


def _head_only(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    model.get_classifier().requires_grad_(True)
    return model


def _full(model: nn.Module) -> nn.Module:
    return model.requires_grad_(True)


def _peft(use_dora: bool) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model  # imported here: peft pulls in transformers (seconds)

        config = LoraConfig(
            r=8,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=ADAPTED_LAYERS,
            modules_to_save=["head"],
            use_dora=use_dora,
        )
        return get_peft_model(model, config)

    return build


def _reference(model: nn.Module) -> nn.Module:
    return inject_reference_snell(model, r=8, sparsity=0.9)


def build_snell(model: nn.Module, rank: int, sparsity: float, dropout: float, library: ModuleType = snell) -> nn.Module:
    """SNELL-r on the adapted layers, built with ``library`` (the installed snell, or another version of it
    imported under its own names, as :mod:`benchmarks.ab_step` does). With dropout, attn.proj's input stays
    undropped, as in the reference code, its reference-style copy and the shipped recipes."""
    config = library.SnellConfig(
        r=rank,
        sparsity=sparsity,
        dropout=dropout,
        drop_path=dropout,
        target_modules=ADAPTED_LAYERS,
        undropped_modules=r"(.*\.)?attn\.proj" if dropout else None,
        modules_to_save=["head"],
    )
    return library.get_snell_model(model, config)


SNELL_SETTINGS: dict[str, tuple[int, float, float]] = {
    "snell8_s0": (8, 0.0, 0.0),
    "snell8_s0.9": (8, 0.9, 0.0),
    "snell8_s0_dropout": (8, 0.0, 0.1),
    "snell8_s0.9_dropout": (8, 0.9, 0.1),
    "snell32_s0.9": (32, 0.9, 0.0),
}
"""(rank, sparsity, dropout and drop-path rate) of each SNELL method."""


def _snell_label(rank: int, sparsity: float, dropout: float) -> str:
    return f"SNELL-{rank} s={sparsity:g}" + (f", dropout/drop-path {dropout:g}" if dropout else "")


def _snell(rank: int, sparsity: float, dropout: float) -> Callable[[nn.Module], nn.Module]:
    return lambda model: build_snell(model, rank, sparsity, dropout)


SNELLA_TARGET = 0.8
"""SNELLA's target sparsity in the benchmarks: the default of its recipes and of `snell train --method snella`."""


def _snella(model: nn.Module) -> nn.Module:
    """SNELLA-8: the mixk kernel on the same layers, every matrix starting at the recipes' initial sparsity."""
    config = snell.SnellConfig(
        r=8, kernel="mixk", sparsity=0.01, target_modules=ADAPTED_LAYERS, modules_to_save=["head"]
    )
    return snell.get_snell_model(model, config)


def _snella_allocation(model: nn.Module) -> Callable[[], None]:
    """What SNELLA adds to every optimizer step: the allocator folds the factors' |θ·∇θ| into its EMAs. After the
    first step it also allocates the target budget once, so the timed steps run with the per-layer sparsities of
    the end of training (each q, k and v matrix its own), as the authors' runs do for most of their epochs."""
    allocator = SparsityAllocator(model, AllocatorConfig(target_sparsity=SNELLA_TARGET, total_steps=1))
    steps = 0

    def after_step() -> None:
        nonlocal steps
        allocator.accumulate()
        if steps == 0:
            allocator.update(1)
        steps += 1

    return after_step


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: how to build it on a model, and what it runs after every optimizer step, if anything
    (``after_step`` makes that callable for a built model)."""

    label: str
    build: Callable[[nn.Module], nn.Module]
    after_step: Callable[[nn.Module], Callable[[], None]] | None = None

    def step_hook(self, model: nn.Module) -> Callable[[], None] | None:
        return None if self.after_step is None else self.after_step(model)


METHODS: dict[str, Method] = {
    "head": Method("head only", _head_only),
    "full": Method("full fine-tuning", _full),
    "lora8": Method("peft LoRA-8", _peft(use_dora=False)),
    "dora8": Method("peft DoRA-8", _peft(use_dora=True)),
    "reference_snell8": Method("reference-style SNELL-8 s=0.9, dropout/drop-path 0.1", _reference),
    **{name: Method(_snell_label(*settings), _snell(*settings)) for name, settings in SNELL_SETTINGS.items()},
    "snella8": Method(
        f"SNELLA-8 (mixk, allocated sparsity, target {SNELLA_TARGET:g})", _snella, after_step=_snella_allocation
    ),
}
