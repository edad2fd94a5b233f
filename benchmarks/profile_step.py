"""Where a training step's time goes: torch.profiler over one step, after warm-up, as a table of ops.

    .venv/bin/python -m benchmarks.profile_step --method snell8_s0.9 [--model vit_b16] [--rows 25] [--by-shape]
    .venv/bin/python -m benchmarks.profile_step --llama-layers 2 --seq 256 --method snell8 [--fused-passes 3]

``--llama-layers N`` profiles benchmarks.llm_scale's step instead (N LLaMA-2-7B-shaped decoder layers, bf16, batch 1
unless ``--batch``, its methods: snell8, snell32, lora8, lora32, full).

``--by-shape`` splits every op by its input shapes: which GEMM of which layer, which m×n block pass.
``--fused-passes N`` instead times N steps' fused CPU work, which the profiler sees as one opaque op per layer: the
fused path's forward and backward over all layers, and inside them each numba pass (summed over the layers, ms per
step), beside the whole step.

Backs the profile findings in the benchmark report; not part of the timed suite.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import llama, llm_scale
from benchmarks.methods import METHODS, MODELS, NUM_CLASSES
from benchmarks.report import positive_int
from benchmarks.step import DTYPES, make_step
from snell import fused_cpu, fused_cpu_kernels, fused_cpu_path

#: (module, function, row label): the fused CPU path's entry points and its passes, timed by --fused-passes.
FUSED_PASSES = (
    (fused_cpu_path, "merged_and_tau", "forward, fused path"),
    (fused_cpu, "mix_stats", "  mixk column statistics"),
    (fused_cpu, "merge_selected", "  tau and merge"),
    (fused_cpu_kernels, "merge_band", "    their one pass over ΔW (reference and mask modes)"),
    (fused_cpu, "select_tau", "    tau alone: sample, count and band (soft mode)"),
    (fused_cpu, "merge", "    merge alone (soft mode, dense matrices)"),
    (fused_cpu_path, "backward", "backward, fused path (with the dW and dx GEMMs)"),
    (fused_cpu_kernels, "mix_column_grads", "  mixk column sums"),
    (fused_cpu_kernels, "backward_rows", "  gradient pass"),
)


def time_fused_passes(step: Callable[[], object], steps: int) -> None:
    """Print ms per step of each of FUSED_PASSES (wall time of the calls, summed over layers) and of the step."""
    spent: Counter[str] = Counter()
    originals = [(module, name, getattr(module, name)) for module, name, _ in FUSED_PASSES]

    def timed(function: Callable, label: str) -> Callable:
        @functools.wraps(function)
        def call(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start

        return call

    try:
        for (module, name, label), (_, _, function) in zip(FUSED_PASSES, originals, strict=True):
            setattr(module, name, timed(function, label))
        start = time.perf_counter()
        for _ in range(steps):
            step()
        total = time.perf_counter() - start
    finally:
        for module, name, function in originals:
            setattr(module, name, function)
    print(f"{'whole step':48s} {total / steps * 1e3:9.1f} ms")
    for _, _, label in FUSED_PASSES:
        print(f"{label:48s} {spent[label] / steps * 1e3:9.1f} ms")


#: The profiler table's CPU sort keys (torch.autograd.profiler_util).
SORT_KEYS = ("self_cpu_time_total", "cpu_time_total", "cpu_time", "self_cpu_memory_usage", "cpu_memory_usage", "count")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="vit_b16")
    parser.add_argument("--method", required=True, help="a vision method, or with --llama-layers an llm_scale one")
    parser.add_argument(
        "--llama-layers", type=positive_int, metavar="N", help="profile llm_scale's step of N decoder layers"
    )
    parser.add_argument("--seq", type=positive_int, default=256, help="tokens of the LLaMA step")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--batch", type=positive_int, help="images (default 8), or with --llama-layers sequences (default 1)"
    )
    parser.add_argument("--rows", type=positive_int, default=25)
    parser.add_argument("--sort", default="self_cpu_time_total", choices=SORT_KEYS, help="profiler table sort key")
    parser.add_argument("--by-shape", action="store_true", help="one row per (op, input shapes)")
    parser.add_argument("--fused-passes", type=positive_int, metavar="N", help="time N steps' fused CPU passes instead")
    args = parser.parse_args()
    methods = llm_scale.METHODS if args.llama_layers else METHODS
    if args.method not in methods:
        parser.error(f"--method {args.method}: not one of {', '.join(methods)}")
    torch.manual_seed(0)
    if args.llama_layers:
        model = llm_scale.METHODS[args.method](llama.build(args.llama_layers)).train()
        tokens = torch.randint(model.config.vocab_size, (args.batch or 1, args.seq))
        step = llm_scale.training_step(model, tokens)
    else:
        spec = MODELS[args.model]
        model = METHODS[args.method].build(spec.create()).train()
        batch = args.batch or 8
        images = torch.randn(batch, 3, spec.image_size, spec.image_size)
        labels = torch.randint(NUM_CLASSES, (batch,))
        step = make_step(model, images, labels, args.dtype, after_step=METHODS[args.method].step_hook(model))
    step()
    if args.fused_passes:
        step()  # a second warm-up: SNELLA's allocator has read one step's gradients and allocated
        time_fused_passes(step, args.fused_passes)
        return
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=args.by_shape) as prof:
        step()
    table = prof.key_averages(group_by_input_shape=args.by_shape).table(
        sort_by=args.sort, row_limit=args.rows, max_name_column_width=60, max_shapes_column_width=60
    )
    print(table)


if __name__ == "__main__":
    main()
