"""Inference worker: the untouched base model, the same model with SNELL merged in, and the unmerged adapter.

All three live in one process and are timed in interleaved rounds, so a slow spell on the machine hits
every variant alike; the merged model should cost exactly the base model. Prints one JSON list.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

import torch

import snell
from benchmarks.methods import ADAPTED_LAYERS, MODELS
from benchmarks.report import positive_int


def benchmark_inference(model_name: str, batch: int, rounds: int, seed: int = 0) -> list[dict[str, Any]]:
    """Median forward time per variant, and how far the merged model's logits are from the unmerged ones."""
    torch.manual_seed(seed)
    spec = MODELS[model_name]
    base = spec.create().eval()
    config = snell.SnellConfig(r=8, sparsity=0.9, target_modules=ADAPTED_LAYERS)
    unmerged = snell.get_snell_model(copy.deepcopy(base), config).eval()
    merged = snell.merge_and_unload(copy.deepcopy(unmerged))
    variants = {"base": base, "snell merged": merged, "snell unmerged": unmerged}
    images = torch.randn(batch, 3, spec.image_size, spec.image_size)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        outputs = {name: model(images) for name, model in variants.items()}  # also the warm-up
        for _ in range(rounds):
            for name, model in variants.items():
                start = time.perf_counter()
                model(images)
                times[name].append(time.perf_counter() - start)
    base_s = statistics.median(times["base"])
    return [
        {
            "model": model_name,
            "variant": name,
            "batch": batch,
            "rounds": rounds,
            "forward_s_median": statistics.median(times[name]),
            "ratio_to_base": statistics.median(times[name]) / base_s,
            "max_abs_logit_diff_vs_unmerged": float((outputs[name] - outputs["snell unmerged"]).abs().max()),
        }
        for name in variants
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(MODELS), default="vit_b16")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--rounds", type=positive_int, default=10)
    args = parser.parse_args()
    print(json.dumps(benchmark_inference(args.model, args.batch, args.rounds)))


if __name__ == "__main__":
    main()
