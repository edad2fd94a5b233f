"""The performance suite in one command: training steps, inference, threshold selection, and the targets.

    .venv/bin/python -m benchmarks.run            # full run: results in benchmarks/results/ (quiet machine!)
    .venv/bin/python -m benchmarks.run --quick    # smoke test, few steps: results in runs/bench-quick/

Every training and inference measurement runs in a fresh worker process (MALLOC_ARENA_MAX=2), so no method
inherits another's heap. ViT-B's timed steps are split over two rounds of fresh workers, the second round in
reverse order, so a slow spell of this shared machine falls on every method instead of on the few that
happened to run in it. Each training job also runs once for memory with the mmap threshold pinned at 1 MiB,
so every large tensor goes back to the OS when freed and the peak RSS follows live memory instead of glibc's
history-dependent heap. The run writes markdown, CSV and PNG plots and prints PASS/MISS for each target.
Results of --quick, or of a run on a busy machine, are not results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch

from benchmarks import plots
from benchmarks.methods import METHODS, MODELS
from benchmarks.report import (
    REPO,
    Target,
    command_line,
    environment,
    environment_markdown,
    markdown_table,
    positive_float,
    write_csv,
)

FULL_OUT = REPO / "benchmarks" / "results"
QUICK_OUT = REPO / "runs" / "bench-quick"
PART_OUT = REPO / "runs" / "bench-part"  # a subset would overwrite the committed tables with its own part
PARTS = ("train", "infer", "threshold")
DEFAULT_MALLOC_ENV = {"MALLOC_ARENA_MAX": "2"}
# Step times: blocks below 256 MiB come from the heap and freed memory is never handed back, so no method
# pays page faults after warm-up. Under glibc's defaults the heap is trimmed whenever its free top exceeds a
# threshold that follows the largest freed block, so how often a method re-faults fresh pages depends on its
# allocation history (a ViT-B SNELL step: 20k-200k faults, 0.1-0.8 s of system time; peft LoRA's: 1k-9k,
# because building its model leaves 2 GB of free heap behind). That is timed too, as a second column.
TIMED_ENV = {**DEFAULT_MALLOC_ENV, "MALLOC_MMAP_THRESHOLD_": str(1 << 28), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
# Setting the threshold also stops glibc from raising it to the largest freed block (up to 32 MiB).
MEMORY_ENV = {**DEFAULT_MALLOC_ENV, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
TRAIN_COLUMNS = (
    "model",
    "method",
    "dtype",
    "batch",
    "warmup",
    "steps",
    "trainable_params",
    "rounds",
    "step_s_median",
    "step_s_min",
    "step_s_round_medians",
    "step_s_default_malloc",
    "minor_faults_per_step",
    "minor_faults_per_step_default_malloc",
    "system_s_per_step_default_malloc",
    "peak_mb",
    "peak_default_malloc_mb",
    "saved_mb",
    "loaded_mb",
    "status",
)
INFER_COLUMNS = (
    "model",
    "variant",
    "batch",
    "rounds",
    "forward_s_median",
    "ratio_to_base",
    "max_abs_logit_diff_vs_unmerged",
)
THRESHOLD_COLUMNS = ("shape", "numel", "method", "seconds", "gemm_s", "ratio_to_gemm", "note")
ALL_METHODS = tuple(METHODS)
BIG_MODEL_METHODS = ("head", "full", "lora8", "reference_snell8", "snell8_s0.9")


@dataclass(frozen=True)
class TrainJob:
    model: str
    method: str
    dtype: str
    warmup: int
    steps: int  # per round
    rounds: int = 1  # fresh timed workers, interleaved with the other jobs' rounds
    batch: int = 8


def training_plan(quick: bool, models: Sequence[str] | None, methods: Sequence[str] | None) -> list[TrainJob]:
    """ViT-B/16 gets every method in fp32 and the main ones in bf16, in two rounds; ViT-L/H get fewer steps and
    methods, in one round.

    ``models``/``methods`` narrow the plan; a model outside it (the tests' tiny ViT) gets ViT-B's fp32 jobs.
    """
    if quick:
        plan = [TrainJob("vit_b16", m, "fp32", 1, 1, rounds=2) for m in ALL_METHODS]
        plan += [TrainJob("vit_b16", m, "bf16", 1, 1) for m in ("lora8", "snell8_s0.9")]
    else:
        plan = [TrainJob("vit_b16", m, "fp32", 2, 4, rounds=2) for m in ALL_METHODS]
        bf16 = ("full", "lora8", "snell8_s0.9", "snell8_s0.9_dropout")
        plan += [TrainJob("vit_b16", m, "bf16", 1, 2, rounds=2) for m in bf16]
        plan += [TrainJob("vit_l16", m, "fp32", 1, 3) for m in BIG_MODEL_METHODS]
        plan += [TrainJob("vit_h14", m, "fp32", 1, 2) for m in BIG_MODEL_METHODS]
    if models is not None:
        planned = {job.model for job in plan}
        base = [job for job in plan if job.model == "vit_b16" and job.dtype == "fp32"]
        plan = [job for job in plan if job.model in models]
        plan += [replace(job, model=model) for model in models if model not in planned for job in base]
    return [job for job in plan if methods is None or job.method in methods]


def _shape(model_name: str) -> tuple[int, int]:
    """(parameter count, tokens x width x depth) of a model, built on the meta device: no memory, no time."""
    with torch.device("meta"):
        model = MODELS[model_name].create()
    tokens = model.patch_embed.num_patches + 1
    return sum(p.numel() for p in model.parameters()), tokens * model.embed_dim * len(model.blocks)


def estimated_bytes(job: TrainJob, measured: dict[tuple[str, str, str, int], dict[str, Any]]) -> int:
    """A generous estimate of a training worker's RSS, to skip jobs that cannot fit instead of risking OOM.

    When the same method already ran on another model at the same batch and dtype, its default-malloc peak
    is scaled by the larger of the parameter and activation ratios (glibc's slack grows with them too).
    Otherwise: fp32 weights (x4 for full fine-tuning: gradients and two AdamW moments) plus activations
    taken as 20 floats per token, channel and block (ViT-B/16 at batch 8 saves about 15).
    """
    params, activations = _shape(job.model)
    weights = params * 4
    need = weights * (4 if job.method == "full" else 1) + 20 * 4 * job.batch * activations
    for (model, method, dtype, batch), row in measured.items():
        if (method, dtype, batch) == (job.method, job.dtype, job.batch):
            other_params, other_activations = _shape(model)
            scale = max(params / other_params, activations / other_activations)
            need = max(need, weights + int(row["peak_default_malloc_mb"] * 2**20 * scale))
    return need + 2**30


def run_worker(module: str, args: Sequence[str], timeout: float, extra_env: dict[str, str]) -> tuple[Any, str]:
    """Run ``python -m module args`` in a fresh process; (parsed JSON of its last line, "ok") or (None, error)."""
    env = {**os.environ, **extra_env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"failed (exit {done.returncode}): {last}"
    return json.loads(done.stdout.strip().splitlines()[-1]), "ok"


def _step_args(job: TrainJob, warmup: int, steps: int) -> list[str]:
    """Arguments of a ``benchmarks.step`` worker for this job."""
    return [
        *("--model", job.model, "--method", job.method, "--dtype", job.dtype, "--batch", str(job.batch)),
        *("--warmup", str(warmup), "--steps", str(steps)),
    ]


_PINNED_OR_MEMORY = frozenset(
    {"step_times", "step_s_median", "step_s_min", "minor_faults_per_step", "system_s_per_step", "peak_mb"}
)
"""A step worker's columns that the default-malloc worker does not fill: the pinned timed and memory workers do."""


def _first_round(job: TrainJob, timeout: float, measured: dict[tuple[str, str, str, int], dict[str, Any]]) -> dict:
    """The job's default-malloc timed worker, its memory worker and its first pinned timed worker, or the reason
    it was skipped or failed."""
    row: dict[str, Any] = {"model": job.model, "method": job.method, "dtype": job.dtype, "batch": job.batch}
    need, available = estimated_bytes(job, measured), psutil.virtual_memory().available
    if need > available:
        row["status"] = f"skipped: needs about {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
        return row
    timed_args = _step_args(job, job.warmup, job.steps)
    default, status = run_worker("benchmarks.step", timed_args, timeout, DEFAULT_MALLOC_ENV)
    memory = timed = None
    if default is not None:
        # Its step times, faults and peak are the default-malloc columns; the plain ones are the pinned and memory
        # workers' alone, blank in a row whose later worker failed.
        row.update({key: value for key, value in default.items() if key not in _PINNED_OR_MEMORY})
        row.update(peak_default_malloc_mb=default["peak_mb"], step_s_default_malloc=default["step_s_median"])
        row.update(
            minor_faults_per_step_default_malloc=default["minor_faults_per_step"],
            system_s_per_step_default_malloc=default["system_s_per_step"],
        )
        memory, status = run_worker("benchmarks.step", _step_args(job, 1, 1), timeout, MEMORY_ENV)
    if memory is not None:
        row["peak_mb"] = memory["peak_mb"]
        timed, status = run_worker("benchmarks.step", timed_args, timeout, TIMED_ENV)
    if timed is not None:
        row["round_times"], row["round_faults"] = [timed["step_times"]], [timed["minor_faults_per_step"]]
        measured[job.model, job.method, job.dtype, job.batch] = row
    row["status"] = status
    return row


def _pool_rounds(row: dict[str, Any]) -> None:
    """Step-time columns over every round's steps (the median of all of them), and each round's median."""
    row.pop("step_times", None)
    rounds, faults = row.pop("round_times", None), row.pop("round_faults", None)
    if rounds is None:
        return
    pooled = [t for times in rounds for t in times]
    row.update(
        rounds=len(rounds),
        step_s_median=statistics.median(pooled),
        step_s_min=min(pooled),
        step_s_round_medians=" / ".join(f"{statistics.median(times):.3f}" for times in rounds),
        steps=len(pooled),
        minor_faults_per_step=statistics.mean(faults),
    )


def run_training(jobs: Sequence[TrainJob], timeout: float) -> list[dict[str, Any]]:
    """Round 1 runs every job in order (default-malloc timed, memory, pinned timed); round r > 1 runs the jobs
    that want it again, pinned timed only, in reverse order on even rounds."""
    rows: dict[TrainJob, dict[str, Any]] = {}
    measured: dict[tuple[str, str, str, int], dict[str, Any]] = {}  # (model, method, dtype, batch) -> row
    for round_index in range(max((job.rounds for job in jobs), default=0)):
        for job in jobs if round_index % 2 == 0 else jobs[::-1]:
            if round_index == 0:
                rows[job] = row = _first_round(job, timeout, measured)
            elif round_index < job.rounds and rows[job]["status"] == "ok":
                row = rows[job]
                args = _step_args(job, job.warmup, job.steps)
                timed, status = run_worker("benchmarks.step", args, timeout, TIMED_ENV)
                if timed is None:
                    row["status"] = f"round {round_index + 1}: {status}"
                else:
                    row["round_times"].append(timed["step_times"])
                    row["round_faults"].append(timed["minor_faults_per_step"])
            else:
                continue
            label = f"train {job.model} {job.dtype} {job.method} round {round_index + 1}/{job.rounds}"
            print(f"{label}: {_summary(row)}", flush=True)
    for row in rows.values():
        _pool_rounds(row)
    return [rows[job] for job in jobs]


def _faults(row: dict[str, Any]) -> str | None:
    """Minor page faults per timed step, pinned and (default malloc), with the system time they cost."""
    if row.get("minor_faults_per_step") is None:
        return None
    default = f"{row['minor_faults_per_step_default_malloc']:.0f}, {row['system_s_per_step_default_malloc']:.2f} s"
    return f"{row['minor_faults_per_step']:.0f} ({default})"


def _summary(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return row["status"]
    return (
        f"{statistics.median(row['round_times'][-1]):.3f} s/step, peak {row['peak_mb']:.0f} MB "
        f"(default malloc {row['peak_default_malloc_mb']:.0f} MB), saved {row['saved_mb']:.0f} MB"
    )


def _train_value(rows: Sequence[dict[str, Any]], method: str, column: str) -> float | None:
    for row in rows:
        if (row["model"], row["method"], row["dtype"], row["status"]) == ("vit_b16", method, "fp32", "ok"):
            return row[column]
    return None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def targets(
    train: Sequence[dict[str, Any]], infer: Sequence[dict[str, Any]], threshold: Sequence[dict[str, Any]]
) -> list[Target]:
    """The issues' targets, on ViT-B/16, batch 8, fp32, for our SNELL-8 at s=0.9 without dropout, and for SNELL-32
    and SNELLA-8 against it."""
    ours, ref = "snell8_s0.9", "reference_snell8"
    step = {m: _train_value(train, m, "step_s_median") for m in (ours, "lora8", ref, "snella8", "snell32_s0.9")}
    step_default = {m: _train_value(train, m, "step_s_default_malloc") for m in (ours, "lora8", ref)}
    peak = {m: _train_value(train, m, "peak_mb") for m in (ours, "lora8", "full", "snella8")}
    peak_default = {m: _train_value(train, m, "peak_default_malloc_mb") for m in (ours, "lora8", "full")}
    saved = {m: _train_value(train, m, "saved_mb") for m in (ours, "lora8")}
    vit_b16 = [r for r in infer if r["model"] == "vit_b16"]  # the heading says ViT-B/16: not another model's row
    merged = next((r["ratio_to_base"] for r in vit_b16 if r["variant"] == "snell merged"), None)
    selection = next(
        (r["ratio_to_gemm"] for r in threshold if r["shape"] == "11008x4096" and r["method"].startswith("snell thr")),
        None,
    )
    return [
        Target("step time: SNELL-8 s=0.9 / peft LoRA-8", _ratio(step[ours], step["lora8"]), 1.25),
        Target("step time: SNELL-8 s=0.9 / reference-style SNELL-8", _ratio(step[ours], step[ref]), 0.45),
        Target(
            "step time, default malloc (history-dependent): SNELL-8 s=0.9 / peft LoRA-8",
            _ratio(step_default[ours], step_default["lora8"]),
            1.25,
        ),
        Target(
            "step time, default malloc (history-dependent): SNELL-8 s=0.9 / reference-style SNELL-8",
            _ratio(step_default[ours], step_default[ref]),
            0.45,
        ),
        Target("peak memory: SNELL-8 s=0.9 / peft LoRA-8", _ratio(peak[ours], peak["lora8"]), 1.0),
        Target("peak memory: SNELL-8 s=0.9 / full fine-tuning", _ratio(peak[ours], peak["full"]), 0.6),
        Target(
            "peak memory, default malloc (history-dependent): SNELL-8 s=0.9 / peft LoRA-8",
            _ratio(peak_default[ours], peak_default["lora8"]),
            1.0,
        ),
        Target(
            "peak memory, default malloc (history-dependent): SNELL-8 s=0.9 / full fine-tuning",
            _ratio(peak_default[ours], peak_default["full"]),
            0.6,
        ),
        Target("saved for backward: SNELL-8 s=0.9 / peft LoRA-8", _ratio(saved[ours], saved["lora8"]), 1.02),
        Target("inference: merged SNELL / base model", merged, 1.02),
        Target("threshold 11008x4096 / one dense GEMM with 2048 tokens", selection, 0.2),
        Target("step time: SNELL-32 s=0.9 / SNELL-8 s=0.9", _ratio(step["snell32_s0.9"], step[ours]), 1.1),
        Target("step time: SNELLA-8 / SNELL-8 s=0.9", _ratio(step["snella8"], step[ours]), 1.1),
        Target("peak memory: SNELLA-8 / SNELL-8 s=0.9", _ratio(peak["snella8"], peak[ours]), 1.0),
    ]


def write_markdown(
    out: Path,
    quick: bool,
    env: dict[str, str],
    command: str,
    goals: Sequence[Target],
    train: Sequence[dict[str, Any]],
    infer: Sequence[dict[str, Any]],
    threshold: Sequence[dict[str, Any]],
    pictures: Sequence[Path],
) -> None:
    title = "# SNELL performance benchmarks" + (" (QUICK SMOKE RUN: not results)" if quick else "")
    parts = [
        title,
        "",
        "Written by `benchmarks/run.py`. CPU only; timm models with random weights; input 224 px (ViT-H: 224 px"
        " with 14 px patches); AdamW; each training/inference measurement in a fresh process with "
        "MALLOC_ARENA_MAX=2. Step time: median of timed steps (forward + backward + AdamW) after warm-up, pooled "
        "over the rounds (fresh workers, each round after all the other jobs' previous round, the second in "
        "reverse order; the round medians show the spread), with glibc pinned to keep freed memory (mmap "
        "threshold 256 MiB, no trimming), so no method pays page faults after warm-up. Default-malloc step: "
        "one worker under glibc's defaults, where the page faults a method pays depend on its heap history; "
        "the page-fault column gives minor faults per timed step, pinned and (default malloc, with the system "
        "time per step). "
        "Peak MB: kernel peak RSS (VmHWM, reset after the model, adapters and batch exist) minus the RSS at "
        "that point, so optimizer state, gradients, activations and allocator slack, over a warm-up and one "
        "step in a separate process whose glibc mmap threshold is pinned at 1 MiB (large blocks are returned "
        "when freed: the peak follows live memory). Default-malloc peak: the same over the timed run under "
        "glibc's defaults, whose dynamic mmap threshold keeps freed blocks up to 32 MiB in the heap, so it "
        "depends on allocation history. Saved MB: tensors saved "
        "for backward in one forward, each storage once, parameters and buffers excluded (tensors a "
        "checkpoint keeps for recomputation are not seen, so the reference-style row undercounts).",
        "",
        "## Environment",
        "",
        environment_markdown(env, command),
        "",
        "## Targets (ViT-B/16, batch 8, fp32)",
        "",
        markdown_table(
            ["target", "measured", "limit", "verdict"], [(g.name, g.shown, f"<= {g.limit}", g.verdict) for g in goals]
        ),
    ]
    if train:
        parts += ["", "## Training step", ""]
        headers = ["model", "dtype", "method", "trainable", "steps", "s/step", "round medians"]
        headers += ["default-malloc s/step", "page faults/step (default malloc)", "peak MB"]
        headers += ["default-malloc peak MB", "saved MB", "status"]
        parts.append(
            markdown_table(
                headers,
                [
                    (
                        r["model"],
                        r["dtype"],
                        METHODS[r["method"]].label,
                        r.get("trainable_params"),
                        r.get("steps"),
                        r.get("step_s_median"),
                        r.get("step_s_round_medians"),
                        r.get("step_s_default_malloc"),
                        _faults(r),
                        r.get("peak_mb"),
                        r.get("peak_default_malloc_mb"),
                        r.get("saved_mb"),
                        r["status"],
                    )
                    for r in train
                ],
            )
        )
    if infer:
        parts += ["", "## Inference (eval, torch.inference_mode)", ""]
        parts.append(
            markdown_table(
                ["model", "variant", "batch", "s/forward", "ratio to base", "max |logit diff| vs unmerged"],
                [[r[c] for c in INFER_COLUMNS if c != "rounds"] for r in infer],
            )
        )
    if threshold:
        parts += ["", "## Threshold selection at s = 0.9 (keep 10 %)", ""]
        parts.append(
            markdown_table(
                ["shape", "method", "seconds", "GEMM s (2048 tokens)", "ratio to GEMM", "note"],
                [[r[c] for c in THRESHOLD_COLUMNS if c != "numel"] for r in threshold],
            )
        )
    parts += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pictures]
    (out / "results.md").write_text("\n".join(parts) + "\n")


def output_folder(args: argparse.Namespace) -> Path:
    """--out, else the committed folder for the whole suite only: a part of it would replace its tables."""
    whole = set(args.parts) == set(PARTS) and args.models is None and args.methods is None
    return args.out or (QUICK_OUT if args.quick else FULL_OUT if whole else PART_OUT)


def main(argv: Sequence[str] | None = None) -> list[Target]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps and rounds: a smoke test, not results")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"output folder (default {FULL_OUT} for the whole suite, {PART_OUT} for a part of it (--parts, "
        f"--models, --methods), {QUICK_OUT} with --quick)",
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="training/inference models to keep")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, help="training methods to keep")
    parser.add_argument("--timeout", type=positive_float, default=3600.0, help="seconds per worker process")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    out = output_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    env, command = environment(), command_line("benchmarks.run", argv)
    started = time.time()

    train: list[dict[str, Any]] = []
    if "train" in args.parts:
        jobs = training_plan(args.quick, args.models, args.methods)
        train = run_training(jobs, args.timeout)
        write_csv(out / "training.csv", train, TRAIN_COLUMNS)

    infer: list[dict[str, Any]] = []
    if "infer" in args.parts:
        model = (args.models or ["vit_b16"])[0]
        result, status = run_worker(
            "benchmarks.inference", ["--model", model, "--rounds", "3" if args.quick else "15"], args.timeout, TIMED_ENV
        )
        infer = result or []
        print(f"inference {model}: {status}", flush=True)
        write_csv(out / "inference.csv", infer, INFER_COLUMNS)

    threshold: list[dict[str, Any]] = []
    if "threshold" in args.parts:
        repeats = ["--repeats", "2" if args.quick else "5"]
        result, status = run_worker("benchmarks.threshold", repeats, args.timeout, TIMED_ENV)
        threshold = result or []
        print(f"threshold: {status}", flush=True)
        write_csv(out / "threshold.csv", threshold, THRESHOLD_COLUMNS)

    env["wall time"] = f"{(time.time() - started) / 60:.1f} min"
    env["load average (1, 5, 15 min) at end"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    goals = targets(train, infer, threshold)
    pictures = plots.training(out, train) + plots.threshold(out, threshold)
    write_markdown(out, args.quick, env, command, goals, train, infer, threshold, pictures)
    for goal in goals:
        print(f"{goal.verdict:4}  {goal.name}: {goal.shown} (limit {goal.limit})")
    print(f"results: {out / 'results.md'}")
    return goals


if __name__ == "__main__":
    main()
