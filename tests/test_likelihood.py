"""Likelihood scoring of causal-LM answers: the cached computation against the plain one, record by record."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from snell.train.causal_lm import instructions as I
from snell.train.causal_lm.evaluation import evaluate_split
from snell.train.causal_lm.likelihood import choice_log_likelihoods, choice_tokens, response_with
from snell.train.causal_lm.scoring import choices_for
from snell.train.config import TrainConfig
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
    # the answer's last occurrence is the one replaced; a form is taken only when every answer is of it
    asked = _example("Is it?", "", "true or false? the correct answer is true", "true")
    assert response_with(asked, "false") == "true or false? the correct answer is false"
    assert choices_for("mine", ["true", "maybe", "true"]) == (["maybe", "true"], True)


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


def _news(input: str, answer: str) -> I.Example:
    return I.Example("Which section of the BBC News website is this article from?", input, answer, answer, "news", "t")


def _evaluate(model: torch.nn.Module, tokenizer, examples: list[I.Example], pool: list[I.Example], score_by: str):
    """evaluate_split as a run calls it, on batches of 2 (left-padded prompts of different lengths)."""
    accelerator = Accelerator(cpu=True)
    items = I.EncodedSplit([I.encode(e, tokenizer, 256) for e in examples])
    loader = accelerator.prepare(DataLoader(items, batch_size=2, collate_fn=I.eval_collate(tokenizer)))
    config = TrainConfig(score_by=score_by, max_new_tokens=6)
    return evaluate_split(model, loader, accelerator, examples, tokenizer, config, pool)


EXAMPLES = [
    _news("Shares rose after strong profits at the bank.", "business"),
    _news("The striker scored twice in the final.", "sport"),
    I.Example("Answer true or false.", "Is the sky green today?", "the correct answer is false", "false", "boolq", "t"),
    _news("The minister said the election was close.", "politics"),
    I.Example("Answer true or false.", "Is water wet?", "the correct answer is true", "true", "boolq", "t"),
]
POOL = [*EXAMPLES, _news("A new phone was launched.", "tech")]  # "tech" is in the pool only: still a choice


def test_evaluation_picks_each_records_most_likely_answer_and_averages_the_loss_over_response_tokens() -> None:
    """Against the plain computation record by record: each record's chosen answer is the most likely of its task's
    set (drawn from the pool), scored with its own choices in its own batch, and the loss is the mean cross-entropy
    over response tokens. The model comes in train mode with attention dropout 0.5: evaluation must turn it off.
    Both sides are float32 forwards of the same weights (see the cached-scores test: 1e-4 per score); a record
    whose two best answers are closer than 1e-3 could go either way and is not compared. The mean cross-entropy
    (~6) gathers the same per-token errors (~1e-5): rel 1e-4."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attention_dropout=0.5).eval()
    tokenizer = I.prepare_tokenizer(AutoTokenizer.from_pretrained(MODEL))
    compared, loss_sum, tokens = 0, 0.0, 0
    wanted = []
    with torch.no_grad():
        for example in EXAMPLES:
            options = choices_for(example.task, [p.answer for p in POOL if p.task == example.task])[0]
            prompt = I.prompt_ids(example, tokenizer, "alpaca")
            scores = [
                _plain_log_likelihood(
                    model, prompt, tokenizer(response_with(example, c), add_special_tokens=False)["input_ids"]
                )
                for c in options
            ]
            ranked = sorted(scores, reverse=True)
            wanted.append(options[scores.index(ranked[0])] if ranked[0] - ranked[1] >= 1e-3 else None)
            item = I.encode(example, tokenizer, 256)
            logits = model(input_ids=torch.tensor([item["input_ids"]])).logits[0, :-1].double()
            target = torch.tensor(item["labels"][1:])
            loss_sum += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
            tokens += int((target != -100).sum())
    result = _evaluate(model.train(), tokenizer, EXAMPLES, POOL, "likelihood")
    assert not model.training
    for prediction, want in zip(result["predictions"], wanted, strict=True):
        compared += want is not None
        assert want is None or prediction["chosen"] == want
    assert compared >= 3
    assert result["loss"] == pytest.approx(loss_sum / tokens, rel=1e-4)
    # One record alone still chooses among its task's answers in the pool, not among the evaluated records' own.
    alone = _evaluate(model, tokenizer, EXAMPLES[:1], POOL, "likelihood")
    assert wanted[0] != EXAMPLES[0].answer and alone["predictions"][0]["chosen"] == wanted[0]


def test_generation_reads_left_padded_prompts_and_records_the_continuation_only() -> None:
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tokenizer = I.prepare_tokenizer(AutoTokenizer.from_pretrained(MODEL))
    items = [{**I.encode(e, tokenizer, 256), "index": i} for i, e in enumerate(EXAMPLES[:3])]
    batch = I.eval_collate(tokenizer)(items)
    for row, item in enumerate(items):  # each prompt ends at the last column, where generation continues it
        width, length = batch["prompt_ids"].shape[1], len(item["prompt_ids"])
        assert batch["prompt_ids"][row, width - length :].tolist() == item["prompt_ids"]
        assert batch["prompt_mask"][row].tolist() == [0] * (width - length) + [1] * length
    result = _evaluate(model, tokenizer, EXAMPLES, POOL, "generate")
    assert len(result["predictions"]) == 5
    assert not any("###" in p["generated"] for p in result["predictions"])  # the prompt's "### Instruction:" etc.
