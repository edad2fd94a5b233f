"""Issue 25's real-model benchmark: one training step of SmolLM2-135M at batch 4 × 256 tokens on the CPU.

SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576, MLP 1536, vocabulary 49152), the installed GGUF
de-quantised to bf16 weights, no autocast, random tokens with every position in the loss. The methods of
``benchmarks.llm_scale`` (peft LoRA-8/32 and SNELL-8/32 at s = 0.9 on all seven projections, full fine-tuning of
every parameter in bf16), AdamW. Each method runs in fresh processes (``benchmarks.run.run_worker``): one under the
suite's pinned allocator for the median step time, one under its 1 MiB mmap threshold for the peak RSS above the
loaded model. The real model's matrices are 576×576, 192×576 (k/v), 1536×576 and 576×1536: where the fused CPU
path applies is ``snell.dispatch._FUSED_FROM``'s decision, as in any user's run.

    python -m benchmarks.smollm2_step --out benchmarks/results/llm_scale/smollm2.json
    python -m benchmarks.smollm2_step --methods snell8 lora8 --steps 2
    python -m benchmarks.smollm2_step --methods lora8 snell8 lora32 snell32 --rounds 3   # in turns, ratios per round
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.llm_memory import default_model, load
from benchmarks.llm_scale import METHODS, measure, method_parser, timed_training, write_rows
from benchmarks.report import Target
from benchmarks.run import TIMED_ENV, run_worker

VOCAB = 49152
MODULE = "benchmarks.smollm2_step"
# (method, against, step limit, peak limit): issue 25's targets on this model
TARGETS = (("snell8", "lora8", 1.15, 0.85), ("snell32", "lora32", 1.2, 0.85))


def worker(method: str, batch: int, seq: int, warmup: int, steps: int) -> dict[str, Any]:
    """Median step time and peak RSS above the loaded model of one method."""
    torch.manual_seed(0)
    model = METHODS[method](load(default_model())).train()
    tokens = torch.randint(VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"method": method, "batch": batch, "seq": seq, **timed_training(model, tokens, warmup, steps)}


def drive(
    methods: Sequence[str], batch: int, seq: int, warmup: int, steps: int, timeout: float, rounds: int = 1
) -> list[dict]:
    """Every method in fresh processes, ``rounds`` times in turns (the order reversed every other round, so a slow
    spell of a shared machine lands on every method); prints each row, then the targets with their verdicts: the
    median over rounds of each round's ratio. The peak is measured once, in the first round."""
    print(f"SmolLM2-135M, batch {batch} × {seq}, bf16, load average {os.getloadavg()[0]:.2f} at start")
    rows: dict[str, dict] = {}
    for round_index in range(rounds):
        for method in methods if round_index % 2 == 0 else reversed(methods):
            args = ["--worker", "--method", method, "--batch", str(batch), "--seq", str(seq)]
            if round_index == 0:
                row, status = measure(MODULE, args, warmup, steps, timeout)
            else:
                timed_args = [*args, "--warmup", str(warmup), "--steps", str(steps)]
                row, status = run_worker(MODULE, timed_args, timeout, TIMED_ENV)
            if row is None:
                print(f"{method}, round {round_index + 1}: {status}")
                continue
            rows.setdefault(method, {**row, "round_steps": []})["round_steps"].append(row["step_s"])
            times = ", ".join(f"{t:.2f}" for t in row["step_times"])
            print(f"{method:>8}, round {round_index + 1}: step {row['step_s']:.2f} s ({times})", flush=True)
    for method, row in rows.items():
        row["step_s"] = statistics.median(row["round_steps"])
        print(f"{method:>8}: step {row['step_s']:.2f} s, peak above the loaded model {row['peak_mb']:.0f} MB")
    for method, other, step_limit, peak_limit in TARGETS:
        if method in rows and other in rows and len(rows[method]["round_steps"]) == len(rows[other]["round_steps"]):
            pairs = zip(rows[method]["round_steps"], rows[other]["round_steps"], strict=True)
            step = Target(f"step_s: {method} / {other}", statistics.median(a / b for a, b in pairs), step_limit)
            peak = Target(f"peak_mb: {method} / {other}", rows[method]["peak_mb"] / rows[other]["peak_mb"], peak_limit)
            print(
                f"{method} / {other}: step {step.value:.3f} (target <= {step.limit}: {step.verdict}), "
                f"peak {peak.value:.3f} (target <= {peak.limit}: {peak.verdict})"
            )
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return list(rows.values())


def main() -> None:
    parser = method_parser(__doc__, seq=256, batch=4)
    parser.add_argument("--rounds", type=int, default=1, help="time every method this many times, in turns")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.method, args.batch, args.seq, args.warmup, args.steps)))
        return
    write_rows(drive(args.methods, args.batch, args.seq, args.warmup, args.steps, args.timeout, args.rounds), args.out)


if __name__ == "__main__":
    main()
