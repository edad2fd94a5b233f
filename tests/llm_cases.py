"""The tiny causal-LM case the LLM tests share: instruction records of two commonsense forms, a 2-layer random
LLaMA with a BPE tokenizer trained on them, and the `snell train` flags that fit it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from snell.train.causal_lm import instructions as I
from snell.train.causal_lm.tiny import train_tokenizer

TASKS = {"boolq": ("true", "false"), "winogrande": ("option1", "option2")}


def record(i: int, rng: random.Random) -> dict[str, str]:
    task = "boolq" if i % 2 else "winogrande"
    answer = rng.choice(TASKS[task])
    return {
        "instruction": f"Question {i}: is the sky {rng.choice(['blue', 'green'])} today?",
        "input": "" if i % 3 else "It rained in the morning.",
        "output": f"the correct answer is {answer}",
        "answer": answer,
        "task": task,
    }


def build_tiny(root: Path) -> tuple[Path, Path]:
    """(model folder, data folder) under ``root``."""
    rng = random.Random(0)
    data = root / "data"
    data.mkdir()
    records = {}
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        records[split] = [record(i, rng) for i in range(n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[split]))
    texts = [I.build_prompt(r["instruction"], r["input"]) + r["output"] for r in records["train"]]
    tokenizer = train_tokenizer(texts * 8, vocab_size=400)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, data


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--rank", "4", "-s", "0.5",
        "--epochs", "2", "--batch-size", "8", "--eval-batch-size", "8", "--lr", "1e-2", "--warmup-epochs", "0.5",
        "--max-length", "96", "--max-new-tokens", "6", "--select-on", "val", "--no-progress", *extra,
    ]  # fmt: skip
