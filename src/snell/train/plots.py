"""Pictures of runs, searches and demos: one place that sets up matplotlib and writes PNG files.

matplotlib is imported only when a picture is drawn (it costs about a second), always with the Agg
backend, so that plotting works on machines without a display and inside worker processes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

CURVES_FILE = "curves.png"
#: snella runs: where the allocator left each layer's kept ratio after every epoch.
SPARSITY_FILE = "sparsity.png"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, never a window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG via a temporary file and a rename, so that a run killed while plotting never
    leaves a truncated picture, then free the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
    os.replace(tmp, path)
    return path


def plot_curves(metrics: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Training loss, and training / evaluation accuracy, per epoch of a run (its metrics.jsonl records)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = [m["epoch"] for m in metrics]
    loss_ax.plot(epochs, [m["train_loss"] for m in metrics], marker="o", label="train")
    loss_ax.set_title("loss")
    acc_ax.plot(epochs, [m["train_acc"] for m in metrics], marker="o", label="train")
    for key in ("val_acc", "test_acc", "ema_val_acc", "ema_test_acc"):  # ema_: the weight average (--ema-decay)
        evaluated = [m for m in metrics if key in m]
        if evaluated:
            acc_ax.plot([m["epoch"] for m in evaluated], [m[key] for m in evaluated], marker="s", label=key[:-4])
    acc_ax.set_title("accuracy")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sparsity(metrics: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """SNELLA's allocation over a run (the ``sparsity`` records of metrics.jsonl): the kept ratio overall and its
    spread per epoch, and a map of every adapted matrix's kept ratio (rows, in model order; q, k and v of a fused
    projection each have a row) by epoch, which shows which layers won the competition for the budget."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    records = [m for m in metrics if "sparsity" in m]
    epochs = [m["epoch"] for m in records]
    units = [
        f"{name}[{g}]" if len(groups) > 1 else name
        for name, groups in records[-1]["sparsity"]["layers"].items()
        for g in range(len(groups))
    ]
    kept = [[1.0 - s for groups in m["sparsity"]["layers"].values() for s in groups] for m in records]
    fig, (line_ax, map_ax) = plt.subplots(
        1, 2, figsize=(11, max(3.6, 0.12 * len(units) + 1.2)), gridspec_kw={"width_ratios": [1, 1.4]}
    )
    line_ax.plot(epochs, [1.0 - m["sparsity"]["overall"] for m in records], marker="o", label="overall (by size)")
    line_ax.fill_between(
        epochs,
        [1.0 - m["sparsity"]["max"] for m in records],
        [1.0 - m["sparsity"]["min"] for m in records],
        alpha=0.25,
        label="min to max over matrices",
    )
    line_ax.set_title("kept ratio (1 - sparsity)")
    line_ax.set_xlabel("epoch")
    line_ax.set_ylim(0.0, 1.02)
    line_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    line_ax.grid(alpha=0.3)
    line_ax.legend(fontsize=8)
    image = map_ax.imshow(
        list(map(list, zip(*kept, strict=True))),
        aspect="auto",
        interpolation="nearest",
        vmin=0.0,
        vmax=1.0,
        cmap="viridis",
        extent=(epochs[0] - 0.5, epochs[-1] + 0.5, len(units) - 0.5, -0.5),
    )
    map_ax.set_title("kept ratio per matrix")
    map_ax.set_xlabel("epoch")
    map_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    map_ax.set_yticks(range(len(units)))
    map_ax.set_yticklabels(units, fontsize=5 if len(units) > 24 else 7)
    fig.colorbar(image, ax=map_ax, fraction=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_search(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Val accuracy against s, one line per (lr, r); stopped trials are crosses at their last evaluation.

    The x axis is -log10(1 - s) (labelled with s), so that 0.9, 0.99 and 0.995 do not pile up at the right.
    """

    def x_of(s: float) -> float:
        return -math.log10(max(1.0 - s, 1e-4))

    fig, ax = pyplot().subplots(figsize=(6, 4))
    series = sorted({(r["params"]["lr"], r["params"]["r"]) for r in records})
    for lr, rank in series:
        mine = sorted(
            (r for r in records if (r["params"]["lr"], r["params"]["r"]) == (lr, rank)),
            key=lambda r: r["params"]["sparsity"],
        )
        done = [r for r in mine if r["status"] == "finished"]
        line = ax.plot(
            [x_of(r["params"]["sparsity"]) for r in done],
            [r["val_accuracy"] for r in done],
            marker="o",
            label=f"lr={lr:g}, r={rank}",
        )[0]
        stopped = [r for r in mine if r["status"] == "stopped"]
        ax.scatter(
            [x_of(r["params"]["sparsity"]) for r in stopped],
            [r["val_accuracy"] for r in stopped],
            marker="x",
            color=line.get_color(),
        )
    sparsities = sorted({r["params"]["sparsity"] for r in records})
    ax.set_xticks([x_of(s) for s in sparsities], [f"{s:g}" for s in sparsities])
    ax.set_xlabel("sparsity s (snella: its target; fraction of each update zeroed; x = -log10(1 - s))")
    ax.set_ylabel("val accuracy (last epoch)")
    ax.set_title(title or "snell search: validation accuracy (x = stopped early)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
