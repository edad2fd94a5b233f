"""What a run reports: the targets and the selection verdicts, the environment it ran in, and the result files."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.run import Run
from benchmarks.gpu.selection import TOKENS, fastest_exact
from benchmarks.gpu.training import VIT_METHODS
from benchmarks.gpu.triton_check import rank_costs, triton_min_numel
from benchmarks.report import REPO, Target, _version, markdown_table, write_csv
from snell import sparsify

CHECK_COLUMNS = ("check", "status", "seconds", "detail")
SELECTION_COLUMNS = (
    "shape",
    "numel",
    "method",
    "ms",
    "exact",
    "gemm_fp32_ms",
    "ratio_to_gemm_fp32",
    "gemm_bf16_ms",
    "ratio_to_gemm_bf16",
    "note",
)
TRAIN_COLUMNS = (
    "model",
    "method",
    "dtype",
    "batch",
    "trainable_params",
    "warmup",
    "steps",
    "step_ms_median",
    "step_ms_min",
    "peak_mb",
    "loaded_mb",
    "status",
)
PART_COLUMNS = ("part", "estimate_s", "wall_s", "status")
LAYER_COLUMNS = ("shape", "block_entries", "blocks", "ms", "ratio_to_dense", "note")
KERNEL_COLUMNS = ("shape", "numel", "dtype", "tokens", "kernel", "rank", "path", "ms", "ratio_to_dense", "note")


#: The batch each model's target rows are read at (bf16); the tiny ViT stand-in's is 2.
TARGET_BATCH = {"vit_b16": 64, "llama2_7b_2_layers": 1, "llama_tiny_2_layers": 1}


def _value(rows: Sequence[dict[str, Any]], model: str, method: str, column: str) -> float | None:
    for row in rows:
        if (row["model"], row["method"], row["dtype"], row["batch"]) == (
            model,
            method,
            "bf16",
            TARGET_BATCH.get(model, 2),
        ):
            return row.get(column) if row["status"] == "ok" else None
    return None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


TARGET_SETTING = "ViT-B/16, bf16 autocast, batch 64; the LLaMA row: 2 LLaMA-2-7B-shaped layers, bf16, 1 × 512 tokens"


def targets(run: Run) -> list[Target]:
    """The issues' targets: ViT-B/16, bf16 autocast, batch 64, and issue 25's SNELL-32 / SNELL-8 on the LLaMA-shaped
    layers (the tiny stand-ins in a smoke run)."""
    model = "vit_tiny_test" if run.smoke else "vit_b16"
    step = {m: _value(run.training, model, m, "step_ms_median") for m in VIT_METHODS}
    peak = {m: _value(run.training, model, m, "peak_mb") for m in VIT_METHODS}
    llm = "llama_tiny_2_layers" if run.smoke else "llama2_7b_2_layers"
    snell8, snell32 = (_value(run.training, llm, m, "step_ms_median") for m in ("snell8_s0.9", "snell32_s0.9"))
    shape = "512x300" if run.smoke else "11008x4096"
    selection = next(
        (r["ratio_to_gemm_fp32"] for r in run.selection if r["shape"] == shape and r["method"].startswith("library")),
        None,
    )
    ours = "snell8_s0.9"
    return [
        Target("step: SNELL-8 s=0.9 / peft LoRA-8", _ratio(step[ours], step["lora8"]), 1.15),
        Target("step: SNELL-8 s=0.9 / reference-style SNELL-8", _ratio(step[ours], step["reference_snell8"]), 0.45),
        Target("peak memory: SNELL-8 s=0.9 / peft LoRA-8", _ratio(peak[ours], peak["lora8"]), 1.0),
        Target("peak memory: SNELL-8 s=0.9 / full fine-tuning", _ratio(peak[ours], peak["full"]), 0.6),
        Target(f"threshold {shape} / one fp32 GEMM with {TOKENS} tokens", selection, 0.2),
        Target("LLaMA step: SNELL-32 s=0.9 / SNELL-8 s=0.9", _ratio(snell32, snell8), 1.1),
    ]


def selection_verdicts(run: Run) -> list[list[Any]]:
    """Per shape: the library's method, the fastest exact host-sync-free method, and whether they agree."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in run.selection):
        rows = [r for r in run.selection if r["shape"] == shape]
        chosen = sparsify.selection_method(run.device, rows[0]["numel"])
        best, overall = fastest_exact(rows, sync_free=True), fastest_exact(rows, sync_free=False)
        agrees = None if best is None else ("yes" if best["method"] == chosen else "NO")
        lines.append(
            [shape, chosen, best and best["method"], best and best["ms"], agrees, overall and overall["method"]]
        )
    return lines


def measured_table_row(run: Run) -> tuple[tuple[int, str], ...]:
    """The SELECTION_TABLE row these measurements support: from each measured size on, its fastest exact method
    without host reads (sizes in between take the smaller size's), merged where neighbours agree."""
    best = {}
    for r in run.selection:
        winner = fastest_exact([x for x in run.selection if x["shape"] == r["shape"]], sync_free=True)
        if winner is not None:
            best[r["numel"]] = winner["method"]
    row: list[tuple[int, str]] = []
    for index, (numel, method) in enumerate(sorted(best.items())):
        if not row or row[-1][1] != method:
            row.append((0 if index == 0 else numel, method))
    return tuple(row)


def _driver() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "unknown"


