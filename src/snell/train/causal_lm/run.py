"""`snell train`, `eval` and `merge` for causal language models, on the shared harness of ``snell.train.loop``.

:class:`CausalLMRun` reuses the run machinery (options check, schedule, accumulation, bf16 autocast,
checkpoints, ``--resume``, DDP) and replaces only what depends on the task kind: the data (instruction
records, tokenised with the prompt masked), the model (a transformers folder or a GGUF file, ``source.py``, in
the chosen dtype), the batch loss (next-token cross-entropy on response tokens, ``loss.py``) and evaluation
(loss and perplexity, plus accuracy by generation or by likelihood when the records carry an ``answer``,
``evaluation.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from snell.io import open_safetensors_modes
from snell.train.backbones import Backbone, check_positions
from snell.train.causal_lm import instructions as I
from snell.train.causal_lm.evaluation import ALL_TASKS, answer_pool, evaluate_split, longest_scoring_sequence
from snell.train.causal_lm.loss import chunked_response_loss
from snell.train.causal_lm.source import find_source, load_causal_lm
from snell.train.checkpoint import Progress
from snell.train.config import TrainConfig, UserError, first_process
from snell.train.loop import Report, Run
from snell.train.methods import apply_method, load_trained, merge_trained
from snell.train.optim import EpochSampler
from snell.train.precision import make_accelerator
from snell.train.tasks import Task


def build_causal_lm(config: TrainConfig) -> Backbone:
    """The causal LM of ``config.model`` in ``--model-dtype``, its tokenizer ready for padding, and the prompt
    format resolved against that tokenizer (recorded in ``info``, so the run folder says which one trained)."""
    source = find_source(config.model)
    if source is None:
        raise UserError(
            f"{config.model}: not a causal LM (a ...ForCausalLM or GPT2LMHeadModel folder, a .gguf file or a "
            "folder with one)"
        )
    progress = config.progress and first_process()  # one bar, not one per process
    model, tokenizer = load_causal_lm(source, getattr(torch, config.model_dtype), progress=progress)
    check_positions(model, config.max_length, "--max-length")
    # generation may follow a training-length sequence; the whole prompts it starts from, which --max-length does
    # not cut, are checked once encoded (check_scoring_positions)
    if config.score_by == "generate":
        check_positions(model, config.max_length + config.max_new_tokens, "--max-length + --max-new-tokens")
    if config.gradient_checkpointing:
        # Non-reentrant: correct with frozen embeddings (no input that requires grad) and with SNELL's function.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    prompt_format = I.resolve_prompt_format(config.prompt_format, tokenizer)
    info = {"architecture": type(model).__name__, "dtype": config.model_dtype, "prompt_format": prompt_format}
    if source.gguf_file:
        info["gguf_file"] = source.gguf_file
    tokenizer = I.prepare_tokenizer(tokenizer)
    return Backbone(model, "transformers", [], tokenizer=tokenizer, info=info, weights=config.model)


def check_config(config: TrainConfig) -> None:
    """Options that mean nothing, or something else, for a causal LM."""
    if config.method == "linear":
        raise UserError(
            "--method linear trains a classification head; a causal LM has none (use snell, snella, lora, dora or full)"
        )
    if config.data_format != "auto":
        raise UserError("a causal LM reads instruction data (train.jsonl, ...); leave --data-format at auto")
    if not config.data:
        raise UserError("no data given: pass --data <folder with train.jsonl and test.jsonl>")


def check_trainable_dtype(config: TrainConfig) -> None:
    """Full fine-tuning trains the base weights themselves, so they must keep the precision of an update.

    bf16 and fp16 keep 8 and 11 significant bits: an AdamW step of ``lr`` moves a weight w only if it exceeds
    half a unit in the last place, about |w|·2^-9 in bf16. At full fine-tuning's rates (1e-5 to 1e-4) and
    SmolLM2's weights, one step of 5e-5 leaves 92% of the bf16 weights unchanged, so the run silently does not
    train. SNELL, LoRA and DoRA keep their factors in float32 and are not affected.
    """
    if config.method == "full" and config.model_dtype != "float32":
        swallowed = {"bfloat16": "|w|/512", "float16": "|w|/4096"}[config.model_dtype]  # 2^-9, 2^-12 of |w| at most
        raise UserError(
            f"--method full trains the base weights, and in --model-dtype {config.model_dtype} their rounding "
            f"swallows fine-tuning steps (any step under about {swallowed}); use --model-dtype float32, "
            "with --bf16 for bfloat16 compute"
        )


def _check_answers(split: str, examples: list[I.Example]) -> bool:
    """Whether a split is scored: every record has an ``answer``, or none has."""
    have = [e.answer is not None for e in examples]
    if any(have) and not all(have):
        first = next(e for e in examples if e.answer is None)
        raise UserError(f"{first.origin}: no 'answer' field, but other {split} records have one; give all or none")
    return all(have)


def load_examples(config: TrainConfig, evaluating: str | None = None) -> dict[str, list[I.Example]]:
    """The splits a run uses, whole: ``--max-eval-samples`` limits what is evaluated (:func:`evaluated`), not the
    val records that train under the default protocol, nor the answers a task may take. ``snell eval`` of split
    ``evaluating`` needs only that split (other data may hold nothing else)."""
    need_val = config.select_on == "val" if evaluating is None else evaluating == "val"
    splits = I.load_splits(Path(config.data), need_val=need_val, need_train=evaluating is None)
    for split in ("val", "test"):
        if split in splits:
            _check_answers(split, splits[split])
    return splits


def evaluated(splits: dict[str, list[I.Example]], split: str, config: TrainConfig) -> list[I.Example]:
    """The records of ``split`` that an evaluation scores: its first ``--max-eval-samples``."""
    return splits[split][: config.max_eval_samples]


def encode_split(examples: list[I.Example], backbone: Backbone, config: TrainConfig, train: bool) -> I.EncodedSplit:
    """Tokenised examples; a warning names how many lost their whole response to ``--max-length``."""
    tokenizer, prompt_format = backbone.tokenizer, backbone.info["prompt_format"]
    items = [I.encode(e, tokenizer, config.max_length, prompt_format, config.train_on_prompt) for e in examples]
    # no label left to count: the prompt fills --max-length (--train-on-prompt labels the prompt too, so loses none)
    lost = [e.origin for e, item in zip(examples, items, strict=True) if set(item["labels"]) == {I.IGNORE_INDEX}]
    if lost and len(lost) == len(items):  # an evaluation would report loss 0 and perplexity 1 on no token at all
        what = "training" if train else "evaluation"
        raise UserError(f"no {what} example has a response token within --max-length {config.max_length}; raise it")
    if lost:
        print(
            f"warning: {len(lost)} of {len(items)} examples (e.g. {lost[0]}) have no response token left within "
            f"--max-length {config.max_length}; they add nothing to the loss",
            file=sys.stderr,
            flush=True,
        )
    if train and config.packing:
        items = I.pack(items, config.max_length)
    return I.EncodedSplit(items)


def check_scoring_positions(
    examples: list[I.Example], dataset: I.EncodedSplit, backbone: Backbone, config: TrainConfig, pool: list[I.Example]
) -> None:
    """Refuse, before anything trains, an evaluation split whose scoring would run past the model's positions: its
    prompts are never cut (:func:`longest_scoring_sequence`), so --max-length does not bound them."""
    prompts = [len(item["prompt_ids"]) for item in dataset.items]
    tokens = longest_scoring_sequence(examples, prompts, pool, backbone.tokenizer, config)
    if tokens:
        longest = examples[prompts.index(max(prompts))].origin
        added = "--max-new-tokens" if config.score_by == "generate" else "the longest choice"
        what = f"{longest}: its whole prompt ({max(prompts)} tokens, never cut for scoring) plus {added}:"
        check_positions(backbone.model, tokens, what)


def make_loader(dataset: I.EncodedSplit, tokenizer: Any, config: TrainConfig, train: bool) -> DataLoader:
    """Training loaders shuffle by (seed, epoch) like every run; evaluation loaders keep the file order."""
    if train:
        return DataLoader(
            dataset,
            batch_size=config.batch_size,
            sampler=EpochSampler(len(dataset), config.seed),
            collate_fn=I.train_collate(tokenizer),
            num_workers=config.num_workers,
        )
    return DataLoader(
        dataset, batch_size=config.eval_batch_size, collate_fn=I.eval_collate(tokenizer), num_workers=config.num_workers
    )


class CausalLMRun(Run):
    """A `snell train` run on a causal LM; everything not overridden here is the shared harness."""

    scored_unit = "response_tokens"  # the loss is a mean over them

    def _build(self) -> None:
        config = self.config
        check_config(config)
        check_trainable_dtype(config)
        splits = load_examples(config)
        self.backbone = build_causal_lm(config)
        select = config.select_on == "val"
        train = splits["train"] + ([] if select else splits.get("val", []))
        self.eval_examples = {split: evaluated(splits, split, config) for split in ("val", "test") if split in splits}
        self.answer_pool = answer_pool(splits)
        sets = {
            "train": encode_split(train, self.backbone, config, train=True),
            "val": encode_split(self.eval_examples["val"], self.backbone, config, False) if select else None,
            "test": encode_split(self.eval_examples["test"], self.backbone, config, False),
        }
        for split, examples in self.eval_examples.items():
            if sets[split] is not None:
                check_scoring_positions(examples, sets[split], self.backbone, config, self.answer_pool)
        names = sorted({e.task or ALL_TASKS for e in self.eval_examples["test"]})
        self.task = Task(Path(config.data).name, "causal_lm", "instructions", 0, names, sets["train"], sets["test"])
        self.task.val = sets["val"]
        self.task.sizes = {k: len(v) for k, v in sets.items() if v is not None}
        if config.packing:
            self.train_unit = f"packed sequences (of {len(train)} examples)"
        self.model = apply_method(self.backbone, config)

    def _loader(self, dataset: I.EncodedSplit, train: bool) -> DataLoader:
        return make_loader(dataset, self.backbone.tokenizer, self.config, train)

    def _batch_loss(self, inputs: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean next-token loss over the batch's response tokens (token-level accuracy alongside)."""
        with self.accelerator.autocast():
            sums, correct, counts = chunked_response_loss(self.model, inputs, labels)
        count = int(counts.sum())
        return sums.sum() / max(count, 1), correct.sum().double(), count

    def _evaluate(self, loader: DataLoader, split: str) -> dict[str, Any]:
        result = evaluate_split(
            self.model,
            loader,
            self.accelerator,
            self.eval_examples[split],
            self.backbone.tokenizer,
            self.config,
            self.answer_pool,
        )
        self.model.train()
        return result

    def eval_metrics(self, loader: DataLoader, split: str) -> dict[str, float]:
        """Loss and perplexity always; accuracy (the selection score) when the split has answers, else 1/ppl."""
        result = self._evaluate(loader, split)
        metrics = {f"{split}_loss": result["loss"], f"{split}_ppl": result["perplexity"]}
        if "accuracy" in result:
            metrics.update({f"{split}_acc": result["accuracy"], f"{split}_acc_per_task": result["accuracy_per_task"]})
        return {"score": result.get("accuracy", math.exp(-result["loss"])), **metrics}

    def _report(self, progress: Progress, eval_split: str | None) -> Report:
        """Test loss and perplexity, and with answers the accuracy by ``--score-by`` (mean over tasks, per task)."""
        cfg = self.config
        test = self._evaluate(self.accelerator.prepare(self._loader(self.task.test, train=False)), "test")
        epoch = progress.best_epoch if eval_split else cfg.epochs
        how = {"val": "best val score", "test": "best TEST score (reference protocol: optimistic)"}.get(eval_split)
        kind = f"test accuracy at epoch {epoch}" + (f", the epoch with the {how}" if how else " (the last)")
        fields = {
            "test_accuracy": test.get("accuracy"),
            "test_accuracy_overall": test.get("accuracy_overall"),
            "test_accuracy_per_task": test.get("accuracy_per_task"),
            "test_loss": test["loss"],
            "test_perplexity": test["perplexity"],
            "accuracy_kind": (kind + _scoring(cfg))
            if "accuracy" in test
            else "test has no answers: loss and perplexity",
        }
        if eval_split:
            fields[f"best_{eval_split}_accuracy" if "accuracy" in test else f"best_{eval_split}_score"] = (
                progress.best_score
            )
        shown = f"accuracy {test['accuracy']:.4f}, " if "accuracy" in test else ""
        line = f"test {shown}loss {test['loss']:.4f}"
        return Report(fields, line, {"test_predictions.json": test.get("predictions", [])})

    def _save_merged(self, merged: nn.Module, directory: Path) -> None:
        save_merged(merged, self.backbone.tokenizer, directory, self.backbone.info["prompt_format"])

    def _adapter_record(self) -> dict[str, Any]:
        return {"prompt_format": self.backbone.info["prompt_format"]}


