"""Instruction data in the LLM-Adapters / Alpaca format, the prompt, and tokenisation with a masked prompt.

A data folder holds ``train.jsonl`` and ``test.jsonl`` (``val.jsonl`` optional; JSON arrays ``*.json`` are
read too). Each record has ``instruction``, ``input`` (may be empty) and ``output``; scored tasks add
``answer`` (what the evaluation compares the extracted prediction with) and may name their sub-task in
``task`` (e.g. ``boolq``), which gives accuracy per task. This is the layout of LLM-Adapters'
commonsense_170k and of its per-task test files.

Two prompt formats: ``alpaca`` (LLM-Adapters' Alpaca template, what its commonsense setting trains and
scores with) and ``chat`` (the instruction, and the input below it, as one user turn of the tokenizer's own
chat template, which is what an instruct model was tuned on). Without ``--prompt-format``, a tokenizer with
a chat template gets ``chat`` and one without gets ``alpaca``.

The loss covers the response tokens only: the prompt's labels are -100. Prompt and response are tokenised
separately and concatenated, so the tokens the model learns to continue are exactly those it is given at
generation time (tokenising the joined string can merge tokens across the boundary).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from snell.train.config import UserError

IGNORE_INDEX = -100
PROMPT_FORMATS = ("alpaca", "chat")
SPLITS = ("train", "val", "test")
FIELDS = ("instruction", "input", "output")

#: The Alpaca prompt that LLM-Adapters trains and evaluates with (its finetune.py / commonsense_evaluate.py).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    """One record; ``origin`` ("file:line") is quoted in errors."""

    instruction: str
    input: str
    output: str
    answer: str | None
    task: str | None
    origin: str


def build_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt, ending where the response starts."""
    if input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def user_message(instruction: str, input: str = "") -> str:
    """The chat format's user turn: the instruction, then the input (if any) after a blank line."""
    return f"{instruction}\n\n{input}" if input.strip() else instruction


def resolve_prompt_format(requested: str | None, tokenizer: Any) -> str:
    """``requested``, or ``chat`` when the tokenizer has a chat template and ``alpaca`` otherwise."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested is None:
        return "chat" if has_template else "alpaca"
    if requested not in PROMPT_FORMATS:
        raise UserError(f"prompt_format must be one of {list(PROMPT_FORMATS)}, got {requested!r}")
    if requested == "chat" and not has_template:
        raise UserError("--prompt-format chat: this model's tokenizer has no chat template; use --prompt-format alpaca")
    return requested


def render_prompt(example: Example, tokenizer: Any, prompt_format: str) -> str:
    """The text the model sees before its response, in ``prompt_format``."""
    if prompt_format == "alpaca":
        return build_prompt(example.instruction, example.input)
    turn = [{"role": "user", "content": user_message(example.instruction, example.input)}]
    return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)


def prompt_ids(example: Example, tokenizer: Any, prompt_format: str) -> list[int]:
    """The prompt's tokens: Alpaca text gets the tokenizer's special tokens (LLaMA's <s>); a chat template
    writes its own, so nothing is added to it."""
    text = render_prompt(example, tokenizer, prompt_format)
    return tokenizer(text, add_special_tokens=prompt_format == "alpaca")["input_ids"]


def split_file(root: Path, split: str) -> Path | None:
    """``root/<split>.jsonl`` or ``root/<split>.json``, whichever exists; both is ambiguous, and refused."""
    found = [root / f"{split}{ext}" for ext in (".jsonl", ".json") if (root / f"{split}{ext}").is_file()]
    if len(found) > 1:
        raise UserError(f"{root} holds both {found[0].name} and {found[1].name}; keep the one {split} split to use")
    return found[0] if found else None


def _records(path: Path) -> list[tuple[str, Any]]:
    """(origin, parsed value) per record: per line for JSON Lines, per array item for a JSON file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason})") from None
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON array of records")
        return [(f"{path}: item {i}", item) for i, item in enumerate(items)]
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: invalid JSON: {err.msg}") from None
    return records


