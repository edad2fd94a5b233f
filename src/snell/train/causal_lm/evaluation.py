"""Evaluating a causal LM on instruction records: loss and perplexity on the responses, and, where the records carry
an ``answer``, accuracy by generation (LLM-Adapters' protocol) or by the likelihood of each of the task's answers."""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from snell.train.causal_lm import instructions as I
from snell.train.causal_lm.likelihood import choice_log_likelihoods, choice_tokens
from snell.train.causal_lm.loss import chunked_response_loss
from snell.train.causal_lm.scoring import choices_for, extract_answer, pattern_for, score
from snell.train.config import TrainConfig
from snell.train.fsdp import is_sharded

ALL_TASKS = "all"  # the task name of records without a ``task`` field


def answer_pool(splits: dict[str, list[I.Example]]) -> list[I.Example]:
    """Every record with an answer, in every split: a task's closed set of answers is drawn from all of them, so an
    evaluation of a few records still chooses among all the task's answers (among only its own records' answers, one
    record would always be right)."""
    return [e for examples in splits.values() for e in examples if e.answer is not None]


def _answer_sets(examples: list[I.Example], pool: list[I.Example]) -> tuple[list[str], dict[str, list[str]]]:
    """Each record's task, and each task's closed set of answers, from the answers of ``pool`` (:func:`answer_pool`,
    which holds the evaluated records too)."""
    tasks = [e.task or ALL_TASKS for e in examples]
    answers: dict[str, list[str]] = {task: [] for task in tasks}
    for e in pool:
        if (e.task or ALL_TASKS) in answers:
            answers[e.task or ALL_TASKS].append(e.answer)
    return tasks, {task: choices_for(task, values)[0] for task, values in answers.items()}


def longest_scoring_sequence(
    examples: list[I.Example], prompt_lengths: list[int], pool: list[I.Example], tokenizer: Any, config: TrainConfig
) -> int:
    """The most positions that scoring ``examples`` by ``--score-by`` feeds the model in one sequence: the longest
    prompt (scoring never cuts it, as LLM-Adapters' evaluation) plus ``--max-new-tokens``, or plus the longest choice
    (every record's choices are padded to the split's longest); 0 without answers (only the loss, on sequences cut to
    ``--max-length``)."""
    if not examples or examples[0].answer is None:
        return 0
    if config.score_by == "generate":
        return max(prompt_lengths) + config.max_new_tokens
    tasks, choices = _answer_sets(examples, pool)
    tokens = choice_tokens(examples, [choices[t] for t in tasks], tokenizer)
    return max(prompt_lengths) + max(len(choice) for options in tokens for choice in options)


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    loader: DataLoader,
    accelerator: Accelerator,
    examples: list[I.Example],
    tokenizer: Any,
    config: TrainConfig,
    pool: list[I.Example],
) -> dict[str, Any]:
    """Loss and perplexity on the responses; with answers, accuracy by ``--score-by``: greedy generation (or
    beam search) and the first answer found in the text, or the most likely answer of the task's set (drawn from
    ``pool``'s answers: :func:`answer_pool` of the splits ``examples`` come from)."""
    model.eval()
    generator = accelerator.unwrap_model(model)
    scored = bool(examples) and examples[0].answer is not None
    tasks, choices = _answer_sets(examples, pool) if scored else ([], {})
    by_likelihood = scored and config.score_by == "likelihood"
    if by_likelihood:
        options = [choices[t] for t in tasks]
        option_tokens = choice_tokens(examples, options, tokenizer)
        slots = max(len(o) for o in options)
        spans = [max(len(t[k]) for t in option_tokens if k < len(t)) for k in range(slots)]
    loss_sum, tokens = 0.0, 0
    outputs: dict[int, str] = {}  # per record: the generated text, or the chosen answer
    for batch in loader:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with accelerator.autocast():
            sums, _, counts = chunked_response_loss(model, inputs, batch["labels"])
        sums, counts = accelerator.gather_for_metrics((sums, counts))
        loss_sum += float(sums.double().sum())
        tokens += int(counts.sum())
        if not scored:
            continue
        rows = batch["index"].tolist()
        if by_likelihood:
            with accelerator.autocast():
                likelihoods = choice_log_likelihoods(
                    generator,
                    batch["prompt_ids"],
                    batch["prompt_mask"],
                    [option_tokens[i] for i in rows],
                    tokenizer.pad_token_id,
                    spans,
                )
            texts = [options[i][k] for i, k in zip(rows, likelihoods.argmax(dim=-1).tolist(), strict=True)]
        else:
            with accelerator.autocast():
                output = generator.generate(
                    input_ids=batch["prompt_ids"],
                    attention_mask=batch["prompt_mask"],
                    max_new_tokens=config.max_new_tokens,
                    do_sample=False,
                    num_beams=config.num_beams,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                    synced_gpus=is_sharded(generator),  # sharded: every process runs every step's forward
                )
            texts = tokenizer.batch_decode(output[:, batch["prompt_ids"].shape[1] :], skip_special_tokens=True)
        outputs.update(accelerator.gather_for_metrics(list(zip(rows, texts, strict=True)), use_gather_object=True))
    loss = loss_sum / max(tokens, 1)
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "examples": len(examples)}
    if scored:
        if by_likelihood:
            predictions = [outputs[i] for i in range(len(examples))]
        else:
            patterns = {task: pattern_for(task, values) for task, values in choices.items()}
            predictions = [extract_answer(outputs[i], patterns[t]) for i, t in enumerate(tasks)]
        scores = score(tasks, [p == e.answer for p, e in zip(predictions, examples, strict=True)])
        result.update(accuracy=scores.average, accuracy_overall=scores.overall, accuracy_per_task=scores.per_task)
        key = "chosen" if by_likelihood else "generated"
        result["predictions"] = [
            {"task": e.task, key: outputs[i], "extracted": p, "answer": e.answer}
            for i, (p, e) in enumerate(zip(predictions, examples, strict=True))
        ]
    return result
