"""Issue 18's scale benchmark: LLaMA-2-7B-shaped decoder layers, one training step, CPU, batch 1 (``--batch``).

Two decoder layers of LLaMA-2-7B's shape (hidden 4096, intermediate 11008, 32 heads, vocabulary 32000;
transformers' LlamaConfig, random init, bf16 weights, no autocast) trained with peft LoRA-8/32, SNELL-8/32
at s = 0.9 (every q/k/v/o/gate/up/down projection) and full fine-tuning (every parameter), AdamW. Each
method runs in fresh processes (``benchmarks.run.run_worker``): one under the suite's pinned allocator for
the median step time, one under its 1 MiB mmap threshold for the peak RSS above the loaded model and the
bytes saved for backward.

The driver then projects each to the 32-layer model on paper, from two runs that differ only in depth
(``--layers 2`` and ``--layers 1``, both measured): per-layer cost = (2-layer − 1-layer), the rest (the
embedding, the head over 32000 words, the loss, the optimizer on those) = 1-layer − per-layer, and
32 layers = rest + 32 · per-layer. The arithmetic is printed with the inputs.

    python -m benchmarks.llm_scale                    # seq 512; also --seq 256 / 1024
    python -m benchmarks.llm_scale --methods snell8 lora8 --steps 2
    python -m benchmarks.llm_scale --worker --method snell8 --seq 256 --layers 2   # one worker, JSON out
    python -m benchmarks.llm_scale --seq 256 --batch 4 --rounds 2   # 2 layers only, in turns, issue 25's targets

``--rounds N`` times every method N times in turns at ``--layers`` (no projection) and judges issue 25's LLaMA
targets on the median of the per-round ratios (:mod:`benchmarks.in_turns`). SNELL's passes over ΔW cost the same
whatever the batch while every GEMM grows with the tokens, so ``--batch`` moves the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from benchmarks import llama
from benchmarks.in_turns import RatioTarget, drive_in_turns, measure
from benchmarks.memory import SavedTensorBytes, run_steps
from benchmarks.report import non_negative_int, positive_int

MB = 1024 * 1024
LLAMA_LAYERS = r"(.*\.)?layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
FULL_DEPTH = 32
# issue 25's LLaMA-shaped targets (its peak targets compare SNELL and LoRA at the same rank)
TARGETS = (
    RatioTarget("snell8", "lora8", step_limit=1.8, peak_limit=1.0),
    RatioTarget("snell32", "lora32", peak_limit=1.0),
    RatioTarget("snell32", "snell8", step_limit=1.1),
    RatioTarget("snell32", "full", step_limit=1.0),
)


METHODS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "full": llama.METHODS["full"],
    "lora8": llama.lora_method(8, LLAMA_LAYERS),
    "lora32": llama.lora_method(32, LLAMA_LAYERS),
    "snell8": llama.snell_method(8, LLAMA_LAYERS),
    "snell32": llama.snell_method(32, LLAMA_LAYERS),
}


def training_step(model: nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    """One AdamW step of a causal LM on ``tokens`` (their own labels), over its trainable parameters."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()

    return step


