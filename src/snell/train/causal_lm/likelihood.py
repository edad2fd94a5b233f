"""Scoring by likelihood: the answer whose response the model finds most probable, as lm-eval's multiple choice.

For each record, every answer of its task's closed set is written into the record's response (the record's
``output`` with its ``answer`` replaced, e.g. "the correct answer is false"; the answer alone if the output does
not contain it) and scored by the sum of its tokens' log-probabilities after the prompt. The highest sum is
the prediction. Unlike greedy generation it cannot produce an answer outside the set, or none, and it does
not depend on where a long generation happens to stop.

The prompt runs once per record: its keys and values are cached and each choice continues from a copy of that
cache, so K choices cost one prompt forward plus K short ones (not K full sequences).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from snell.train.causal_lm.instructions import Example


def response_with(example: Example, choice: str) -> str:
    """The record's response with ``choice`` in place of its answer (the last occurrence of it)."""
    assert example.answer is not None
    head, found, tail = example.output.rpartition(example.answer)
    return f"{head}{choice}{tail}" if found else choice


def choice_tokens(examples: Sequence[Example], choices: Sequence[list[str]], tokenizer: Any) -> list[list[list[int]]]:
    """Per record, the tokens of each of its choices' responses (tokenised alone, as training tokenises them)."""
    encoded: dict[str, list[int]] = {}

    def tokens(text: str) -> list[int]:
        if text not in encoded:
            encoded[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
        return encoded[text]

    return [[tokens(response_with(e, c)) for c in options] for e, options in zip(examples, choices, strict=True)]


@torch.no_grad()
def choice_log_likelihoods(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    choices: list[list[list[int]]],
    pad_id: int,
    spans: Sequence[int],
) -> torch.Tensor:
    """(records, choice slots) summed log-probabilities of each choice after its left-padded prompt; -inf where a
    record has fewer choices. ``spans``: the longest choice per slot over the whole split, so that every batch,
    on every process, runs the same forwards with the same widths (a sharded model's processes stay in step)."""
    rows = prompt_ids.shape[0]
    slots = len(spans)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    # Only the last position's logits are read: the others would be (rows, prompt, vocabulary), 2.4 GB for 100 rows
    # of SmolLM2 at 250 tokens.
    out = model(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # the distribution of each response's 1st token
    lengths = prompt_mask.sum(-1, keepdim=True)
    scores = torch.full((rows, slots), float("-inf"))
    for slot in range(slots):
        picked = [c[slot] if slot < len(c) else [] for c in choices]
        span = spans[slot]
        ids = torch.full((rows, span), pad_id, dtype=torch.long, device=prompt_ids.device)
        mask = torch.zeros((rows, span), dtype=prompt_mask.dtype, device=prompt_ids.device)
        for row, tokens in enumerate(picked):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        logp = first.unsqueeze(1)
        if span > 1:  # tokens 2..n of the choice, fed after a copy of the prompt's cache
            step = model(
                input_ids=ids[:, :-1],
                # Padding after a short choice is attended by nothing real (it comes later), so all ones will do.
                attention_mask=torch.cat([prompt_mask, torch.ones_like(mask[:, :-1])], dim=1),
                position_ids=lengths + torch.arange(span - 1, device=ids.device),
                past_key_values=copy.deepcopy(out.past_key_values),
                use_cache=True,
            )
            logp = torch.cat([logp, torch.log_softmax(step.logits.float(), dim=-1)], dim=1)
        token_logp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
        present = torch.tensor([slot < len(c) for c in choices])
        scores[:, slot] = torch.where(present, token_logp.sum(-1).cpu(), scores[:, slot])
    return scores
