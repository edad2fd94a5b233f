"""The command line: the parts in order, each only if it fits in the budget, then the training parts."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import benchmarks.gpu
from benchmarks.gpu.correctness import part_compile, part_correctness, part_sync
from benchmarks.gpu.results import environment, measured_table_row, selection_verdicts, targets, write_results
from benchmarks.gpu.run import Run
from benchmarks.gpu.selection import part_blocks, part_selection
from benchmarks.gpu.training import _emit_json, run_train_part, train_parts, train_worker
from benchmarks.gpu.triton_check import part_triton_correctness, part_triton_timing, triton_min_numel
from benchmarks.report import REPO, command_line, non_negative_float

FULL_OUT = REPO / "benchmarks" / "results" / "gpu"
DEFAULT_BUDGET_S = 450.0  # 8 minutes less time for imports, CUDA start-up and writing the results


PARTS: tuple[tuple[str, float, Callable[[Run], None]], ...] = (
    ("correctness", 30, part_correctness),
    ("sync", 10, part_sync),
    ("compile", 30, part_compile),
    ("selection", 45, part_selection),
    ("blocks", 15, part_blocks),
    # Guesses: about 30 Triton compiles (modes × dtypes × passes, no shape specialisation) then tiny checks; seven
    # layers × three implementations × 11 fwd + bwd of at most ~20 ms, after the rank-8 and rank-32 variants compile.
    ("triton_correctness", 40, part_triton_correctness),
    ("triton_timing", 35, part_triton_timing),
)
"""The checks before training, with a guess at their seconds on an H200."""


def results_folder(out: Path | None, smoke: bool, every_part: bool) -> Path:
    """``--out``; else the committed results for a whole run on a GPU, and a fresh temp folder for anything less
    (a smoke run, or ``--parts``): the result files are written from this run alone, so a rerun of some parts
    into the committed folder would empty the other parts' tables."""
    if out is not None:
        return out
    if smoke or not every_part:
        return Path(tempfile.mkdtemp(prefix="snell-gpu-smoke-" if smoke else "snell-gpu-parts-"))
    return FULL_OUT


def main(argv: Sequence[str] | None = None) -> Run | None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description=benchmarks.gpu.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--budget-s", type=non_negative_float, default=DEFAULT_BUDGET_S, help="skip parts that would not fit"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, one step, a temp folder")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/gpu, or a temp folder)")
    parser.add_argument("--commit", help="the snell commit, for a checkout without .git")
    names = [name for name, _, _ in PARTS] + [f"train_{p.key}" for p in train_parts(False)]
    parser.add_argument("--parts", nargs="+", choices=names, default=names, help="run only these (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        train_worker(json.loads(args.worker), _emit_json)
        return None
    if args.smoke:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke")
    run = Run(device, args.smoke, args.budget_s)
    command = command_line("benchmarks.gpu", sys.argv[1:] if argv is None else argv)
    env = environment(device, args.commit)
    out = results_folder(args.out, args.smoke, every_part=set(args.parts) == set(names))
    run.save = lambda: write_results(run, out, env, command)
    print(f"results (rewritten after every part): {out}")
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    plan = [(name, estimate_s) for name, estimate_s, _ in PARTS]
    plan += [(f"train_{p.key}", p.estimate_s * len(p.methods)) for p in train_parts(args.smoke)]
    print(f"plan (estimated s on an H200; budget {run.budget_s:.0f} s): " + ", ".join(f"{n} {e:.0f}" for n, e in plan))
    for name, estimate_s in plan:
        if name not in args.parts:
            run.parts.append(
                {"part": name, "estimate_s": estimate_s, "wall_s": None, "status": "skipped: not in --parts"}
            )
    for name, estimate_s, part in PARTS:
        if name in args.parts and run.fits(name, estimate_s):
            print(f"[{name}]", flush=True)
            began = time.monotonic()
            try:
                part(run)
                status = "done"
            except Exception:  # one broken part must not cost the others
                status = "error: " + traceback.format_exc().strip().splitlines()[-1][:200]
                print(traceback.format_exc(), flush=True)
            run.parts.append(
                {"part": name, "estimate_s": estimate_s, "wall_s": time.monotonic() - began, "status": status}
            )
            run.save()
    if device == "cuda":
        torch.cuda.empty_cache()  # the workers have the device to themselves
    for part in train_parts(args.smoke):
        if f"train_{part.key}" in args.parts:
            run_train_part(run, part)
    run.finished = True
    path = run.save()
    failed = [c["check"] for c in run.checks if c["status"] == "FAIL"]
    print(f"\nchecks: {len(failed)} of {len(run.checks)} fail" + (f"; FAILED: {failed}" if failed else ""))
    for shape, chosen, best, _, agrees, _ in selection_verdicts(run):
        print(f"selection {shape}: library uses {chosen}, fastest exact without host sync {best}: {agrees}")
    print(f"SELECTION_TABLE[{device!r}] these measurements support: {measured_table_row(run)}")
    print(f"_TRITON_MIN_NUMEL these measurements support: {triton_min_numel(run.kernels)}")
    for target in targets(run):
        print(f"{target.verdict}: {target.name} = {target.shown} (limit {target.limit})")
    skipped = [p["part"] for p in run.parts if p["status"].startswith("skipped")]
    print(f"skipped: {', '.join(skipped) if skipped else 'nothing'}")
    print(f"results: {path} ({time.monotonic() - run.started:.0f} s)")
    return run
