"""`snell search`: choose SNELL's sparsity (and learning rate, rank) on validation data only.

The best s differs per task (the reference scripts use anything from 0 to 0.995), and the reference code
picked it on the test set. Here every grid point trains on the training part (VTAB's train800) and is scored
on the validation part (val200) after its last epoch; search trials never evaluate the test set. The winner
is then retrained once on train + val (train800val200) and only that run reports test accuracy.

Trials run in parallel processes (``jobs``), each with ``cores // jobs`` threads. Each finished trial is
appended as one JSON line to ``trials.jsonl`` by the process that ran it, so killing a search loses at most
the trials in flight, and a rerun of the same command skips every trial already in the table (a trial
killed half-way resumes from its last epoch checkpoint).

Early stopping: at each validation evaluation from epoch ``after_epoch`` on, a trial stops when its val
accuracy is more than ``margin`` (absolute, default 0.15 = 15 points) below the best val accuracy that any
*finished* trial of the same search had at the same epoch. Comparing at the same epoch accounts for the
learning curve; the wide margin only removes trials that are hopeless (a far too small or large learning
rate, a sparsity that kills the update). Stopped trials are recorded (status "stopped") and never win.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from snell.train.checkpoint import CHECKPOINTS, Progress
from snell.train.classification import ClassificationRun
from snell.train.config import TrainConfig, UserError, check_output_folder, default_lr, first_process, option_changes
from snell.train.flags import add_train_arguments, config_from_args, method_reads
from snell.train.loop import METRICS_FILE, Report, write_json_atomic
from snell.train.plots import plot_search

TRIALS_FILE = "trials.jsonl"
FINAL_FILE = "final.jsonl"
RESULT_FILE = "search.json"
PLOT_FILE = "val_vs_sparsity.png"
#: Options that differ between the trials of one search, or do not change results.
_NOT_IN_FINGERPRINT = (
    "sparsity",
    "target_sparsity",
    "lr",
    "r",
    "output_dir",
    "progress",
    "num_workers",
    "select_on",
    "protocol",
)


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
                point["lr"] = default_lr(base.method, base.sparsify_mode, point["sparsity"])
        return points


def trial_config(base: TrainConfig, params: dict[str, Any], **changes: Any) -> TrainConfig:
    """``base`` at a grid point: its sparsity is SNELL's fixed ratio, or snella's target (snella's own sparsity is
    the allocator's start and stays at the base config's)."""
    values = dict(params)
    if base.method == "snella":
        values["target_sparsity"] = values.pop("sparsity")
    return dataclasses.replace(base, **values, **changes)


@dataclass(frozen=True)
class EarlyStop:
    """Stop a trial whose val accuracy at epoch e (e >= after_epoch) is more than ``margin`` below the best
    val accuracy of any finished trial at epoch e."""

    margin: float = 0.15
    after_epoch: int = 1

    def should_stop(self, epoch: int, val_acc: float, finished_curves: list[dict[int, float]]) -> bool:
        if epoch < self.after_epoch:
            return False
        reference = [curve[epoch] for curve in finished_curves if epoch in curve]
        return bool(reference) and val_acc < max(reference) - self.margin


@dataclass
class Trial:
    """One training run of a search: its grid point, its config and the table its record goes to."""

    key: str
    params: dict[str, Any]
    config: TrainConfig
    table: Path
    fingerprint: str
    early_stop: EarlyStop | None = None
    final: bool = False  # a final run: trained to the end and evaluated on test


@dataclass
class SearchResult:
    """What a search found: every trial record, the val-selected winner, and its retrain (if run)."""

    output_dir: Path
    records: list[dict[str, Any]]
    best: dict[str, Any]
    final: dict[str, Any] | None
    plot: Path | None


class TrialStopped(Exception):
    """Raised inside a trial's training when the early-stop rule fires."""


# ------------------------------------------------------------------------------------------------------
# The results table


def fingerprint_options(config: TrainConfig) -> dict[str, Any]:
    """Everything that must be equal across the trials of one search, as far as it differs from the defaults.

    Options at their default value are left out: an option that a later snell adds (at a default that keeps the old
    behaviour) then leaves the fingerprint alone, and a search's table stays resumable after an upgrade.
    """
    defaults = TrainConfig().to_dict()
    changed = {k: v for k, v in config.to_dict().items() if k not in defaults or v != defaults[k]}
    return {k: v for k, v in changed.items() if k not in _NOT_IN_FINGERPRINT}


