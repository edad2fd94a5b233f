"""transformers' Trainer for models adapted by ``snell.get_snell_model``: every save holds a SNELL adapter.

A plain Trainer saves a ``PreTrainedModel`` whole (config.json + model.safetensors), and ``from_pretrained`` on
that folder drops the SNELL tensors as unexpected. Adapter files written next to config.json would not help:
transformers then tries to load them as a peft adapter. So :class:`SnellTrainer` saves what Trainer saves for a
peft model: the adapter alone (a folder ``snell.load_adapter(base_model, folder)`` restores), with the tokenizer
and the training arguments, in ``save_model(dir)`` and in every ``checkpoint-N``. Resuming copies the saved
tensors into the model's existing adapter, so the optimizer state loaded next still refers to the same
parameters. Single-process and DDP training; DeepSpeed ZeRO-3 / FSDP shard the parameters and are not handled.

A model wrapped by peft (``get_peft_model(model, SnellPeftConfig(...))``, see :mod:`snell.integrations.peft`)
needs none of this: Trainer and TRL save and resume peft models themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from snell.config import SnellConfig
from snell.io import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, save_adapter
from snell.layers import iter_snell_layers


def _has_adapters(model: nn.Module) -> bool:
    return any(True for _ in iter_snell_layers(model))


def restore_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy the tensors of the adapter saved in ``directory`` into ``model``'s existing SNELL adapter, in place.

    Unlike :func:`snell.load_adapter` (which adapts a fresh model), this keeps the parameter objects, which is
    what resuming needs; the saved config must equal the model's.
    """
    directory = Path(directory)
    saved = SnellConfig.from_json((directory / CONFIG_NAME).read_text())
    if saved != model.snell_config:
        raise ValueError(f"the SNELL adapter in {directory} has another config than the model's: {saved}")
    tensors = load_file(str(directory / WEIGHTS_NAME))
    expected = {key: tuple(value.shape) for key, value in adapter_state_dict(model).items()}
    found = {key: tuple(value.shape) for key, value in tensors.items()}
    if found != expected:
        differing = sorted(key for key in expected.keys() | found.keys() if expected.get(key) != found.get(key))
        raise ValueError(f"the SNELL adapter in {directory} does not fit the model: {differing[:5]} differ")
    model.load_state_dict(tensors, strict=False)


class SnellTrainerMixin:
    """Put in front of any Trainer class (``class MyTrainer(SnellTrainerMixin, trl.SFTTrainer)``) so that models
    from ``snell.get_snell_model`` are saved and resumed as SNELL adapters; other models are left to the Trainer."""

    def _snell_model(self) -> nn.Module | None:
        model = self.accelerator.unwrap_model(self.model)
        return model if _has_adapters(model) else None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        model = self._snell_model()
        if model is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            save_adapter(model, output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        snell_model = self._snell_model()
        if snell_model is None or not (Path(resume_from_checkpoint) / CONFIG_NAME).is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_adapter(snell_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        snell_model = self._snell_model()
        if snell_model is None:
            return super()._load_best_model()
        restore_adapter(snell_model, self.state.best_model_checkpoint)


class SnellTrainer(SnellTrainerMixin, Trainer):
    """``transformers.Trainer`` that saves and resumes models from ``snell.get_snell_model`` as SNELL adapters."""


__all__ = ["SnellTrainer", "SnellTrainerMixin", "restore_adapter"]
