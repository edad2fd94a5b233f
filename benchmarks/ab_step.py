"""Paired step timing in one process: two versions of snell, or two methods, taking turns step by step.

    .venv/bin/python -m benchmarks.ab_step --baseline HEAD                 # working tree's snell against HEAD's
    .venv/bin/python -m benchmarks.ab_step --baseline 1231122 --pairs 20 --method snell8_s0.9_dropout
    .venv/bin/python -m benchmarks.ab_step --against lora8                 # SNELL-8 s=0.9 against peft LoRA-8

Step times of fresh processes on this shared VM differ by 10-25 % from run to run, more than most changes
worth making to a layer, and enough to move a ratio of two methods across a target. Here both models live in
one process and take turns (a b, then b a, ...), so a slow spell of the machine hits both; the answer is the
median of the per-pair differences and ratios. With ``--baseline`` the baseline's snell is extracted with
``git archive`` and imported under its own module names, and both versions build the same model from the same
seed: their losses before training show whether a change kept the maths (dropout methods draw different
masks). The suite (``benchmarks.run``) keeps one fresh process per method, as its targets ask; this is the
cross-check. The tool re-runs itself under the pinned allocator the suite's timed workers use.
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
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.methods import METHODS, MODELS, NUM_CLASSES, SNELL_SETTINGS, build_snell
from benchmarks.report import REPO, positive_int
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
    done = subprocess.run(["git", "-C", str(REPO), "archive", revision, "src/snell"], capture_output=True)
    if done.returncode != 0:
        raise ValueError(f"cannot read src/snell at revision {revision!r}: {done.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
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


def builder(model_name: str, method: str, library: ModuleType | None = None) -> Callable[[], nn.Module]:
    """Builds ``method`` from seed 0, so every model starts from the same base weights (and a SNELL method from
    the same factors): with the working tree's snell (and peft, timm, the reference-style layers), or, given
    ``library``, a SNELL method with that other version of snell."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = MODELS[model_name].create()
        if library is None:
            return METHODS[method].build(model)
        return build_snell(model, *SNELL_SETTINGS[method], library)

    return build


def paired_steps(
    build_a: Callable[[], nn.Module],
    build_b: Callable[[], nn.Module],
    model_name: str,
    batch: int,
    pairs: int,
    methods: tuple[str | None, str | None] = (None, None),
) -> dict[str, Any]:
    """Time ``pairs`` steps of model a and model b in alternating order (a b, b a, ...) after one warm-up step
    each, on one shared batch; also each model's loss on that batch before training. ``methods`` names the
    :data:`METHODS` entry of a and b where their steps run its ``after_step`` (SNELLA's allocator), as the suite's
    steps do."""
    if pairs < 1:
        raise ValueError(f"pairs must be at least 1, got {pairs}")
    spec = MODELS[model_name]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=generator)
    labels = torch.randint(NUM_CLASSES, (batch,), generator=generator)
    models = {"a": build_a().train(), "b": build_b().train()}
    with torch.no_grad():
        losses = {key: F.cross_entropy(model(images), labels).item() for key, model in models.items()}
    steps = {}
    for key, name in zip(("a", "b"), methods, strict=True):
        hook = None if name is None else METHODS[name].step_hook(models[key])
        steps[key] = make_step(models[key], images, labels, "fp32", after_step=hook)
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {"a": [], "b": []}
    for index in range(pairs):
        for key in ("a", "b") if index % 2 == 0 else ("b", "a"):
            start = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - start)
    differences = [b - a for a, b in zip(times["a"], times["b"], strict=True)]
    ratios = [b / a for a, b in zip(times["a"], times["b"], strict=True)]
    return {
        "model": model_name,
        "batch": batch,
        "pairs": pairs,
        "loss_a": losses["a"],
        "loss_b": losses["b"],
        "step_s_a": times["a"],
        "step_s_b": times["b"],
        "median_a": statistics.median(times["a"]),
        "median_b": statistics.median(times["b"]),
        "median_difference": statistics.median(differences),
        "median_ratio": statistics.median(ratios),
        "b_faster_pairs": sum(d < 0 for d in differences),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    against = parser.add_mutually_exclusive_group(required=True)
    against.add_argument("--baseline", help="git revision whose snell the working tree's is timed against")
    against.add_argument("--against", choices=list(METHODS), help="method that --method is timed against")
    parser.add_argument("--method", choices=list(METHODS), default="snell8_s0.9")
    parser.add_argument("--model", choices=sorted(MODELS), default="vit_b16")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--pairs", type=positive_int, default=10)
    args = parser.parse_args()
    if args.baseline is not None and args.method not in SNELL_SETTINGS:
        parser.error(f"--baseline compares SNELL methods ({', '.join(SNELL_SETTINGS)}), got --method {args.method}")
    if any(os.environ.get(name) != value for name, value in TIMED_ENV.items()):
        env = {**os.environ, **TIMED_ENV}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.ab_step", *sys.argv[1:]], env)
    build_b = builder(args.model, args.method)
    with tempfile.TemporaryDirectory() as folder:
        if args.baseline is not None:
            try:
                library = import_snell_revision(args.baseline, Path(folder))
            except ValueError as err:
                parser.error(str(err))
            build_a, label_a = builder(args.model, args.method, library), args.baseline
        else:
            build_a, label_a = builder(args.model, args.against), args.against
        methods = (None if args.baseline is not None else args.against, args.method)
        result = paired_steps(build_a, build_b, args.model, args.batch, args.pairs, methods)
    result.update(a=label_a, b=f"{args.method} (working tree)")
    print(
        f"{args.model}, batch {args.batch}, {args.pairs} pairs: a = {result['a']}: {result['median_a']:.3f} s, "
        f"b = {result['b']}: {result['median_b']:.3f} s; paired b - a {result['median_difference']:+.3f} s, "
        f"b / a {result['median_ratio']:.3f} (b faster in {result['b_faster_pairs']} of {args.pairs}); "
        f"loss before training a {result['loss_a']:.6f}, b {result['loss_b']:.6f}",
        file=sys.stderr,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
