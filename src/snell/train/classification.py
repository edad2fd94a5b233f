"""Classification runs: a timm image model or a transformers text classifier with a new head, scored by accuracy.

The task-specific half of `snell train` for classifiers; :class:`snell.train.loop.Run` holds what every kind of
run shares (epochs, accumulation, checkpoints, resume, metrics, the summary).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from snell.train.backbones import Backbone, build_backbone
from snell.train.checkpoint import Progress
from snell.train.config import TrainConfig, UserError
from snell.train.loop import Report, Run
from snell.train.methods import apply_method, save_merged
from snell.train.optim import EpochSampler
from snell.train.tasks import Task, attach_transforms, load_task, make_collate


def make_loader(dataset: Dataset, task: Task, config: TrainConfig, tokenizer: Any, train: bool) -> DataLoader:
    """Training loaders shuffle with :class:`EpochSampler`; evaluation loaders keep the split's order."""
    collate = make_collate(task, tokenizer, config.max_length)
    batch = config.batch_size if train else config.eval_batch_size
    sampler = EpochSampler(len(dataset), config.seed) if train else None
    return DataLoader(dataset, batch_size=batch, sampler=sampler, collate_fn=collate, num_workers=config.num_workers)


def logits_of(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Logits for an image tensor (timm) or a tokenizer's dict (transformers)."""
    if isinstance(inputs, dict):
        return model(**inputs).logits
    return model(inputs)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    """Accuracy over the whole split, gathered from every process without duplicates."""
    model.eval()
    correct, seen = 0, 0
    for inputs, labels in loader:
        with accelerator.autocast():
            predictions = logits_of(model, inputs).argmax(dim=-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, labels))
        correct += int((predictions == labels).sum())
        seen += int(labels.numel())
    return correct / max(seen, 1)


class ClassificationRun(Run):
    """A `snell train` run on an image or text classification task."""

    def _build(self) -> None:
        config = self.config
        self.task: Task = load_task(config)
        self.backbone: Backbone = build_backbone(config, self.task.num_classes)
        wanted = "transformers" if self.task.kind == "text" else "timm"
        if self.backbone.kind != wanted:
            raise UserError(
                f"{self.task.name} is {self.task.kind} data but {config.model} is a {self.backbone.kind} model; "
                f"use a {'transformers model folder' if wanted == 'transformers' else 'timm model name'}"
            )
        attach_transforms(self.task, config, self.backbone.img_size, self.backbone.mean, self.backbone.std)
        self.model = apply_method(self.backbone, config)
        if self.backbone.weights == "random" and self.main:  # after the method's checks: their error is one line
            print(
                f"snell: WARNING: {config.model} starts from RANDOM weights (no --checkpoint, no --pretrained); "
                "fine-tuning a random backbone says nothing about fine-tuning a pretrained one",
                file=sys.stderr,
                flush=True,
            )

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return make_loader(dataset, self.task, self.config, self.backbone.tokenizer, train)

    def _batch_loss(self, inputs: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        with self.accelerator.autocast():
            logits = logits_of(self.model, inputs)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        return loss, (logits.argmax(dim=-1) == labels).sum().double(), labels.numel()

    def evaluate(self, loader: DataLoader) -> float:
        return accuracy(self.model, loader, self.accelerator)

    def eval_metrics(self, loader: DataLoader, split: str) -> dict[str, float]:
        score = self.evaluate(loader)
        return {"score": score, f"{split}_acc": score}

    def _report(self, progress: Progress, eval_split: str | None) -> Report:
        cfg = self.config
        if cfg.select_on == "val":
            test_acc = self.evaluate(self.accelerator.prepare(self._loader(self.task.test, train=False)))
            kind = f"test accuracy at epoch {progress.best_epoch}, the epoch with the best val accuracy"
        elif cfg.protocol == "reference":
            test_acc = progress.best_score
            kind = (
                f"MAXIMUM test accuracy over {sum('test_acc' in m for m in progress.metrics)} evaluations "
                f"(epoch {progress.best_epoch}; reference protocol: selected on test, optimistic)"
            )
        else:
            test_acc = self.evaluate(self.accelerator.prepare(self._loader(self.task.test, train=False)))
            kind = f"test accuracy after the last epoch ({cfg.epochs})"
        fields: dict[str, Any] = {"test_accuracy": test_acc, "accuracy_kind": kind}
        if eval_split:
            fields[f"best_{eval_split}_accuracy"] = progress.best_score
        return Report(fields, f"{kind}: {test_acc:.4f}", {})

    def _save_merged(self, merged: nn.Module, directory: Path) -> None:
        save_merged(merged, self.backbone, directory)