def timed_training(model: nn.Module, tokens: torch.Tensor, warmup: int, steps: int) -> dict[str, Any]:
    """:func:`training_step` inside :func:`run_steps`'s window: the median step, the peak RSS above the loaded model
    and the trainable parameter count, as a worker's row reports them."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    run = run_steps(training_step(model, tokens), warmup, steps)
    return {
        "trainable_params": sum(p.numel() for p in trainable),
        "step_times": run.times,
        "step_s": statistics.median(run.times),
        "peak_mb": run.peak / MB,
        "loaded_mb": run.loaded / MB,
        "threads": torch.get_num_threads(),
    }


def worker(method: str, layers: int, seq: int, warmup: int, steps: int, batch: int = 1) -> dict[str, Any]:
    """Median step time, peak RSS above the loaded model and bytes saved for backward of one method."""
    torch.manual_seed(0)
    model = METHODS[method](llama.build(layers)).train()  # built in bf16: no float32 copy passes through RSS
    tokens = torch.randint(model.config.vocab_size, (batch, seq))
    row = {"method": method, "layers": layers, "batch": batch, "seq": seq}
    row.update(timed_training(model, tokens, warmup, steps))
    with SavedTensorBytes(exclude=[*model.parameters(), *model.buffers()]) as counter:
        value = model(input_ids=tokens, labels=tokens).loss
    value.backward()
    return {**row, "saved_mb": counter.nbytes / MB}


def project(two: dict[str, Any], one: dict[str, Any], column: str) -> tuple[float, str]:
    """The 32-layer value of ``column`` from the 2- and 1-layer runs, and the arithmetic as text."""
    per_layer = two[column] - one[column]
    rest = one[column] - per_layer
    total = rest + FULL_DEPTH * per_layer
    text = (
        f"per layer {two[column]:.2f} − {one[column]:.2f} = {per_layer:.2f}; rest {one[column]:.2f} − "
        f"{per_layer:.2f} = {rest:.2f}; 32 layers {rest:.2f} + 32 × {per_layer:.2f} = {total:.2f}"
    )
    return total, text


def drive(
    methods: Sequence[str], seq: int, warmup: int, steps: int, timeout: float, batch: int = 1
) -> list[dict[str, Any]]:
    """Every method at 2 and 1 layers, each in a fresh process; prints the table and the projections."""
    print(f"seq {seq}, batch {batch}, bf16, load average {os.getloadavg()[0]:.2f} at start")
    rows = []
    for method in methods:
        runs = {}
        for layers in (2, 1):
            args = ["--worker", "--method", method, "--layers", str(layers), "--seq", str(seq), "--batch", str(batch)]
            result, status = measure("benchmarks.llm_scale", args, warmup, steps, timeout)
            if result is None:
                print(f"{method} at {layers} layers: {status}")
                break
            runs[layers] = result
            print(
                f"{method:>8} {layers} layers: step {result['step_s']:.2f} s (steps {result['step_times']}), "
                f"peak above the loaded model {result['peak_mb']:.0f} MB, saved for backward "
                f"{result['saved_mb']:.0f} MB"
            )
        if len(runs) == 2:
            row = {"method": method, "two_layers": runs[2], "one_layer": runs[1]}
            for column in ("step_s", "peak_mb", "saved_mb"):
                row[f"{column}_32"], arithmetic = project(runs[2], runs[1], column)
                print(f"    32-layer {column}: {arithmetic}")
            rows.append(row)
    by_method = {row["method"]: row for row in rows}
    for method in ("snell8", "snell32"):
        for other in ("full", "lora8", "lora32"):
            if method in by_method and other in by_method:
                mine, theirs = by_method[method]["two_layers"], by_method[other]["two_layers"]
                peak = mine["peak_mb"] / theirs["peak_mb"] if theirs["peak_mb"] else math.nan  # 0 MB: no ratio
                print(f"{method} / {other} (2 layers): step {mine['step_s'] / theirs['step_s']:.3f}, peak {peak:.3f}")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return rows


def method_parser(doc: str, seq: int, batch: int, rounds: int | None) -> argparse.ArgumentParser:
    """The options every LLM step benchmark here shares: which methods, the batch and sequence, the steps, the
    rounds in turns, and the worker mode."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--batch", type=positive_int, default=batch)
    parser.add_argument("--seq", type=positive_int, default=seq)
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument(
        "--rounds", type=positive_int, default=rounds, help="time every method this many times, in turns"
    )
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--worker", action="store_true", help="run one method in this process (JSON on stdout)")
    parser.add_argument("--method", choices=list(METHODS))
    return parser


def write_rows(rows: list[dict[str, Any]], out: str | None) -> None:
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


def main() -> None:
    parser = method_parser(__doc__, seq=512, batch=1, rounds=None)
    parser.add_argument("--layers", type=positive_int, default=2)
    args = parser.parse_args()
    if args.worker and args.method is None:
        parser.error("--worker needs --method")
    if args.worker:
        print(json.dumps(worker(args.method, args.layers, args.seq, args.warmup, args.steps, args.batch)))
        return
    if args.rounds is None:
        write_rows(drive(args.methods, args.seq, args.warmup, args.steps, args.timeout, args.batch), args.out)
        return
    setting = f"{args.layers} layers, batch {args.batch} × {args.seq}, bf16"
    worker_args = ["--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq)]
    rows = drive_in_turns(
        "benchmarks.llm_scale", setting, args.methods, worker_args, args.warmup, args.steps, args.timeout, args.rounds,
        TARGETS,
    )  # fmt: skip
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