def holds_instructions(data: str | Path | None) -> bool:
    """Whether ``data`` is an instruction-data folder (its first training record has an ``instruction``), read
    cheaply, so that a model that cannot train on it is named before anything is loaded."""
    path = split_file(Path(data), "train") if data and Path(data).is_dir() else None
    if path is None:
        return False
    try:
        with open(path, encoding="utf-8-sig") as f:
            head = f.read(1 << 16)
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix == ".json":  # an array: look at the start of its first object
        return re.match(r'\s*\[\s*\{[^{}]*"instruction"\s*:', head) is not None
    first = next((line for line in head.split("\n") if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "instruction" in record


def read_examples(path: Path) -> list[Example]:
    """Every record of ``path``, checked: the three text fields must be strings, ``output`` non-empty."""
    examples = []
    for origin, record in _records(path):
        if not isinstance(record, dict):
            raise UserError(f"{origin}: expected an object with keys {list(FIELDS)}")
        missing = [name for name in ("instruction", "output") if name not in record]
        if missing:
            raise UserError(f"{origin}: missing field(s) {missing}")
        for name in (*FIELDS, "answer", "task"):
            value = record.get(name, "")
            # null stands for "none" where a field may be absent (input, answer, task), never for the two required
            if not isinstance(value, str) and (value is not None or name in ("instruction", "output")):
                raise UserError(f"{origin}: {name!r} must be a string, got {value!r}")
        if not record["instruction"].strip() or not record["output"].strip():
            raise UserError(f"{origin}: 'instruction' and 'output' must not be empty")
        examples.append(
            Example(
                record["instruction"],
                record.get("input") or "",
                record["output"],
                record.get("answer"),
                record.get("task"),
                origin,
            )
        )
    if not examples:
        raise UserError(f"{path}: no records")
    return examples


def load_splits(root: Path, need_val: bool, need_train: bool = True) -> dict[str, list[Example]]:
    """train and test (and val when selecting on it) from an instruction-data folder; an evaluation of other data
    (``need_train=False``) needs no training split."""
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; a causal LM trains on a folder with train.jsonl and test.jsonl")
    needed = {"train": need_train, "val": need_val, "test": True}
    splits = {}
    for split in SPLITS:
        path = split_file(root, split)
        if path is None:
            if needed[split]:
                raise UserError(f"{root}: no {split}.jsonl or {split}.json")
            continue
        splits[split] = read_examples(path)
    return splits


# ------------------------------------------------------------------------------------------------------
# Tokenisation


def prepare_tokenizer(tokenizer: Any) -> Any:
    """A pad token (LLaMA has none: use unk, as LLM-Adapters does, else eos) and right padding for training."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise UserError("the tokenizer has no pad, unk or eos token; add one to its folder")
    tokenizer.padding_side = "right"
    return tokenizer


def encode(
    example: Example, tokenizer: Any, cutoff: int, prompt_format: str = "alpaca", train_on_prompt: bool = False
) -> dict[str, list[int]]:
    """input_ids = prompt + response + eos, cut to ``cutoff`` tokens; labels -100 on the prompt.

    ``prompt_ids`` (the whole prompt, never cut, as in LLM-Adapters' evaluation) is what generation starts from.
    """
    prompt = prompt_ids(example, tokenizer, prompt_format)
    response = tokenizer(example.output, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = [*response, tokenizer.eos_token_id]
    ids = (prompt + response)[:cutoff]
    labels = list(ids) if train_on_prompt else ([IGNORE_INDEX] * len(prompt) + response)[:cutoff]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "prompt_ids": prompt}


def pack(encoded: Sequence[dict[str, list[int]]], cutoff: int) -> list[dict[str, list[int]]]:
    """Whole examples laid end to end, in order, into sequences of at most ``cutoff`` tokens.

    Fewer padding tokens per step; the price is that an example attends to the ones before it in its
    sequence (no attention reset), which is the usual packing compromise.
    """
    packed: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for item in encoded:
        if current["input_ids"] and len(current["input_ids"]) + len(item["input_ids"]) > cutoff:
            packed.append(current)
            current = {"input_ids": [], "attention_mask": [], "labels": []}
        for key in current:
            current[key] += item[key]
    if current["input_ids"]:
        packed.append(current)
    return packed


class EncodedSplit(Dataset):
    """Tokenised examples; item ``i`` carries its index so that scoring can find the record again."""

    def __init__(self, items: list[dict[str, list[int]]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.items[index], "index": index}


def train_collate(tokenizer: Any) -> Any:
    """Batches as ``(inputs, labels)`` for the shared training loop; labels are padded with -100."""
    from transformers import DataCollatorForSeq2Seq

    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")

    def collate(items: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        batch = pad([{k: item[k] for k in ("input_ids", "attention_mask", "labels")} for item in items])
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, batch["labels"]

    return collate


def eval_collate(tokenizer: Any) -> Any:
    """Evaluation batches: the teacher-forced sequences (for loss), and the prompts left-padded for generation."""
    train_pad = train_collate(tokenizer)
    pad_id = tokenizer.pad_token_id

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        inputs, labels = train_pad(items)
        width = max(len(item["prompt_ids"]) for item in items)
        prompt_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["prompt_ids"])
            prompt_ids[row, width - n :] = torch.tensor(item["prompt_ids"])
            prompt_mask[row, width - n :] = 1
        index = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return {**inputs, "labels": labels, "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "index": index}

    return collate
