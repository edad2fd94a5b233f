"""Likelihood scoring of causal-LM answers: the cached computation against the plain one, record by record."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from snell.train.causal_lm import instructions as I
from snell.train.causal_lm.likelihood import choice_log_likelihoods, choice_tokens, response_with
from snell.train.causal_lm.scoring import choices_for
from snell.train.data import DATA_DIR

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = DATA_DIR / "tiny_llama_bbc"


def _example(instruction: str, input: str, output: str, answer: str) -> I.Example:
    return I.Example(instruction, input, output, answer, None, "test")


def test_the_response_takes_each_choice_in_place_of_the_answer() -> None:
    example = _example("Is it?", "", "the correct answer is true", "true")
    assert response_with(example, "false") == "the correct answer is false"
    assert response_with(_example("Which?", "", "sport", "sport"), "tech") == "tech"
    assert response_with(_example("Which?", "", "I think so", "yes"), "no") == "no"  # output without its answer
    assert choices_for("boolq", ["true"]) == (["true", "false"], False)
    assert choices_for(None, ["tech", "sport", "tech"]) == (["sport", "tech"], True)


def _plain_log_likelihood(model: torch.nn.Module, prompt: list[int], response: list[int]) -> float:
    """Sum of log p(response | prompt), from one forward over the whole sequence, no padding, no cache."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    return float(sum(logp[len(prompt) - 1 + t, token] for t, token in enumerate(response)))


def test_cached_choice_scores_equal_one_full_forward_per_choice() -> None:
    """Left-padded prompts of different lengths, choices of 1 to several tokens, one record with fewer choices:
    every score equals the plain computation. Both are float32 forwards of the same weights; they differ only
    in how attention is batched (cache and padding) and in summation order, so the per-token log-probabilities
    agree to a few float32 ulps of the logits (|logit| < 30 here: ~1e-5), summed over at most 8 tokens: 1e-4."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tokenizer = I.prepare_tokenizer(AutoTokenizer.from_pretrained(MODEL))
    examples = [
        _example("Which section is this article from?", "Shares rose after strong profits at the bank.", "business",
                 "business"),
        _example("Which section?", "", "sport", "sport"),
        _example("Pick one.", "The minister said the election was close.", "politics", "politics"),
    ]  # fmt: skip
    # Slot 0 holds one-token choices only ("a", "and", "in" in this tokenizer): the path without a second forward.
    options = [["a", "politics", "entertainment and the arts"], ["and", "tech"], ["in", "business"]]
    tokens = choice_tokens(examples, options, tokenizer)
    prompts = [I.prompt_ids(e, tokenizer, "alpaca") for e in examples]
    width = max(len(p) for p in prompts)
    prompt_ids = torch.full((3, width), tokenizer.pad_token_id)
    prompt_mask = torch.zeros((3, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        prompt_ids[row, width - len(p) :] = torch.tensor(p)
        prompt_mask[row, width - len(p) :] = 1
    spans = [max(len(t[k]) for t in tokens if k < len(t)) for k in range(3)]
    assert spans[0] == 1 and spans[1] > 1 and spans[2] > 1  # both paths of the slot loop run
    with torch.no_grad():
        scores = choice_log_likelihoods(model, prompt_ids, prompt_mask, tokens, tokenizer.pad_token_id, spans)
        for row, record in enumerate(tokens):
            for k in range(3):
                if k < len(record):
                    expected = _plain_log_likelihood(model, prompts[row], record[k])
                    assert scores[row, k].item() == pytest.approx(expected, abs=1e-4)
                else:
                    assert scores[row, k].item() == float("-inf")