def _scoring(config: TrainConfig) -> str:
    """How a run's accuracy was scored, for summary.json's accuracy_kind."""
    if config.score_by == "likelihood":
        how = "the most likely answer of each task's set"
    else:
        how = "greedy generation" if config.num_beams == 1 else f"beam search with {config.num_beams} beams"
    return f" (mean over tasks; answers by {how})"


PROMPT_FILE = "snell_prompt.json"


def save_merged(model: nn.Module, tokenizer: Any, directory: Path, prompt_format: str) -> Path:
    """A plain ``save_pretrained`` folder (weights + tokenizer) that ``AutoModelForCausalLM`` and lm-eval load,
    with ``snell_prompt.json`` naming the prompt format it was trained with (the lm-eval examples take it from
    there: ``alpaca`` is the task file's own template, ``chat`` is ``--apply_chat_template``)."""
    model.config.use_cache = True  # switched off for gradient checkpointing; generation wants it
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    open_safetensors_modes(directory)
    (directory / PROMPT_FILE).write_text(json.dumps({"prompt_format": prompt_format}) + "\n")
    return directory


def recorded_config(config: TrainConfig, record: dict[str, Any]) -> TrainConfig:
    """The run's config with the prompt format it trained with, as its config.json records it (runs saved
    before the format was recorded knew only Alpaca)."""
    prompt_format = (record.get("backbone") or {}).get("prompt_format", "alpaca")
    return dataclasses.replace(config, prompt_format=prompt_format)


