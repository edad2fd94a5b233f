"""Paired step timing of two versions of snell in one process: did a change to the hot path make steps faster?

    .venv/bin/python -m benchmarks.ab_step --baseline HEAD                 # working tree against HEAD
    .venv/bin/python -m benchmarks.ab_step --baseline 1231122 --pairs 20 --method snell8_s0.9_dropout

Step times of fresh processes on this shared VM differ by 10-25 % from run to run, more than most changes
worth making to a layer. Here the working tree's snell and the baseline's (extracted with ``git archive`` and
imported under its own module names) each build the same model from the same seed in one process, and the two
take turns step by step (A B, then B A, ...), so a slow spell of the machine hits both. The answer is the
median of the per-pair differences and how many pairs the working tree won. Both models see the same batch,
so their first losses also show whether the change kept the maths (dropout methods draw different masks).
The tool re-runs itself under the pinned allocator the suite's timed workers use.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

import snell
from benchmarks.methods import MODELS, NUM_CLASSES, SNELL_SETTINGS, build_snell
from benchmarks.report import REPO
from benchmarks.run import TIMED_ENV
from benchmarks.step import make_step

BASELINE_PACKAGE = "snell_baseline"


def _is_snell_module(name: str) -> bool:
    return name == "snell" or name.startswith("snell.")


def import_snell_revision(revision: str, into: Path) -> ModuleType:
    """snell as it is at ``revision`` of this repository, imported as ``snell_baseline`` (and its submodules as
    ``snell_baseline.*``), leaving the ``snell`` already imported untouched.

    Its modules bind each other at import time (``from snell import kernels``), so once imported they keep
    calling the baseline's code even though ``sys.modules["snell"]`` is the working tree's again.
    """
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "src/snell"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    current = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_snell_module(name)}
    sys.path.insert(0, str(into / "src"))
    try:
        baseline = importlib.import_module("snell")
        importlib.import_module("snell.function")  # everything a training step calls, imported now
    finally:
        sys.path.remove(str(into / "src"))
        for name in [name for name in sys.modules if _is_snell_module(name)]:
            sys.modules[BASELINE_PACKAGE + name.removeprefix("snell")] = sys.modules.pop(name)
        sys.modules.update(current)
    return baseline


def _build(library: ModuleType, model_name: str, method: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same base weights and factors for both versions
    sparsity, dropout = SNELL_SETTINGS[method]
    return build_snell(MODELS[model_name].create(), sparsity, dropout, library).train()


def paired_steps(
    baseline: ModuleType, model_name: str, method: str, batch: int, pairs: int, seed: int = 0
) -> dict[str, Any]:
    """Time ``pairs`` steps of each version in alternating order after one warm-up step each (which also gives
    each version's loss on the shared batch). "a" is the baseline, "b" the working tree."""
    if pairs < 1:
        raise ValueError(f"pairs must be at least 1, got {pairs}")
    spec = MODELS[model_name]
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=generator)
    labels = torch.randint(NUM_CLASSES, (batch,), generator=generator)
    models = {"a": _build(baseline, model_name, method, seed), "b": _build(snell, model_name, method, seed)}
    with torch.no_grad():
        losses = {key: F.cross_entropy(model(images), labels).item() for key, model in models.items()}
    steps = {key: make_step(model, images, labels, "fp32") for key, model in models.items()}
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {"a": [], "b": []}
    for index in range(pairs):
        for key in ("a", "b") if index % 2 == 0 else ("b", "a"):
            start = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - start)
    differences = [b - a for a, b in zip(times["a"], times["b"], strict=True)]
    return {
        "model": model_name,
        "method": method,
        "batch": batch,
        "pairs": pairs,
        "loss_a": losses["a"],
        "loss_b": losses["b"],
        "step_s_a": times["a"],
        "step_s_b": times["b"],
        "median_a": statistics.median(times["a"]),
        "median_b": statistics.median(times["b"]),
        "median_difference": statistics.median(differences),
        "b_faster_pairs": sum(d < 0 for d in differences),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git revision to compare the working tree against")
    parser.add_argument("--model", choices=sorted(MODELS), default="vit_b16")
    parser.add_argument("--method", choices=sorted(SNELL_SETTINGS), default="snell8_s0.9")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=10)
    args = parser.parse_args()
    if any(os.environ.get(name) != value for name, value in TIMED_ENV.items()):
        env = {**os.environ, **TIMED_ENV}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.ab_step", *sys.argv[1:]], env)
    with tempfile.TemporaryDirectory() as folder:
        baseline = import_snell_revision(args.baseline, Path(folder))
        result = paired_steps(baseline, args.model, args.method, args.batch, args.pairs)
    result["baseline"] = args.baseline
    print(
        f"{args.method} on {args.model}, batch {args.batch}, {args.pairs} pairs: baseline {result['median_a']:.3f} s, "
        f"working tree {result['median_b']:.3f} s, median paired difference {result['median_difference']:+.3f} s "
        f"(working tree faster in {result['b_faster_pairs']} of {args.pairs}); first loss "
        f"{result['loss_a']:.6f} vs {result['loss_b']:.6f}",
        file=sys.stderr,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
