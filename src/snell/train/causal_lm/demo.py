"""`snell demo --task llm`: instruction fine-tuning of a small causal LM on real text, offline, on CPU.

The model is the small LLaMA-architecture model pretrained on BBC News by
benchmarks/accuracy/pretrain_llama.py (about 1.1 M parameters; NOT LLaMA-2-7B), shipped in
``snell/data/tiny_llama_bbc``. The task turns BBC News topic classification into instructions in the
LLM-Adapters format ("Which section ...? Answer: sport"), trained with each method through the same
`snell train` command, same data, budget, schedule and seed, and scored by greedy generation: the first
section name in the generated text must be the article's. The held-out articles are the fixed val/test
sets of ``few_shot_split``, which pretraining never saw.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from snell.train.config import UserError
from snell.train.data import DATA_DIR, few_shot_split, load_bbc_news
from snell.train.demo import _flags, train_and_compare

MODEL_DIR = DATA_DIR / "tiny_llama_bbc"
METHODS = ("snell", "lora", "dora", "full")
ARTICLE_WORDS = 30
#: `snell train` flags shared by every method.
SETTINGS: dict[str, Any] = {
    "max_length": 256,  # the Alpaca preamble alone is about 127 tokens of this BBC-trained tokenizer
    "max_new_tokens": 4,
    "epochs": 8,
    "batch_size": 16,
    "eval_batch_size": 100,
    "warmup_epochs": 1,
    "weight_decay": 0.01,
    "select_on": "val",
    "r": 8,
    "sparsity": 0.5,
    "seed": 0,
}
#: Peak learning rate per method: for snell and lora the better of two rates on val (1e-2 vs 5e-2; 5e-3 vs 2e-2).
LEARNING_RATES = {"snell": 5e-2, "lora": 2e-2, "dora": 2e-2, "full": 1e-3}
SHOTS = 64


def instruction(article: str, sections: list[str]) -> dict[str, str]:
    words = article.split()
    return {
        "instruction": f"Which section of the BBC News website is this article from? Answer {', '.join(sections)}.",
        "input": " ".join(words[:ARTICLE_WORDS]),
    }


def write_task(out: Path) -> Path:
    """BBC News as instruction data: ``SHOTS`` articles per section to train on, the held-out val and test sets."""
    corpus = load_bbc_news()
    split = few_shot_split(corpus.labels, shots=SHOTS, seed=0)
    sections = corpus.class_names
    out.mkdir(parents=True, exist_ok=True)
    for name, indices in (("train", split.train), ("val", split.val), ("test", split.test)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i in indices:
                section = sections[int(corpus.labels[i])]
                record = {**instruction(corpus.texts[i], sections), "output": section, "answer": section}
                f.write(json.dumps({**record, "task": "bbc_news"}) + "\n")
    return out


def train_command(method: str, data: Path, out_dir: Path, epochs: int | None) -> list[str]:
    settings = {**SETTINGS, "model": MODEL_DIR, "data": data, "method": method, "lr": LEARNING_RATES[method]}
    if epochs is not None:
        settings["epochs"] = epochs
    return [sys.executable, "-m", "snell", "train", *_flags({**settings, "output_dir": out_dir})]


def run_llm_demo(methods: list[str], output_dir: Path | None, epochs: int | None, progress: bool) -> Path:
    """Fine-tune the small BBC News LLaMA with each method; print and write the comparison."""
    skipped = [m for m in methods if m == "linear"]
    methods = [m for m in methods if m != "linear"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"unknown methods {unknown}; for a causal LM choose from {list(METHODS)}")
    if not (MODEL_DIR / "config.json").is_file():
        raise UserError(f"{MODEL_DIR}: the demo model is missing; run benchmarks/accuracy/pretrain_llama.py")
    if skipped:
        print("linear (a new classification head) does not apply to a causal LM; skipped", flush=True)
    out = output_dir or Path("results") / "demo" / f"llm-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; choose another --output-dir")
    data = write_task(out / "data")
    title = (
        f"Small LLaMA (1.1 M params, BBC-pretrained; not LLaMA-2-7B), BBC sections as instructions, "
        f"{SHOTS}/section: test acc by generation, {epochs or SETTINGS['epochs']} epochs, seed {SETTINGS['seed']}"
    )
    train_and_compare(methods, lambda method, run: train_command(method, data, run, epochs), out, title, progress)
    return out