def _commit(given: str | None) -> str:
    if given:
        return given
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "benchmarks", "tests", ":!benchmarks/results"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown (no git; pass --commit)"
    commit = done.stdout.strip() or "unknown (not a git checkout; pass --commit)"
    return commit + (" + uncommitted changes" if status.stdout.strip() else "")


def environment(device: str, commit: str | None) -> dict[str, str]:
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        device_text = f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB"
    else:
        device_text = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    env = {
        "device": device_text,
        "driver": _driver() if device == "cuda" else "n/a",
        "CUDA (torch build)": str(torch.version.cuda),
        "cuDNN": str(torch.backends.cudnn.version()) if device == "cuda" else "n/a",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for package in ("timm", "transformers", "peft", "accelerate", "safetensors", "numpy"):
        env[package] = _version(package)
    env["snell commit"] = _commit(commit)
    env["fp32 matmul precision"] = torch.get_float32_matmul_precision()
    return env


def write_results(run: Run, out: Path, env: dict[str, str], command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "checks.csv", run.checks, CHECK_COLUMNS)
    write_csv(out / "selection.csv", run.selection, SELECTION_COLUMNS)
    write_csv(out / "training.csv", run.training, TRAIN_COLUMNS)
    write_csv(out / "parts.csv", run.parts, PART_COLUMNS)
    write_csv(out / "layers.csv", run.layers, LAYER_COLUMNS)
    write_csv(out / "kernels.csv", run.kernels, KERNEL_COLUMNS)
    failed = [c for c in run.checks if c["status"] == "FAIL"]
    skipped = [p for p in run.parts if p["status"].startswith("skipped")]
    lines = ["# SNELL on a GPU: `benchmarks.gpu`", ""]
    if run.smoke:
        lines += ["**SMOKE RUN: tiny models on the CPU, one step. These numbers are not results.**", ""]
    if not run.finished:
        done = run.parts[-1]["part"] if run.parts else "nothing"
        lines += [f"**UNFINISHED: written after `{done}`; a complete run overwrites this.**", ""]
    lines += [markdown_table(["", ""], env.items()), "", f"Command: `{command}`", f"Budget: {run.budget_s:.0f} s", ""]
    lines += [
        f"## Targets ({'the tiny stand-ins; ViT bf16 autocast, batch 2' if run.smoke else TARGET_SETTING})",
        "",
    ]
    lines += [
        markdown_table(
            ["target", "value", "limit", "verdict"], [[t.name, t.shown, t.limit, t.verdict] for t in targets(run)]
        )
    ]
    lines += ["", "## Parts", "", markdown_table(PART_COLUMNS, [[p[c] for c in PART_COLUMNS] for p in run.parts])]
    lines += ["", f"Skipped: {', '.join(p['part'] for p in skipped) if skipped else 'nothing'}."]
    lines += ["", f"## Checks: {len(failed)} of {len(run.checks)} fail", ""]
    families: dict[str, list[str]] = {}
    for check in run.checks:
        families.setdefault(check["check"].split(":")[0], []).append(check["status"])
    summary = [
        [family, len(statuses), *(statuses.count(s) for s in ("PASS", "FAIL", "n/a"))]
        for family, statuses in families.items()
    ]
    lines += [markdown_table(["checks", "count", "PASS", "FAIL", "n/a"], summary), ""]
    notable = [c for c in run.checks if c["status"] != "PASS" or c["detail"]]
    lines += ["Failures and checks with something to say (every row is in checks.csv):", ""]
    lines += [markdown_table(CHECK_COLUMNS, [[c[k] for k in CHECK_COLUMNS] for c in notable])]
    lines += ["", "## Selection of τ (s = 0.9)", "", "Whether the library's choice was the fastest exact method:", ""]
    headers = ["shape", "library uses", "fastest exact without host sync", "ms", "library fastest?", "fastest overall"]
    lines += [markdown_table(headers, selection_verdicts(run)), ""]
    lines += [f"Row of `SELECTION_TABLE[{run.device!r}]` these measurements support: `{measured_table_row(run)}`", ""]
    lines += [markdown_table(SELECTION_COLUMNS, [[r.get(c) for c in SELECTION_COLUMNS] for r in run.selection])]
    lines += ["", "## One SNELL layer per ΔW row-block size (forward + backward, bf16 autocast)", ""]
    lines += [markdown_table(LAYER_COLUMNS, [[r.get(c) for c in LAYER_COLUMNS] for r in run.layers])]
    lines += ["", "## One SNELL layer on the torch path and on the Triton path (forward + backward)", ""]
    lines += [f"`_TRITON_MIN_NUMEL` these measurements support: `{triton_min_numel(run.kernels)}`", ""]
    lines += [markdown_table(KERNEL_COLUMNS, [[r.get(c) for c in KERNEL_COLUMNS] for r in run.kernels]), ""]
    lines += ["One layer's SNELL-32 over its SNELL-8 (the wider pieces' cost, issue 25):", ""]
    headers = ["shape", "dtype", "kernel", "path", "r = 8 ms", "r = 32 ms", "r = 32 / r = 8"]
    lines += [markdown_table(headers, rank_costs(run.kernels))]
    lines += [
        "",
        "## Training steps",
        "",
        markdown_table(TRAIN_COLUMNS, [[r.get(c) for c in TRAIN_COLUMNS] for r in run.training]),
    ]
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path
