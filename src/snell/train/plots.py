"""Pictures of runs, searches and demos: one place that sets up matplotlib and writes PNG files.

matplotlib is imported only when a picture is drawn (it costs about a second), always with the Agg
backend, so that plotting works on machines without a display and inside worker processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CURVES_FILE = "curves.png"


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
    for key in ("val_acc", "test_acc"):
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
