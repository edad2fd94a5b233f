"""Epoch checkpoints: everything a run needs to continue where it stopped, written so that a kill never leaves a
half-written one.

A checkpoint is ``checkpoints/epoch-NNNN/``: ``state.pt`` (the trainable tensors, the optimizer, the schedule, the
progress and the optional parts a run may have: snella's allocator, the weight average, the fp16 loss scale) and
one ``rng-rankR.pt`` per process (each process draws its own dropout masks and augmentation). It is written into a
temporary folder, synced, and renamed; older checkpoints are then removed. Every process takes part, because
sharded tensors (--fsdp) are gathered collectively.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from snell.sharded import full
from snell.train.config import UserError
from snell.train.fsdp import load_optimizer_state, optimizer_state
from snell.train.methods import load_mutable_state, mutable_state
from snell.train.optim import WarmupCosine

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
#: The optional parts of a run a checkpoint holds when the run has them, and what their absence means.
OPTIONAL_PARTS = {
    "allocator": "allocator state; it was not written by a snella run",
    "ema": "weight average; it was not written by a run with --ema-decay",
    "scaler": "loss scale; it was not written by a run with --fp16",
}


@dataclass
class Progress:
    """Everything a checkpoint restores besides tensors owned by the model, optimizer and schedule."""

    epoch: int = 0  # epochs completed
    metrics: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -1.0
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    train_time: float = 0.0
    #: snella: the per-layer sparsities that go with ``best_state`` (they are no tensor of the model).
    best_sparsity: dict[str, list[float]] | None = None
    #: --ema-decay: whether ``best_state`` holds the model's weights ("model") or their moving average ("ema").
    best_weights: str = "model"


def checkpoint_dirs(out: Path) -> list[Path]:
    """The run's epoch checkpoints, oldest first (normally one: each new one replaces the last)."""
    root = out / CHECKPOINTS
    return sorted(root.glob("epoch-[0-9][0-9][0-9][0-9]")) if root.is_dir() else []


def cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole CPU copies; collective when the tensors are shards (--fsdp), so every process calls it."""
    return {k: full(v.detach()).to("cpu", copy=True) for k, v in tensors.items()}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path,
    acc: Accelerator,
    model: nn.Module,
    optimizer: Any,
    schedule: WarmupCosine,
    progress: Progress,
    parts: dict[str, Any],
) -> None:
    """Write checkpoints/epoch-NNNN via a temporary folder and a rename, then drop older ones. ``model`` is the
    prepared (possibly wrapped or sharded) model; ``parts`` maps :data:`OPTIONAL_PARTS` names to the run's objects
    (None where the run has none). Called by every process."""
    main = acc.is_main_process
    root = out / CHECKPOINTS
    final = root / f"epoch-{progress.epoch:04d}"
    tmp = root / f".tmp-epoch-{progress.epoch:04d}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-rank{acc.process_index}.pt")
    model_state = cpu_copies(mutable_state(acc.unwrap_model(model)))  # gathered by all when sharded
    optimizer_dict = optimizer_state(model, optimizer)
    # Each part's state by every process: the allocator's is gathered when sharded (snella resumes bit for bit).
    part_states = {name: part.state_dict() for name, part in parts.items() if part is not None}
    if main:
        # Not dataclasses.asdict: it would deep-copy the best state's tensors.
        info = {f.name: getattr(progress, f.name) for f in fields(progress) if f.name != "best_state"}
        state = {
            "model": model_state,
            "optimizer": optimizer_dict,
            "schedule": schedule.state_dict(),
            "progress": info,
            "best_state": progress.best_state,
            **part_states,
        }
        torch.save(state, tmp / STATE_FILE)
    acc.wait_for_everyone()
    if main:
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
        for old in checkpoint_dirs(out):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def restore_checkpoint(
    out: Path,
    acc: Accelerator,
    model: nn.Module,
    optimizer: Any,
    schedule: WarmupCosine,
    parts: dict[str, Any],
) -> Progress:
    """Load the latest complete checkpoint into the run's objects and this process's random state, and return its
    progress (a fresh :class:`Progress` when there is none). Refuses a checkpoint of another process count, or one
    without a part this run has."""
    found = [d for d in checkpoint_dirs(out) if (d / STATE_FILE).is_file()]
    if not found:
        return Progress()
    latest = found[-1]
    # Every process reads the same folder, so every one refuses (one alone would leave the others to fail in a
    # collective); each process's data order and random state are its own, so the count must match.
    written = len(list(latest.glob("rng-rank*.pt")))
    if written != acc.num_processes:
        raise UserError(
            f"{latest}: written by a run of {written} process(es), resumed on {acc.num_processes}; "
            "resume with the same process count"
        )
    state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=False)
    load_mutable_state(acc.unwrap_model(model), state["model"])
    load_optimizer_state(model, optimizer, state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    for name, part in parts.items():
        if part is None:
            continue
        if name not in state:
            raise UserError(f"{latest}: holds no {OPTIONAL_PARTS[name]}")
        try:
            part.load_state_dict(state[name])
        except ValueError as err:
            raise UserError(f"{latest}: {err}") from None
    set_rng_state(torch.load(latest / f"rng-rank{acc.process_index}.pt", map_location="cpu", weights_only=False))
    if acc.is_main_process:
        print(f"resuming {out} after epoch {state['progress']['epoch']}", flush=True)
    return Progress(**state["progress"], best_state=state["best_state"])