def restore(run_dir: Path, config: TrainConfig, adapter: Path | None) -> tuple[Backbone, nn.Module]:
    """The backbone of a finished causal-LM run with its saved adapter (or weights) applied."""
    check_config(config)
    set_seed(config.seed)
    backbone = build_causal_lm(dataclasses.replace(config, gradient_checkpointing=False))
    return backbone, load_trained(backbone, config, adapter or run_dir / "adapter")


def evaluate_run(
    run_dir: Path, config: TrainConfig, split: str, adapter: Path | None, data: str | None
) -> dict[str, Any]:
    """`snell eval` of a causal-LM run: loss, perplexity and (with answers) accuracy on one split."""
    config = dataclasses.replace(config, progress=False, data=data or config.data).evaluating(split)
    splits = load_examples(config, evaluating=split)
    examples = evaluated(splits, split, config)
    backbone, model = restore(run_dir, config, adapter)
    accelerator = make_accelerator(config)
    dataset = encode_split(examples, backbone, config, train=False)
    check_scoring_positions(examples, dataset, backbone, config, answer_pool(splits))
    loader = accelerator.prepare(make_loader(dataset, backbone.tokenizer, config, train=False))
    result = evaluate_split(
        accelerator.prepare(model),
        loader,
        accelerator,
        examples,
        backbone.tokenizer,
        config,
        answer_pool(splits),
    )
    result.pop("predictions", None)
    return {"run": str(run_dir), "split": split, **result}


def merge_run(run_dir: Path, config: TrainConfig, output: Path) -> Path:
    """`snell merge` of a causal-LM run: the update folded into the weights, saved with the tokenizer."""
    backbone, model = restore(run_dir, config, None)
    return save_merged(merge_trained(model, config), backbone.tokenizer, output, backbone.info["prompt_format"])
