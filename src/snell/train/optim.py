"""What every run optimises with: AdamW parameter groups, the warmup-cosine schedules and the epoch sampler.

The schedule and the sampler are pure functions of (config, step) and (seed, epoch), so a resumed run and a run
on N processes see the same rates and the same data order as one uninterrupted process."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Sampler

from snell.train.config import TrainConfig

#: Never decayed, whatever their shape. ``snell_mix`` is mixk's (α, γ, β), one row per adapter group (2-D, so the
#: shape rule alone would decay it): scalars of the kernel's shape, which the authors keep as 1-D (1,) tensors that
#: their optimizer does not decay; pulling α and γ towards 0 would change the kernel, not regularise the update.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "snell_mix")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D tensors (norms, biases, kernel coefficients), pos_embed, cls_token and mixk's
    (α, γ, β) (see :data:`NO_DECAY_NAMES`)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim <= 1 or leaf == "bias" or leaf in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """Linear warmup from ``warmup_lr`` to ``lr`` over ``warmup_steps``, then cosine from ``lr`` to ``min_lr``.

    Step ``total_steps - 1`` (the last optimizer step) gets ``min_lr``, unless the warmup takes every step before
    it: the one step after the warmup then runs at ``lr``, as the cosine's first step does.
    """
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def epoch_cosine(t: float, epochs: int, warmup_epochs: float, lr: float, warmup_lr: float, min_lr: float) -> float:
    """The rate of timm's ``CosineLRScheduler(t_initial=epochs, warmup_t=warmup_epochs)`` at epoch ``t``: linear from
    ``warmup_lr`` during the warm-up, else the cosine from ``lr`` to ``min_lr`` over all ``epochs`` (the warm-up is
    part of it, not a prefix), for t < ``epochs``."""
    if t < warmup_epochs:
        return warmup_lr + (lr - warmup_lr) * t / warmup_epochs
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t / epochs))


class WarmupCosine:
    """Sets the learning rate of every group before each optimizer step; its state is the step count.

    ``--lr-schedule per-step`` (:func:`warmup_cosine`): a new rate at every optimizer step, the cosine over the steps
    after the warm-up. ``reference``: the authors' (their ``train.py`` builds timm's cosine scheduler and calls
    ``step(epoch)`` after each epoch), constant within an epoch: epoch e runs at :func:`epoch_cosine` of t = e - 1,
    epoch 0 at ``warmup_lr`` (at ``lr`` without a warm-up), so the peak is never reached after a warm-up.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
        self.optimizer = optimizer
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = config.epochs * steps_per_epoch
        self.warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), self.total_steps - 1)
        self.step_count = 0
        self._apply()

    def current(self) -> float:
        """The rate of the next optimizer step."""
        return self.rate(self.step_count)

    def last(self) -> float:
        """The rate the last optimizer step ran at (the first step's before any)."""
        return self.rate(max(self.step_count - 1, 0))

    def rate(self, step: int) -> float:
        cfg = self.config
        if cfg.lr_schedule == "per-step":
            return warmup_cosine(step, self.total_steps, self.warmup_steps, cfg.lr, cfg.warmup_lr, cfg.min_lr)
        epoch = step // self.steps_per_epoch
        if epoch == 0:  # the rate timm's scheduler sets when it is made
            return cfg.warmup_lr if cfg.warmup_epochs > 0 else cfg.lr
        return epoch_cosine(epoch - 1, cfg.epochs, cfg.warmup_epochs, cfg.lr, cfg.warmup_lr, cfg.min_lr)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.current()

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


class EpochSampler(Sampler[int]):
    """A random permutation that depends on (seed, epoch) only, so a resumed epoch sees the same order."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
