"""`snell search`: choose SNELL's sparsity (and learning rate, rank) on validation data only.

The best s differs per task (the reference scripts use anything from 0 to 0.995), and the reference code
picked it on the test set. Here every grid point trains on the training part (VTAB's train800) and is scored
on the validation part (val200) after its last epoch; search trials never evaluate the test set. The winner
is then retrained once on train + val (train800val200) and only that run reports test accuracy.

Trials run in parallel processes (``jobs``), each with ``cores // jobs`` threads; their table, resumption and
early stopping are :mod:`snell.train.trials`'. The default early-stop margin (15 points of val accuracy at the same
epoch) only removes hopeless trials: a far too small or large learning rate, a sparsity that kills the update.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snell.train.config import TrainConfig, UserError, check_output_folder, default_lr, first_process
from snell.train.flags import add_train_arguments, config_from_args, method_reads
from snell.train.loop import write_json_atomic
from snell.train.plots import plot_search
from snell.train.trials import EarlyStop, Trial, fingerprint, run_trials, trial_key

TRIALS_FILE = "trials.jsonl"
FINAL_FILE = "final.jsonl"
RESULT_FILE = "search.json"
PLOT_FILE = "val_vs_sparsity.png"


@dataclass(frozen=True)
class Grid:
    """Values to try; None keeps the base config's value. Every combination is one trial.

    ``sparsity`` is SNELL's fixed ratio, and for snella the ratio its allocator ends at (``target_sparsity``).

    ``lr_per_sparsity``: with no lr grid, each sparsity gets the method's default rate at that sparsity (for an
    unset ``--lr``: SNELL at s = 0 has no squared update and wants the dense kernel's rate, not 2e-2)."""

    sparsity: tuple[float, ...] = (0.0, 0.5, 0.9, 0.99)
    lr: tuple[float, ...] | None = None
    r: tuple[int, ...] | None = None
    lr_per_sparsity: bool = False

    def points(self, base: TrainConfig) -> list[dict[str, Any]]:
        """One {"sparsity", "lr", "r"} dict per trial, in grid order (sparsity varies slowest). Sparsity only
        means something to SNELL and SNELLA, and r to them, LoRA and DoRA: other methods get one point per value they
        read, at the base config's others."""
        sparsity = self.sparsity if method_reads(base.method, "sparsity") else (base.sparsity,)
        # None is "not a grid flag"; an empty tuple (`--grid-lr ,`) is a grid with nothing in it, refused below
        ranks = self.r if self.r is not None and method_reads(base.method, "r") else (base.r,)
        values = (sparsity, (base.lr,) if self.lr is None else self.lr, ranks)
        for name, options in zip(("sparsity", "lr", "r"), values, strict=True):
            if not options:
                raise UserError(f"the {name} grid is empty")
            if len(set(options)) != len(options):
                raise UserError(f"the {name} grid repeats a value: {list(options)}")
        points = [{"sparsity": float(s), "lr": float(lr), "r": int(r)} for s, lr, r in itertools.product(*values)]
        if self.lr_per_sparsity and self.lr is None:
            for point in points:
                point["lr"] = default_lr(base.method, base.kernel, base.sparsify_mode, point["sparsity"])
        return points


def trial_config(base: TrainConfig, params: dict[str, Any], **changes: Any) -> TrainConfig:
    """``base`` at a grid point: its sparsity is SNELL's fixed ratio, or snella's target (snella's own sparsity is
    the allocator's start and stays at the base config's)."""
    values = dict(params)
    if base.method == "snella":
        values["target_sparsity"] = values.pop("sparsity")
    return dataclasses.replace(base, **values, **changes)


@dataclass
class SearchResult:
    """What a search found: every trial record, the val-selected winner, and its retrain (if run)."""

    output_dir: Path
    records: list[dict[str, Any]]
    best: dict[str, Any]
    final: dict[str, Any] | None
    plot: Path | None


# ------------------------------------------------------------------------------------------------------
# The search


def expand_grid(
    base: TrainConfig, grid: Grid, output_dir: str | Path, early_stop: EarlyStop | None = EarlyStop()
) -> list[Trial]:
    """The trials of a search: the base config at each grid point, trained on train800 and scored on val200."""
    out = Path(output_dir)
    fp = fingerprint(base)
    trials = []
    for params in grid.points(base):
        key = trial_key(params, base.method)
        config = trial_config(
            base, params, select_on="val", protocol="standard", output_dir=str(out / "trials" / key), progress=False
        )
        trials.append(Trial(key, params, config, out / TRIALS_FILE, fp, early_stop))
    return trials


