"""LLaMA-2-7B-shaped decoder layers with random weights, and the fine-tuning methods for them.

Two of LLaMA-2-7B's 32 decoder layers (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) carry every weight
shape of the full model, including the 11008×4096 MLP matrices above torch.quantile's 2^24-entry limit, at
a size one GPU trains in seconds. Built from a transformers ``LlamaConfig`` (no download); ``benchmarks.gpu``
times them, and a CPU scale benchmark can build the same layers with :func:`build`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import snell

LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}
"""LLaMA-2-7B's shapes (transformers' LlamaConfig fields)."""

TINY = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 256,
}
"""The same architecture at toy sizes, for smoke runs."""

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
"""The projections LoRA adapts in the LLM-Adapters commonsense setting the paper follows (App. C.4)."""


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so that ``model(ids)`` gives (tokens, vocab) logits for next-token targets: the shape
    the benchmarks' cross-entropy step expects of an image classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        logits = self.model(input_ids=ids).logits
        return logits[:, :-1].flatten(0, 1)


def next_tokens(ids: Tensor) -> Tensor:
    """The targets for :class:`CausalLMLoss`'s logits."""
    return ids[:, 1:].flatten()


def build(
    layers: int = 2, shape: dict[str, int] | None = None, device: str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> nn.Module:
    """A randomly initialised LlamaForCausalLM of ``layers`` decoder layers with ``shape`` (default LLaMA-2-7B),
    created directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM  # imported here: transformers takes seconds to import

    config = LlamaConfig(num_hidden_layers=layers, **(shape or LLAMA2_7B))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def _full(model: nn.Module) -> nn.Module:
    return model.requires_grad_(True)


def lora_method(rank: int, targets: list[str] | str = TARGETS) -> Callable[[nn.Module], nn.Module]:
    """peft LoRA-``rank`` (alpha = rank, no dropout) on ``targets``, as a model-to-model function."""

    def build(model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets))

    return build


def snell_method(rank: int, targets: list[str] | str = TARGETS) -> Callable[[nn.Module], nn.Module]:
    """SNELL-``rank`` at s = 0.9 on ``targets``, as a model-to-model function."""

    def build(model: nn.Module) -> nn.Module:
        return snell.get_snell_model(model, snell.SnellConfig(r=rank, sparsity=0.9, target_modules=targets))

    return build


METHODS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "snell8_s0.9": snell_method(8),
    "snell32_s0.9": snell_method(32),
    "lora8": lora_method(8),
    "full": _full,
}
"""The methods with the same names in :mod:`benchmarks.methods`, on the LLaMA projections; SNELL-32 (the paper's LLM
rank) for issue 25's SNELL-32 / SNELL-8 target. The reference-style SNELL is missing by design: its torch.quantile
refuses the 11008×4096 matrices."""
