"""The training parts: each model × method in a fresh worker process (``python -m benchmarks.gpu --worker``),
median step time and peak memory per configuration."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import llama
from benchmarks.gpu.run import Run, _synchronize, once_ms
from benchmarks.methods import METHODS, MODELS, NUM_CLASSES
from benchmarks.report import REPO, fmt
from benchmarks.step import make_step

VIT_METHODS = ("snell8_s0.9", "lora8", "full", "reference_snell8")
CONFIGS = (("bf16", 64), ("bf16", 8), ("fp32", 64), ("fp32", 8))
LLAMA_SEQUENCE = 512


def _build_for_training(
    job: dict[str, Any], dtype: str, batch: int
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(model, inputs, targets) of one training configuration, built directly on the device."""
    device = job["device"]
    if job["family"] == "llama":
        shape = llama.TINY if job["smoke"] else llama.LLAMA2_7B
        model = llama.CausalLMLoss(llama.METHODS[job["method"]](llama.build(2, shape, device, torch.bfloat16)))
        ids = torch.randint(shape["vocab_size"], (batch, 16 if job["smoke"] else LLAMA_SEQUENCE), device=device)
        return model.train(), ids, llama.next_tokens(ids)
    spec = MODELS[job["model"]]
    with torch.device(device):
        model = METHODS[job["method"]].build(spec.create()).train()
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, device=device)
    return model, images, torch.randint(NUM_CLASSES, (batch,), device=device)


def _train_one(job: dict[str, Any], dtype: str, batch: int) -> dict[str, Any]:
    """Median step time and peak memory of one configuration; peak counted from after the model is built."""
    device = job["device"]
    row = {"model": job["model"], "method": job["method"], "dtype": dtype, "batch": batch}
    row.update(warmup=job["warmup"], steps=job["steps"])
    torch.manual_seed(0)
    model, inputs, targets = _build_for_training(job, dtype, batch)
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step = make_step(model, inputs, targets, dtype, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        row["loaded_mb"] = torch.cuda.memory_allocated() / 2**20
    for _ in range(job["warmup"]):
        step()
    _synchronize(device)
    times = [once_ms(step, device) for _ in range(job["steps"])]
    row.update(step_ms_median=statistics.median(times), step_ms_min=min(times), status="ok")
    if device == "cuda":
        row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def train_worker(
    job: dict[str, Any], emit: Callable[[dict[str, Any]], None] = lambda row: None
) -> list[dict[str, Any]]:
    """Every configuration of one (model, method) job, with the device's memory released and its peak reset
    between them; a configuration that fails (out of memory, say) is a row with the reason. ``emit`` gets each
    row as soon as it exists."""
    rows = []
    for dtype, batch in job["configs"]:
        try:
            row = _train_one(job, dtype, batch)
        except Exception as err:  # reported per configuration
            message = str(err).strip().splitlines()[0][:200] if str(err) else ""
            row = {"model": job["model"], "method": job["method"], "dtype": dtype, "batch": batch}
            row["status"] = f"error: {type(err).__name__}: {message}"
        rows.append(row)
        emit(row)
        gc.collect()
        if job["device"] == "cuda":
            torch.cuda.empty_cache()
    return rows


def _emit_json(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def _run_worker(job: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """``train_worker`` in a fresh process (so no job inherits another's allocator state). It prints a JSON row
    per configuration as it finishes, so a worker that fails or runs out of time still gives the rows it has;
    the configurations it did not reach get a row with the reason."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "benchmarks.gpu", "--worker", json.dumps(job)]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        stdout, stderr = done.stdout, done.stderr
        reason = f"worker failed (exit {done.returncode}): {(stderr.strip().splitlines() or [''])[-1][:200]}"
    except subprocess.TimeoutExpired as err:
        stdout, reason = err.stdout or "", f"worker stopped at the end of the budget ({timeout:.1f} s)"
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"model"')]
    reached = {(row["dtype"], row["batch"]) for row in rows}
    rows += [
        {"model": job["model"], "method": job["method"], "dtype": d, "batch": b, "status": reason}
        for d, b in job["configs"]
        if (d, b) not in reached
    ]
    return rows


@dataclass(frozen=True)
class TrainPart:
    """One model's training jobs: a process per method, every configuration in it."""

    key: str  # its name for --parts: train_<key> (a smoke run's stand-ins share the real models' keys)
    model: str
    family: str
    methods: tuple[str, ...]
    configs: tuple[tuple[str, int], ...]
    warmup: int
    steps: int
    estimate_s: float  # per method, on an H200: a guess until parts.csv has a measurement


def train_parts(smoke: bool) -> list[TrainPart]:
    """ViT-B/16 first (the targets), then the LLaMA-shaped layers, then ViT-L/16 and ViT-H/14."""
    if smoke:
        return [
            TrainPart("vit_b16", "vit_tiny_test", "vit", VIT_METHODS, (("bf16", 2),), 0, 1, 0),
            TrainPart("llama", "llama_tiny_2_layers", "llama", tuple(llama.METHODS), (("bf16", 1),), 0, 1, 0),
        ]
    return [
        TrainPart("vit_b16", "vit_b16", "vit", VIT_METHODS, CONFIGS, 3, 10, 20),
        TrainPart("llama", "llama2_7b_2_layers", "llama", tuple(llama.METHODS), (("bf16", 1),), 3, 10, 15),
        TrainPart("vit_l16", "vit_l16", "vit", VIT_METHODS, CONFIGS, 1, 3, 25),
        TrainPart("vit_h14", "vit_h14", "vit", VIT_METHODS, CONFIGS, 1, 3, 40),
    ]


def run_train_part(run: Run, part: TrainPart) -> None:
    """A model's methods, or none of them: the targets compare methods, so a model is skipped whole when its
    estimate does not fit. A job that still overruns is stopped at the end of the budget (rows say so)."""
    name = f"train_{part.key}"
    if not run.fits(name, part.estimate_s * len(part.methods)):
        return
    print(f"[{name}]", flush=True)
    for method in part.methods:
        began = time.monotonic()
        job = {
            "model": part.model,
            "family": part.family,
            "method": method,
            "configs": [list(c) for c in part.configs],
            "device": run.device,
            "smoke": run.smoke,
            "warmup": part.warmup,
            "steps": part.steps,
        }
        rows = train_worker(job) if run.smoke else _run_worker(job, timeout=max(run.left_s(), 10.0))
        run.training.extend(rows)
        for row in rows:
            print(f"  {row['model']} {row['method']} {row['dtype']} b{row['batch']}: {_train_summary(row)}", flush=True)
        wall_s = time.monotonic() - began
        run.parts.append(
            {"part": f"{name} {method}", "estimate_s": part.estimate_s, "wall_s": wall_s, "status": "done"}
        )
        run.save()


def _train_summary(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return row["status"]
    return f"{fmt(row['step_ms_median'])} ms/step, peak {fmt(row.get('peak_mb'))} MB"
