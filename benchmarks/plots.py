"""PNG plots of the suite's results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported
import matplotlib.pyplot as plt

from benchmarks.methods import METHODS

PANELS = (
    ("step_s_median", "median step time (s)"),
    ("peak_mb", "peak MB above loaded model"),
    ("saved_mb", "MB saved for backward"),
)


def training(out: Path, rows: Sequence[dict[str, Any]]) -> list[Path]:
    """One figure per model: step time, peak memory and saved bytes per method and dtype."""
    paths = []
    for model in dict.fromkeys(r["model"] for r in rows if r["status"] == "ok"):
        done = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        labels = [f"{METHODS[r['method']].label} [{r['dtype']}]" for r in done]
        fig, axes = plt.subplots(1, len(PANELS), figsize=(16, 0.45 * len(done) + 1.5), sharey=True)
        for ax, (column, title) in zip(axes, PANELS, strict=True):
            colors = ["tab:orange" if r["method"].startswith("snell") else "tab:blue" for r in done]
            ax.barh(range(len(done)), [r[column] or 0.0 for r in done], color=colors)
            ax.set_title(title)
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(range(len(done)), labels)
        axes[0].invert_yaxis()
        fig.suptitle(f"{model}: training step, batch {done[0]['batch']} (orange: our SNELL)")
        fig.tight_layout()
        path = out / f"training_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def threshold(out: Path, rows: Sequence[dict[str, Any]]) -> list[Path]:
    """Selection time against matrix size, with the 2048-token dense GEMM of each matrix for scale."""
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(8, 5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = [(r["numel"], r["seconds"]) for r in rows if r["method"] == method and r["seconds"] is not None]
        ax.plot(*zip(*points, strict=True), marker="o", label=method)
    gemm = sorted({(r["numel"], r["gemm_s"]) for r in rows})
    ax.plot(*zip(*gemm, strict=True), "k--", marker="s", label="dense GEMM, 2048 tokens")
    ax.set(xscale="log", yscale="log", xlabel="matrix entries", ylabel="seconds (median)")
    ax.set_title("Threshold selection at s = 0.9 on CPU")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "threshold.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
