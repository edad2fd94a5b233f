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

:class:`SnellaCallback` runs SNELLA's sparsity allocation inside any Trainer, for either kind of model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from snell.allocator import SparsityAllocator
from snell.io import CONFIG_NAME, adapter_state_dict, read_adapter, save_adapter
from snell.layers import SnellLayer, iter_snell_layers
from snell.spec import with_sparsities


def _has_adapters(model: nn.Module) -> bool:
    return any(True for _ in iter_snell_layers(model))


def restore_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy the tensors of the adapter saved in ``directory`` into ``model``'s existing SNELL adapter, in place.

    Unlike :func:`snell.load_adapter` (which adapts a fresh model), this keeps the parameter objects, which is
    what resuming needs; the saved config must equal the model's, but for the per-layer sparsities a SNELLA
    allocator set, which are restored with the tensors. The file is checked as ``load_adapter`` checks it.
    """
    directory = Path(directory)
    saved, _, _, tensors = read_adapter(directory)
    if dataclasses.replace(saved, layer_sparsity=None) != dataclasses.replace(model.snell_config, layer_sparsity=None):
        raise ValueError(f"the SNELL adapter in {directory} has another config than the model's: {saved}")
    expected = {key: tuple(value.shape) for key, value in adapter_state_dict(model).items()}
    found = {key: tuple(value.shape) for key, value in tensors.items()}
    if found != expected:
        differing = sorted(key for key in expected.keys() | found.keys() if expected.get(key) != found.get(key))
        raise ValueError(f"the SNELL adapter in {directory} does not fit the model: {differing[:5]} differ")
    layers = list(iter_snell_layers(model))
    sparsities = saved.layer_sparsity or {}
    specs = [  # checked before anything is copied
        with_sparsities(layer.snell_spec, sparsities.get(name, [saved.sparsity] * layer.snell_spec.groups))
        for name, layer in layers
    ]
    model.load_state_dict(tensors, strict=False)
    for (_, layer), spec in zip(layers, specs, strict=True):
        layer.snell_spec = spec


class SnellTrainerMixin:
    """Put in front of any Trainer class (``class MyTrainer(SnellTrainerMixin, trl.SFTTrainer)``) so that models
    from ``snell.get_snell_model`` are saved and resumed as SNELL adapters; other models are left to the Trainer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self._snell_model()
        trl = sys.modules.get("trl")  # imported already where an SFTTrainer is in use
        head = model.get_output_embeddings() if model is not None and hasattr(model, "get_output_embeddings") else None
        if trl is not None and isinstance(self, trl.SFTTrainer) and isinstance(head, SnellLayer):
            # TRL refuses the same for peft adapters: its loss multiplies the hidden states by lm_head.weight itself.
            raise ValueError(
                "a SNELL adapter on the LM head is not trained by TRL's SFTTrainer: its loss reads lm_head.weight "
                "directly, so ΔW would stay at its random start; leave the LM head out of target_modules"
            )
        checkpointing = getattr(self.args, "activation_checkpointing", False)
        reentrant = (getattr(self.args, "activation_checkpointing_kwargs", None) or {}).get("use_reentrant", False)
        if model is not None and checkpointing and reentrant and getattr(model, "main_input_name", "") != "input_ids":
            # A reentrant checkpoint gives its layers' parameters gradients only if an input of the segment requires
            # grad. transformers makes the embeddings' output require it for input_ids models and for peft's; a SNELL
            # model that takes pixel values got no gradient at all in its factors, and trained nothing.
            model.enable_input_require_grads()

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


class SnellaCallback(TrainerCallback):
    """Steps a SNELLA :class:`snell.allocator.SparsityAllocator` inside transformers' Trainer, as the authors' loop
    does: ``update(epoch)`` at each epoch's beginning (while the epoch is inside the schedule) and ``accumulate()``
    after each optimizer step.

    Why ``on_optimizer_step``: Trainer calls it right after ``optimizer.step()`` and before ``model.zero_grad()``, on
    optimizer steps only (not after each accumulated micro-batch), so the gradients are there and are the whole
    step's; under DDP they are averaged over the processes already, and any fp16 GradScaler has unscaled them (its
    gradient-norm pass unscales). ``on_step_end`` would come after ``zero_grad`` and see none. One difference stays:
    Trainer clips them to ``max_grad_norm`` (default 1.0) before the step, which the authors do not, so this callback
    warns unless ``max_grad_norm=0``. FSDP and DeepSpeed shard the gradients and are not supported.

    Every Trainer checkpoint gets the allocator's state (``snella_allocator.pt``); call :meth:`load` with the
    checkpoint folder before ``trainer.train(resume_from_checkpoint=...)`` to resume it.
    """

    STATE_NAME = "snella_allocator.pt"

    def __init__(self, allocator: SparsityAllocator) -> None:
        self.allocator = allocator
        self.last_update = -1  # the last schedule step applied: a resumed epoch does not re-allocate twice

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if args.max_grad_norm and args.max_grad_norm > 0:
            warnings.warn(
                f"SnellaCallback: Trainer clips gradients to max_grad_norm={args.max_grad_norm} before the allocator "
                "reads them, which SNELLA's authors do not; pass max_grad_norm=0 to allocate on the raw gradients",
                stacklevel=2,
            )

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        # state.epoch is epoch + (step + 1) / steps_in_epoch after each step: a whole number at an epoch's start,
        # or (resumed mid-epoch) a fraction of the epoch under way, whose update already happened before the save.
        epoch = math.floor(state.epoch + 1e-9)
        if self.last_update < epoch < self.allocator.config.total_steps:
            self.allocator.update(epoch)
            self.last_update = epoch

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.allocator.accumulate()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and folder.is_dir():
            state_dict = {"allocator": self.allocator.state_dict(), "last_update": self.last_update}
            torch.save(state_dict, folder / self.STATE_NAME)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        # load_best_model_at_end has just loaded the best checkpoint's factors (Trainer calls this after it), and
        # for a peft model only them: the sparsities that go with them are in that checkpoint's allocator state.
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None and (Path(best) / self.STATE_NAME).is_file():
            self.allocator.set_sparsity(self._saved(best)["allocator"]["sparsity"])

    def load(self, checkpoint: str | os.PathLike) -> None:
        """Restore the allocator saved in the Trainer checkpoint folder ``checkpoint`` (see :meth:`on_save`)."""
        saved = self._saved(checkpoint)
        self.allocator.load_state_dict(saved["allocator"])
        self.last_update = int(saved["last_update"])

    def _saved(self, checkpoint: str | os.PathLike) -> dict[str, Any]:
        return torch.load(Path(checkpoint) / self.STATE_NAME, map_location="cpu", weights_only=False)


__all__ = ["SnellTrainer", "SnellTrainerMixin", "SnellaCallback", "restore_adapter"]