def fingerprint(config: TrainConfig) -> str:
    """A short hash of :func:`fingerprint_options`, which each record of a table carries."""
    values = fingerprint_options(config)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def trial_key(params: dict[str, Any], method: str = "snell") -> str:
    """A readable, file-name-safe identifier of a grid point: "s=0.9,lr=0.003,r=8" for SNELL, "target=0.8,lr=0.02,r=8"
    for snella, "lr=0.001,r=8" for the others."""
    sparsity = {"snell": f"s={params['sparsity']:g},", "snella": f"target={params['sparsity']:g},"}.get(method, "")
    return f"{sparsity}lr={params['lr']:g},r={params['r']}"


def append_record(table: Path, record: dict[str, Any]) -> None:
    """Append one JSON line under an exclusive lock and fsync it, so concurrent trials never interleave
    and a finished trial survives a crash right after."""
    table.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(table, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"  # a writer killed mid-line
        os.write(fd, (("\n" if torn else "") + json.dumps(record, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_table(table: Path) -> list[dict[str, Any]]:
    """The complete records of a table; a line torn by a kill is skipped (its trial simply reruns)."""
    if not table.is_file():
        return []
    records = []
    for line in table.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "key" in record:
            records.append(record)
    return records


def _completed(table: Path, fp: str, options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The records of ``table``, refused when it holds a search with other options than ``options`` (hashed:
    ``fp``), which are named where its records carry theirs."""
    records = read_table(table)
    other = next((r for r in records if r.get("fingerprint") != fp), None)
    if other is not None:
        changes = option_changes(other["options"], options) if isinstance(other.get("options"), dict) else ""
        raise UserError(
            f"{table} holds trials of a search with other options ("
            f"{changes or 'fingerprint ' + str(other.get('fingerprint')) + ' vs ' + fp}); "
            "use another output folder, or the same options to resume it"
        )
    return {r["key"]: r for r in records}


# ------------------------------------------------------------------------------------------------------
# Running one trial


def _metrics(out: Path) -> list[dict[str, Any]]:
    path = out / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class _ValOnly:
    """Mixed in front of a run class (classification or causal LM): the run is scored on val only, never
    evaluates test, and may stop early."""

    def __init__(self, trial: Trial):
        super().__init__(trial.config, resume=True)  # resume: a trial killed half-way continues
        self.trial = trial
        self.stopped_at: tuple[int, float] | None = None

    def _keep_if_best(self, progress: Progress, score: float, epoch: int, weights: str) -> None:
        """The run's own selection, then the early-stop rule on the score of the weights a trial is ranked by
        (:func:`_scored_weights`): with --ema-decay a bad raw score must not stop a trial whose average is good."""
        super()._keep_if_best(progress, score, epoch, weights)
        rule = self.trial.early_stop
        if rule is None or weights != _scored_weights(self.trial.config):
            return
        finished = [
            {int(e): a for e, a in r["val_curve"].items()}
            for r in read_table(self.trial.table)
            if r["status"] == "finished" and r["key"] != self.trial.key
        ]
        if rule.should_stop(epoch + 1, score, finished):
            self.stopped_at = (epoch + 1, score)
            raise TrialStopped(f"{self.trial.key}: val {score:.4f} at epoch {epoch + 1}")

    def _report(self, progress: Progress, eval_split: str | None) -> Report:
        kind = "search trial: scored on val only, test not evaluated"
        fields = {"test_accuracy": math.nan, "accuracy_kind": kind, f"best_{eval_split}_accuracy": progress.best_score}
        return Report(fields, f"{kind} (best val {progress.best_score:.4f})", {})


def _run_class(config: TrainConfig, val_only: bool) -> type:
    """The run class for ``config``'s model (a causal LM's or a classifier's), as a search trial if ``val_only``."""
    from snell.train.causal_lm import is_causal_lm

    if is_causal_lm(config.model):
        from snell.train.causal_lm.run import CausalLMRun

        kind: type = CausalLMRun
    else:
        kind = ClassificationRun
    return type(f"Search{kind.__name__}", (_ValOnly, kind), {}) if val_only else kind


def _scored_weights(config: TrainConfig) -> str:
    """The weights a trial is ranked by: those the winner's retrain ends with (it has no evaluations to choose by),
    the weight average under --ema-decay ("ema"), else the model's own ("model")."""
    return "ema" if config.ema_decay is not None else "model"


def _val_score_curve(out: Path, weights: str = "model") -> dict[int, float]:
    """Val score per epoch of ``weights`` (:func:`_scored_weights`): accuracy, or 1/perplexity for causal-LM data
    without answers (the runs' own score)."""
    prefix = "ema_" if weights == "ema" else ""
    curve = {}
    for m in _metrics(out):
        if f"{prefix}val_acc" in m:
            curve[int(m["epoch"])] = float(m[f"{prefix}val_acc"])
        elif f"{prefix}val_loss" in m:
            curve[int(m["epoch"])] = math.exp(-float(m[f"{prefix}val_loss"]))
    return curve


def train_trial(trial: Trial) -> dict[str, Any]:
    """Train one trial and return its record (search trials: val only; final runs: test as well)."""
    started = time.time()
    record: dict[str, Any] = {
        "key": trial.key,
        "params": trial.params,
        "fingerprint": trial.fingerprint,
        "options": fingerprint_options(trial.config),
    }
    if not trial.final:
        run = _run_class(trial.config, val_only=True)(trial)
        try:
            summary = run.fit()
            record["status"] = "finished"
        except TrialStopped:
            summary = None
            record["status"] = "stopped"
        curve = _val_score_curve(run.out, _scored_weights(trial.config))
        if run.stopped_at is not None:
            curve[run.stopped_at[0]] = run.stopped_at[1]
        last = max(curve) if curve else 0
        record.update(val_curve={str(e): a for e, a in sorted(curve.items())}, val_accuracy=curve.get(last, math.nan))
        record["epochs_trained"] = last
    else:
        run = _run_class(trial.config, val_only=False)(trial.config, resume=True)
        summary = run.fit()
        record.update(
            status="finished", test_accuracy=summary["test_accuracy"], selected_epoch=summary["selected_epoch"]
        )
    record.update(trainable_params=run.trainable, total_params=run.total, threads=torch.get_num_threads())
    if summary is not None:
        for name in ("peak_memory_mb", "peak_memory_kind", "memory_after_model_load_mb", "train_time_s"):
            record[name] = summary[name]
    record.update(wall_time_s=time.time() - started, output_dir=str(run.out), split_sizes=run.task.sizes)
    shutil.rmtree(run.out / CHECKPOINTS, ignore_errors=True)  # the record and the adapter are what is kept
    return record


def run_trial(trial: Trial, threads: int | None = None) -> dict[str, Any]:
    """Run a trial (in a worker process or in-process) and append its record to its table."""
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(trial.config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if threads is not None:  # a worker process: its output goes to the trial's log, not the shared console
        with open(out / "log.txt", "a") as log, redirect_stdout(log), redirect_stderr(log):
            record = train_trial(trial)
    else:
        record = train_trial(trial)
    append_record(trial.table, record)
    return record


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _describe(trial: Trial, record: dict[str, Any]) -> str:
    if trial.final:
        score = f"test {record['test_accuracy']:.4f}"
    else:
        score = f"val {record['val_accuracy']:.4f} after epoch {record['epochs_trained']}"
    where = "/".join(trial.table.parent.parts[-2:])
    return f"{where} {record['key']}: {score} ({record['status']}, {record['wall_time_s']:.0f} s)"


def run_trials(
    trials: list[Trial],
    jobs: int = 1,
    isolate: bool | None = None,
    verbose: bool = True,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Run every trial not yet in its table and return all records, in the order of ``trials``.

    ``isolate`` (default: ``jobs > 1``) runs each trial in a fresh process (forkserver, one trial per
    process), so that its peak memory is its own; ``jobs`` such processes run at once, each with ``threads``
    threads (default ``cores // jobs``; on a machine shared with other jobs, 1 is often much faster, as
    OpenMP threads that wait for a busy core spin). Without isolation trials run one after another in this
    process, with its thread setting.
    """
    if jobs < 1:
        raise UserError(f"jobs must be >= 1, got {jobs}")
    keys = [(t.table, t.key) for t in trials]
    if len(set(keys)) != len(keys):
        raise UserError("two trials share a table and a key")
    done: dict[tuple[Path, str], dict[str, Any]] = {}
    for table in {t.table for t in trials}:
        fps = {t.fingerprint for t in trials if t.table == table}
        if len(fps) > 1:
            raise UserError(f"trials with different base options share the table {table}")
        options = fingerprint_options(next(t for t in trials if t.table == table).config)
        done.update({(table, k): r for k, r in _completed(table, fps.pop(), options).items()})
    pending = [t for t in trials if (t.table, t.key) not in done]
    if verbose and len(pending) < len(trials):
        print(f"skipping {len(trials) - len(pending)} trial(s) already in their tables", flush=True)
    finished = 0

    def report(trial: Trial, record: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        if verbose:
            print(f"[{finished}/{len(pending)}] {_describe(trial, record)}", flush=True)

    if isolate is None:
        isolate = jobs > 1
    if not isolate:
        for trial in pending:
            record = run_trial(trial)
            done[(trial.table, trial.key)] = record
            report(trial, record)
    elif pending:
        threads = threads or max(1, available_cores() // jobs)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["snell.train.loop"])
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
            futures = {pool.submit(run_trial, trial, threads): trial for trial in pending}
            for future in as_completed(futures):
                trial = futures[future]
                record = future.result()
                done[(trial.table, trial.key)] = record
                report(trial, record)
    return [done[key] for key in keys]


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
