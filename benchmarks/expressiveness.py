"""Paper App. A.3 on CPU: how well each kernel's rank-r merge fits a random full-rank matrix, dense and sparsified.

    .venv/bin/python -m benchmarks.expressiveness            # ~5 min, one thread; writes benchmarks/results/
    .venv/bin/python -m benchmarks.expressiveness --quick    # seconds; writes runs/bench-quick/

Every fit goes through the public API: a zero-weight nn.Linear gets a SNELL adapter (learnable kernel
coefficients), and the layer applied to the identity is ΔWˢᵀ, so the library's own fused forward and
hand-written backward are what is trained. Adam on the mean squared error.

1. Dense fit (s = 0): target W* ~ N(0, 1), m×n, full rank. Kernels linear (= LoRA), piecewise_linear,
   rbf, sigmoid at the same r. The paper's lr 1e-4 barely moves in a CPU budget of steps, so a larger lr
   is run too; both are reported. The best any linear rank-r merge can do is the truncated SVD of W*
   (Eckart–Young), shown as a line. Rank of the learned ΔW: numerical rank and the number of singular
   values holding 99 % of its energy.
2. Sparsified fit (s = 0.9, mask mode, competition at every step): target = the 10 % largest entries of a
   random N(0, 1) matrix (a full-rank sparse update, what sparse tuning learns). A LoRA (linear) merge and
   a kernelized merge are sparsified; reported: relative error and how many of the target's non-zeros
   the kept entries hit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import snell
from benchmarks.report import (
    REPO,
    command_line,
    environment,
    environment_markdown,
    markdown_table,
    positive_int,
    write_csv,
)

KERNELS = ("linear", "piecewise_linear", "rbf", "sigmoid")
PAPER_LR = 1e-4


@dataclass(frozen=True)
class Fit:
    kernel: str
    sparsity: float
    lr: float
    seed: int


def fit(target: Tensor, rank: int, job: Fit, steps: int, log_every: int) -> tuple[list[float], Tensor]:
    """Train one adapter on ``target``; the relative MSE (MSE / mean of target²) every ``log_every`` steps, ΔWˢ."""
    torch.manual_seed(job.seed)
    m, n = target.shape
    layer = nn.Linear(n, m, bias=False)
    nn.init.zeros_(layer.weight)
    config = snell.SnellConfig(
        r=rank,
        kernel=job.kernel,
        sparsity=job.sparsity,
        sparsify_mode="mask",
        learnable_coefficients=True,
        target_modules=["0"],
    )
    model = snell.get_snell_model(nn.Sequential(layer), config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=job.lr)
    eye, goal, scale = torch.eye(n), target.T, target.square().mean().item()
    curve = []
    for step in range(steps + 1):
        loss = F.mse_loss(model(eye), goal)
        if step % log_every == 0:
            curve.append(loss.item() / scale)
        if step < steps:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return curve, layer.delta_weight()


def ranks(matrix: Tensor) -> tuple[int, int]:
    """(numerical rank, number of singular values holding 99 % of the squared Frobenius norm)."""
    singular = torch.linalg.svdvals(matrix.double())
    energy = singular.square().cumsum(0) / singular.square().sum()
    # The rank tolerance follows ΔW's own float32 precision, not float64's.
    return int(torch.linalg.matrix_rank(matrix)), int((energy < 0.99).sum()) + 1


def best_linear_error(target: Tensor, rank: int) -> float:
    """Relative MSE of the best rank-``rank`` approximation (truncated SVD): the floor for a linear merge."""
    singular = torch.linalg.svdvals(target.double()).square()
    return float(singular[rank:].sum() / singular.sum())


def sparse_target(m: int, n: int, keep: float, seed: int) -> Tensor:
    values = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    tau = values.abs().flatten().kthvalue(values.numel() - round(keep * values.numel()) + 1).values
    return values * (values.abs() >= tau)


def run(size: int, rank: int, steps: int, seeds: int, lrs: Sequence[float], log_every: int) -> dict[str, Any]:
    """Both experiments; rows per (kernel, sparsity, lr, seed) and the mean curves."""
    rows, curves = [], {}
    jobs = [Fit(k, 0.0, lr, s) for lr in lrs for k in KERNELS for s in range(seeds)]
    jobs += [Fit(k, 0.9, max(lrs), s) for k in ("linear", "piecewise_linear") for s in range(seeds)]
    for job in jobs:
        sparse = job.sparsity > 0
        target = (
            sparse_target(size, size, 0.1, 1000 + job.seed)
            if sparse
            else torch.randn(size, size, generator=torch.Generator().manual_seed(1000 + job.seed))
        )
        start = time.perf_counter()
        curve, delta = fit(target, rank, job, steps, log_every)
        numerical, energy = ranks(delta)
        hits = ((delta != 0) & (target != 0)).sum() / (target != 0).sum() if sparse else None
        rows.append(
            {
                "experiment": "sparsified s=0.9, sparse target" if sparse else "dense, random target",
                "kernel": job.kernel,
                "sparsity": job.sparsity,
                "lr": job.lr,
                "seed": job.seed,
                "steps": steps,
                "final_rel_mse": curve[-1],
                "numerical_rank": numerical,
                "energy99_rank": energy,
                "target_support_hit": None if hits is None else float(hits),
                "best_linear_rel_mse": best_linear_error(target, rank),
                "seconds": time.perf_counter() - start,
            }
        )
        curves.setdefault((job.kernel, job.sparsity, job.lr), []).append(curve)
        print(f"{job}: rel MSE {curve[-1]:.4f}, rank {numerical}/{energy} (99 %)", flush=True)
    return {"rows": rows, "curves": curves}


def summarise(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Mean ± std over seeds per (experiment, kernel, lr)."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["experiment"], row["kernel"], row["lr"]), []).append(row)
    table = []
    for (experiment, kernel, lr), group in groups.items():

        def mean(column: str, group: list[dict[str, Any]] = group) -> float:
            return statistics.fmean(r[column] for r in group)

        spread = statistics.pstdev(r["final_rel_mse"] for r in group)
        hits = None if group[0]["target_support_hit"] is None else mean("target_support_hit")
        error = f"{mean('final_rel_mse'):.4f} ± {spread:.4f}"
        ranks_ = (mean("numerical_rank"), mean("energy99_rank"))
        table.append([experiment, kernel, lr, error, mean("best_linear_rel_mse"), *ranks_, hits])
    return table


def plot(path: Path, curves: dict[tuple[str, float, float], list[list[float]]], log_every: int, floor: float) -> None:
    panels = sorted({(s, lr) for _, s, lr in curves})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (sparsity, lr) in zip(axes[0], panels, strict=True):
        for (kernel, s, rate), runs in curves.items():
            if (s, rate) == (sparsity, lr):
                mean = [statistics.fmean(values) for values in zip(*runs, strict=True)]
                ax.plot([i * log_every for i in range(len(mean))], mean, label=kernel)
        if sparsity == 0:
            ax.axhline(floor, color="k", linestyle="--", label="best rank-r linear (SVD)")
        title = "sparsified s=0.9, sparse target" if sparsity else "dense fit, random target"
        ax.set(title=f"{title}, lr {lr:g}", xlabel="Adam step", ylabel="MSE / mean(target²)", yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke test")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results, or runs/bench-quick)")
    parser.add_argument("--size", type=positive_int, help="target is size×size (default 256; quick 48)")
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, help="Adam steps per fit (default 3000; quick 60)")
    parser.add_argument("--seeds", type=positive_int, help="seeds per setting (default 3; quick 1)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[PAPER_LR, 1e-2])
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    # Matrices this small gain nothing from a second thread, and one thread is immune to a busy machine.
    torch.set_num_threads(1)
    size = args.size if args.size is not None else 48 if args.quick else 256
    steps = args.steps if args.steps is not None else 60 if args.quick else 3000
    seeds = args.seeds if args.seeds is not None else 1 if args.quick else 3
    out = args.out or REPO / ("runs/bench-quick" if args.quick else "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    env, command = environment(), command_line("benchmarks.expressiveness", argv)
    log_every = max(steps // 100, 1)
    started = time.time()
    result = run(size, args.rank, steps, seeds, args.lrs, log_every)
    env["wall time"] = f"{(time.time() - started) / 60:.1f} min"
    rows = result["rows"]
    write_csv(out / "expressiveness.csv", rows, list(rows[0]))
    floor = statistics.fmean(r["best_linear_rel_mse"] for r in rows if r["sparsity"] == 0)
    plot(out / "expressiveness.png", result["curves"], log_every, floor)
    headers = ["experiment", "kernel", "lr", "final MSE / mean(target²)", "best linear rank-r (SVD)"]
    headers += ["numerical rank of ΔW", "99 %-energy rank", "target non-zeros hit"]
    text = [
        "# Expressiveness of kernelized merges (paper App. A.3)" + (" (QUICK SMOKE RUN)" if args.quick else ""),
        "",
        (__doc__ or "").split("\n\n", 2)[2].strip(),
        "",
        f"Target {size}×{size}, r = {args.rank}, {steps} Adam steps, {seeds} seed(s); mean ± std over seeds.",
        "",
        markdown_table(headers, summarise(rows)),
        "",
        "![expressiveness](expressiveness.png)",
        "",
        "## Environment",
        "",
        environment_markdown(env, command),
    ]
    (out / "expressiveness.md").write_text("\n".join(text) + "\n")
    print(f"results: {out / 'expressiveness.md'}")


if __name__ == "__main__":
    main()