def select_best(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The finished trial with the highest val accuracy after its last epoch (ties: the earliest in the grid).

    Only validation accuracy is read: search trials have no test accuracy to read.
    """
    finished = [r for r in records if r["status"] == "finished" and not math.isnan(r["val_accuracy"])]
    if not finished:
        raise UserError("no trial finished; loosen or disable early stopping (--early-stop-margin)")
    return max(finished, key=lambda r: r["val_accuracy"])  # max keeps the first of equal values


def final_trial(
    base: TrainConfig,
    best: dict[str, Any],
    output_dir: str | Path,
    seed: int | None = None,
    train_on_val: bool = True,
) -> Trial:
    """The retrain of the winner, evaluated once on test: on train + val (train800val200) after the last epoch,
    or, with ``train_on_val=False``, on the training split alone at the epoch with the best val accuracy (for
    few-shot tasks, where adding the validation examples would change the number of shots)."""
    out = Path(output_dir)
    seed = base.seed if seed is None else seed
    params = dict(best["params"])
    key = f"{trial_key(params, base.method)},seed={seed}"
    # a folder per winner: a rerun with a wider grid may pick another, which must not resume the first one's run
    config = trial_config(
        base,
        params,
        seed=seed,
        select_on="none" if train_on_val else "val",
        protocol="standard",
        output_dir=str(out / "final" / key),
        progress=False,
    )
    return Trial(key, params, config, out / FINAL_FILE, fingerprint(base), final=True)


def search(
    base: TrainConfig,
    grid: Grid,
    output_dir: str | Path | None = None,
    jobs: int = 1,
    early_stop: EarlyStop | None = EarlyStop(),
    retrain: bool = True,
    isolate: bool | None = None,
    verbose: bool = True,
    threads: int | None = None,
) -> SearchResult:
    """Train every grid point on train800, pick the best val accuracy, retrain it on train800val200 and
    report test. Resumable: rerunning with the same arguments skips finished trials (and the retrain).

    ``jobs``, ``isolate`` and ``threads`` are those of :func:`run_trials`; the retrain runs the same way."""
    out = Path(output_dir or base.output_dir or Path("runs") / f"search-{Path(base.data or 'data').stem}-{base.method}")
    check_output_folder(out, "--output-dir")
    trials = expand_grid(base, grid, out, early_stop)
    isolate = jobs > 1 if isolate is None else isolate
    records = run_trials(trials, jobs, isolate, verbose, threads)
    best = select_best(records)
    plot = plot_search(records, out / PLOT_FILE, title=f"snell search: {base.data} / {base.model}")
    if verbose:
        print(f"selected on val: {best['key']} (val {best['val_accuracy']:.4f})", flush=True)
    final = None
    if retrain:
        (final,) = run_trials([final_trial(base, best, out)], 1, isolate, verbose, threads)
    result = SearchResult(out, records, best, final, plot)
    write_json_atomic(
        out / RESULT_FILE,
        {
            "grid": dataclasses.asdict(grid),
            "early_stop": dataclasses.asdict(early_stop) if early_stop else None,
            "selected": best,
            "final": final,
            "trials": records,
            "base_config": base.to_dict(),
        },
    )
    if verbose and final is not None:
        print(f"retrained on train+val: test accuracy {final['test_accuracy']:.4f} ({out / RESULT_FILE})", flush=True)
    return result


# ------------------------------------------------------------------------------------------------------
# Command line


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """`snell search` takes every `snell train` flag (the base config) plus the grid and scheduling flags."""
    add_train_arguments(parser, helps={"output_dir": "search folder (default: runs/search-<data>-<method>)"})
    parser.add_argument(
        "--grid-sparsity",
        type=_floats,
        default=None,
        help="sparsities to try (snella: its target sparsity) [default: 0,0.5,0.9,0.99]",
    )
    parser.add_argument(
        "--grid-lr",
        type=_floats,
        default=None,
        help="learning rates to try [default: --lr; without it, the method's default at each sparsity]",
    )
    parser.add_argument("--grid-r", type=_ints, default=None, help="ranks to try [default: --r]")
    parser.add_argument("--jobs", type=int, default=1, help="trials run at once, each in its own process")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per trial process [default: cores // jobs; 1 is faster on a busy machine]",
    )
    parser.add_argument(
        "--early-stop-margin",
        type=float,
        default=EarlyStop.margin,
        help="stop a trial this far (absolute) below the best finished trial's val accuracy at the "
        "same epoch [default: 0.15]",
    )
    parser.add_argument("--no-early-stop", dest="early_stop", action="store_false", help="run every trial to the end")
    parser.add_argument(
        "--no-retrain",
        dest="retrain",
        action="store_false",
        help="stop after selecting (no retrain on train800val200, no test accuracy)",
    )


def search_from_args(args: argparse.Namespace) -> SearchResult:
    """Run `snell search` from its parsed command line."""
    if args.resume:
        raise UserError("snell search resumes by itself: rerun the same command (without --resume)")
    base = config_from_args(args)
    for name in ("select_on", "protocol"):
        if name in vars(args):
            raise UserError(f"--{name.replace('_', '-')} is set by snell search (val for trials, none for the retrain)")
    grids = {"--grid-sparsity": (args.grid_sparsity, "sparsity"), "--grid-r": (args.grid_r, "r")}
    ignored = [
        flag for flag, (value, name) in grids.items() if value is not None and not method_reads(base.method, name)
    ]
    if ignored and first_process():
        print(f"warning: --method {base.method} does not use {', '.join(ignored)}; ignored", file=sys.stderr)
    sparsity = Grid.sparsity if args.grid_sparsity is None else args.grid_sparsity
    grid = Grid(sparsity, args.grid_lr, args.grid_r, lr_per_sparsity="lr" not in vars(args))
    margin = args.early_stop_margin
    if not (math.isfinite(margin) and margin >= 0):  # a negative margin stops trials that tie the best
        raise UserError(f"--early-stop-margin must be a finite number >= 0, got {margin!r}")
    rule = EarlyStop(margin=margin) if args.early_stop else None
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    isolate = args.jobs > 1 or args.threads is not None
    return search(base, grid, base.output_dir, args.jobs, rule, args.retrain, isolate, threads=args.threads)
