"""Several methods' training steps timed in turns, each in fresh processes, and judged against ratio targets.

A 2-core machine shared with other work drifts by tens of percent within minutes, so a ratio of two steps timed
far apart says little. Here every method runs once per round, in reverse order every other round (a slow spell
lands on every method), and each target is judged on the median over rounds of that round's ratio. The peak RSS is
measured once, in the first round, by a worker of its own (:func:`measure`).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.report import Target


@dataclass(frozen=True)
class RatioTarget:
    """``method``'s step and peak over ``against``'s, each within its limit (None: that ratio has no target)."""

    method: str
    against: str
    step_limit: float | None = None
    peak_limit: float | None = None


def measure(module: str, args: list[str], warmup: int, steps: int, timeout: float) -> tuple[dict | None, str]:
    """One worker of ``module`` timed under the suite's pinned allocator and one for memory under its 1 MiB mmap
    threshold (freed blocks go back to the OS, so the peak follows live memory), each in its own process: the timed
    row with the memory worker's peak (and saved bytes, if it counts them), or None and why."""
    from benchmarks.run import MEMORY_ENV, TIMED_ENV, run_worker  # not in the workers, which import this module

    timed, status = run_worker(module, [*args, "--warmup", str(warmup), "--steps", str(steps)], timeout, TIMED_ENV)
    if timed is None:  # no row either way: do not spend up to another timeout on its memory
        return None, status
    memory, memory_status = run_worker(module, [*args, "--warmup", "1", "--steps", "1"], timeout, MEMORY_ENV)
    if memory is None:
        return None, f"{status}, memory worker {memory_status}"
    return {**timed, **{key: memory[key] for key in ("peak_mb", "saved_mb") if key in memory}}, "ok"


def _verdicts(rows: dict[str, dict], target: RatioTarget) -> str | None:
    """The target's line, or None when this run did not time both methods in every round."""
    mine, theirs = rows.get(target.method), rows.get(target.against)
    if mine is None or theirs is None or None in mine["round_steps"] + theirs["round_steps"]:
        return None
    pairs = zip(mine["round_steps"], theirs["round_steps"], strict=True)
    step = statistics.median(a / b for a, b in pairs)
    peak = None if mine["peak_mb"] is None or not theirs["peak_mb"] else mine["peak_mb"] / theirs["peak_mb"]
    parts = []
    for column, value, limit in (("step", step, target.step_limit), ("peak", peak, target.peak_limit)):
        if value is None:
            parts.append(f"{column} n/a")
        elif limit is not None:
            judged = Target(f"{column}: {target.method} / {target.against}", value, limit)
            shown = judged.show(lambda v, digits: f"{v:.{digits}f}")
            parts.append(f"{column} {shown} (target <= {limit}: {judged.verdict})")
        else:
            parts.append(f"{column} {value:.3f}")
    return f"{target.method} / {target.against}: {', '.join(parts)}"


def drive_in_turns(
    module: str,
    setting: str,
    methods: Sequence[str],
    worker_args: Sequence[str],
    warmup: int,
    steps: int,
    timeout: float,
    rounds: int,
    targets: Sequence[RatioTarget],
) -> list[dict]:
    """Every method's ``module --worker --method M *worker_args`` ``rounds`` times in turns; prints ``setting`` and
    the load average, each row, each method's median step and peak, then every target's ratios and verdicts, and the
    load average at the end. Returns a row per method timed, with its ``round_steps`` (None for a round it failed)
    and their median as ``step_s``; ``peak_mb`` is None when the method's first round, the one that measures it,
    failed."""
    from benchmarks.run import TIMED_ENV, run_worker

    print(f"{setting}, load average {os.getloadavg()[0]:.2f} at start")
    rows: dict[str, dict] = {}
    for round_index in range(rounds):
        for method in methods if round_index % 2 == 0 else reversed(methods):
            args = ["--worker", "--method", method, *worker_args]
            if round_index == 0:
                row, status = measure(module, args, warmup, steps, timeout)
            else:
                timed_args = [*args, "--warmup", str(warmup), "--steps", str(steps)]
                row, status = run_worker(module, timed_args, timeout, TIMED_ENV)
            if row is None:
                print(f"{method}, round {round_index + 1}: {status}")
                continue
            if round_index > 0 and method not in rows:  # its round 1 failed: no memory worker measured its peak
                row = {**row, "peak_mb": None}  # the timed worker's runs under the pinned allocator
            # Indexed by round, None where the round failed: a ratio pairs steps of the same round only.
            rows.setdefault(method, {**row, "round_steps": [None] * rounds})["round_steps"][round_index] = row["step_s"]
            times = ", ".join(f"{t:.2f}" for t in row["step_times"])
            print(f"{method:>8}, round {round_index + 1}: step {row['step_s']:.2f} s ({times})", flush=True)
    for method, row in rows.items():
        row["step_s"] = statistics.median(step for step in row["round_steps"] if step is not None)
        peak = "not measured" if row["peak_mb"] is None else f"{row['peak_mb']:.0f} MB"
        print(f"{method:>8}: step {row['step_s']:.2f} s, peak above the loaded model {peak}")
    for target in targets:
        line = _verdicts(rows, target)
        if line is not None:
            print(line)
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return list(rows.values())
