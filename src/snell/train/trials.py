"""The trials of a search: each one a training run scored on validation data, recorded as one line of a table.

Each finished trial is appended as one JSON line to its table (``trials.jsonl``) by the process that ran it, so
killing a search loses at most the trials in flight, and a rerun skips every trial already in the table (a trial
killed half-way resumes from its last epoch checkpoint). A table holds one search: its records carry the options
that must be equal across its trials (hashed as a fingerprint), and a search with other options is refused.

Early stopping: at each validation evaluation from epoch ``after_epoch`` on, a trial stops when its val accuracy
is more than ``margin`` (absolute) below the best val accuracy that any *finished* trial of the same table had at
the same epoch. Stopped trials are recorded (status "stopped") and never win.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from snell.train.checkpoint import CHECKPOINTS, Progress
from snell.train.classification import ClassificationRun
from snell.train.config import TrainConfig, UserError, option_changes
from snell.train.loop import METRICS_FILE, Report

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
