"""Next-token cross-entropy on response tokens, without holding the (batch, tokens, vocabulary) logits.

A small LLM with a large vocabulary spends more memory on its logits than on its weights: SmolLM2-135M
(vocabulary 49152) at batch 16 × 256 has 384 MB of bf16 logits, and their fp32 copy, log-softmax and
gradient take 768 MB each; an evaluation batch of 100 holds 2.4 GB of logits and a 4.8 GB fp32 copy.
:func:`chunked_response_loss` runs the model with ``logits_to_keep=1`` (one position's logits), catches the
decoder's final hidden states with a forward hook (so the call still goes through DDP and accelerate's
autocast wrappers), keeps the positions whose next token is counted, and runs the head and cross-entropy on
them a chunk at a time, each chunk under a non-reentrant checkpoint: backward recomputes one chunk's logits
at a time instead of keeping all of them. The values are those of :func:`response_loss` on the full logits,
summed in another order.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from itertools import islice
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

from snell.train.causal_lm.instructions import IGNORE_INDEX

CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk (64 MB in fp32): a few such temporaries live at once, small next to the activations."""

LossParts = tuple[Tensor, Tensor, Tensor]
"""Per-sequence next-token loss sums, correct argmax predictions and counted tokens."""


def response_loss(logits: Tensor, labels: Tensor) -> LossParts:
    """Per-sequence next-token loss sums, correct argmax predictions and counted tokens (labels -100 skipped)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    counted = labels != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == labels) & counted
    return losses.sum(dim=1), correct.sum(dim=1), counted.sum(dim=1)


def _chunkable(model: nn.Module) -> bool:
    """Whether the head can run outside the model's forward with the same result.

    Under FSDP2 the root keeps its parameters (the head's among them) gathered from its forward to the end of
    backward, so the head runs whole here too. That end (the reshard and the reduce-scatter of every group) is
    hooked on the outputs of the sharded modules' forwards: the decoder layers' are in the chunks' graph, the
    root's own are not. So a model sharded at its root only (no ``_no_split_modules``) trains on the full logits;
    chunked, its gradients never reached its shards. Not where the model changes the head's output after it
    (Gemma-2's soft-capping, Cohere's logit scale), or cannot skip its own logits.
    """
    base = extract_model_from_parallel(model)
    if torch.is_grad_enabled() and _sharded_at_root_only(base):
        return False
    config = getattr(base, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    forward = (base.get_base_model() if hasattr(base, "get_base_model") else base).forward  # peft's, or the model's
    return base.get_output_embeddings() is not None and "logits_to_keep" in inspect.signature(forward).parameters


def _sharded_at_root_only(model: nn.Module) -> bool:
    """An FSDP2 root with no group inside it. Asked every step: a model that is not sharded is not walked, and a
    sharded one only up to its first inner group."""
    return isinstance(model, FSDPModule) and not any(
        isinstance(module, FSDPModule) for module in islice(model.modules(), 1, None)
    )


@contextmanager
def _final_hidden(decoder: nn.Module) -> Iterator[list[Tensor]]:
    """The decoder's last hidden states (after its final norm) of the forward run inside this block."""
    caught: list[Tensor] = []
    handle = decoder.register_forward_hook(lambda module, args, output: caught.append(output[0]))
    try:
        yield caught
    finally:
        handle.remove()


def _head_loss(head: nn.Module, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    logits = head(hidden).float()
    return nn.functional.cross_entropy(logits, targets, reduction="none"), logits.argmax(dim=-1) == targets


def chunked_response_loss(model: nn.Module, inputs: Mapping[str, Any], labels: Tensor) -> LossParts:
    """:func:`response_loss` of ``model(**inputs)`` with at most :data:`CHUNK_ELEMENTS` logits alive at a time.

    Falls back to the full logits where the head cannot run outside the forward (see :func:`_chunkable`).
    """
    if not _chunkable(model):
        return response_loss(model(**inputs).logits, labels)
    base = extract_model_from_parallel(model)
    with _final_hidden(base.get_decoder()) as caught:
        model(**inputs, logits_to_keep=1)
    targets = labels[:, 1:]
    counted = targets != IGNORE_INDEX
    rows, kept = caught[-1][:, :-1][counted], targets[counted]
    head = base.get_output_embeddings()
    step = max(1, CHUNK_ELEMENTS // base.config.vocab_size)
    # Under no_grad there is nothing to recompute: run the chunks plainly.
    run = partial(checkpoint, use_reentrant=False) if torch.is_grad_enabled() else (lambda fn, *args: fn(*args))
    # At least one chunk, empty if no token counts, so the loss stays connected to the graph for backward.
    parts = [run(_head_loss, head, rows[i : i + step], kept[i : i + step]) for i in range(0, max(len(rows), 1), step)]
    losses = torch.cat([loss for loss, _ in parts])
    correct = torch.cat([hit for _, hit in parts])
    sequence = counted.nonzero()[:, 0]
    sums = losses.new_zeros(len(labels)).index_add(0, sequence, losses)
    hits = torch.zeros(len(labels), dtype=torch.long, device=labels.device).index_add(0, sequence, correct.long())
    return sums, hits, counted.sum(dim=1)
