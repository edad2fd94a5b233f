"""Mixed precision for `snell train` and `snell eval`: the one place that turns --bf16 and --fp16 into an Accelerator.

--fp16 is the authors' ``--amp``: float16 autocast with a dynamic loss scale (GradScaler). accelerate enables it on
GPUs only and silently trains in float32 on the CPU; torch's autocast and GradScaler run on the CPU too, so snell
hands accelerate a CPU GradScaler itself. The same code path (scaled backward, unscale, skipped steps) then runs on
every device, and the tests exercise it on the CPU.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from snell.train.config import TrainConfig


def precision_name(config: TrainConfig) -> str:
    """accelerate's ``mixed_precision`` for the config: "bf16", "fp16" or "no"."""
    return "bf16" if config.bf16 else "fp16" if config.fp16 else "no"


def make_accelerator(config: TrainConfig, **kwargs) -> Accelerator:
    """An Accelerator whose ``autocast()``, ``backward`` and prepared optimizers apply the config's precision.

    Call it before preparing the model and optimizer: prepare() wraps the model's forward in autocast and gives
    optimizers the scaler, whose ``step`` unscales the gradients in place, skips the step if any is inf or NaN and
    updates the scale. ``kwargs`` go to Accelerator (``cpu`` defaults to "no CUDA here", which lets torchrun on a
    CPU-only machine run DDP over gloo).
    """
    kwargs.setdefault("cpu", not torch.cuda.is_available())
    precision = precision_name(config)
    try:
        accelerator = Accelerator(mixed_precision=precision, **kwargs)
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        # accelerate keeps one state per process and refuses a second run in another precision (a notebook that
        # trains in bf16, then in float32). Each run here is a run of its own: start the state afresh, as
        # transformers' TrainingArguments does before every Trainer.
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(mixed_precision=precision, **kwargs)
    if precision == "fp16" and accelerator.scaler is None:  # accelerate left fp16 off: the CPU
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler(accelerator.device.type)
    return accelerator
