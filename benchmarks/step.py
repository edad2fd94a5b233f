"""Training-step worker: one (model, method, dtype) per fresh process, so no method inherits another's heap.

Prints one JSON object on its last stdout line. Run by ``benchmarks.run``; by hand:
``python -m benchmarks.step --model vit_b16 --method snell8_s0.9 --steps 3``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.memory import SavedTensorBytes, run_steps
from benchmarks.methods import METHODS, MODELS, NUM_CLASSES
from benchmarks.report import non_negative_int, positive_int

MB = 1024 * 1024
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def make_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    dtype: str,
    device_type: str = "cpu",
    after_step: Callable[[], None] | None = None,
) -> Callable[[], None]:
    """One training step: forward + cross-entropy + backward + AdamW, autocast to ``dtype`` if not fp32, then the
    method's ``after_step`` (SNELLA's allocator), still before the gradients are cleared."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast_dtype = DTYPES[dtype]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()

    return step


def saved_for_backward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, dtype: str) -> int:
    """Bytes one forward saves for backward (parameters and buffers excluded); backward then frees them."""
    state = [*model.parameters(), *model.buffers()]
    autocast_dtype = DTYPES[dtype]
    with (
        SavedTensorBytes(exclude=state) as counter,
        torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None),
    ):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.nbytes


def benchmark_training(
    model_name: str, method: str, batch: int, warmup: int, steps: int, dtype: str, seed: int = 0
) -> dict[str, Any]:
    """Median step time and peak RSS above the loaded model over ``warmup + steps`` steps (the window of
    :func:`benchmarks.memory.run_steps`), and saved bytes."""
    torch.manual_seed(seed)
    spec = MODELS[model_name]
    model = METHODS[method].build(spec.create()).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    images = torch.randn(batch, 3, spec.image_size, spec.image_size)
    labels = torch.randint(NUM_CLASSES, (batch,))
    step = make_step(model, images, labels, dtype, after_step=METHODS[method].step_hook(model))
    run = run_steps(step, warmup, steps)
    saved = saved_for_backward(model, images, labels, dtype)
    return {
        "model": model_name,
        "method": method,
        "dtype": dtype,
        "batch": batch,
        "warmup": warmup,
        "steps": steps,
        "trainable_params": trainable,
        "step_times": run.times,
        "step_s_median": statistics.median(run.times),
        "step_s_min": min(run.times),
        # fresh pages the timed steps touched, and the kernel time that cost (page faults are most of it)
        "minor_faults_per_step": run.minor_faults / steps,
        "system_s_per_step": run.system_s / steps,
        "peak_mb": run.peak / MB,
        "saved_mb": saved / MB,
        "loaded_mb": run.loaded / MB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(MODELS), default="vit_b16")
    parser.add_argument("--method", choices=list(METHODS), required=True)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args()
    result = benchmark_training(args.model, args.method, args.batch, args.warmup, args.steps, args.dtype)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
