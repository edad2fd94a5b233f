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
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.in_turns import RatioTarget, drive_in_turns
from benchmarks.llm_memory import default_model, load
from benchmarks.llm_scale import METHODS, method_parser, timed_training, write_rows

VOCAB = 49152
MODULE = "benchmarks.smollm2_step"
TARGETS = (RatioTarget("snell8", "lora8", 1.15, 0.85), RatioTarget("snell32", "lora32", 1.2, 0.85))  # issue 25's


def worker(method: str, batch: int, seq: int, warmup: int, steps: int) -> dict[str, Any]:
    """Median step time and peak RSS above the loaded model of one method."""
    torch.manual_seed(0)
    model = METHODS[method](load(default_model())).train()
    tokens = torch.randint(VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"method": method, "batch": batch, "seq": seq, **timed_training(model, tokens, warmup, steps)}


def drive(
    methods: Sequence[str], batch: int, seq: int, warmup: int, steps: int, timeout: float, rounds: int = 1
) -> list[dict]:
    """Every method in fresh processes, ``rounds`` times in turns, then the targets' verdicts (:mod:`.in_turns`)."""
    args = ["--batch", str(batch), "--seq", str(seq)]
    setting = f"SmolLM2-135M, batch {batch} × {seq}, bf16"
    return drive_in_turns(MODULE, setting, methods, args, warmup, steps, timeout, rounds, TARGETS)


def main() -> None:
    parser = method_parser(__doc__, seq=256, batch=4, rounds=1)
    args = parser.parse_args()
    if args.worker and args.method is None:
        parser.error("--worker needs --method")
    if args.worker:
        print(json.dumps(worker(args.method, args.batch, args.seq, args.warmup, args.steps)))
        return
    write_rows(drive(args.methods, args.batch, args.seq, args.warmup, args.steps, args.timeout, args.rounds), args.out)


if __name__ == "__main__":
    main()
