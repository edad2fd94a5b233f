"""The bookkeeping of one run of the check (its tables, its budget, a check as a row) and the device timers."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Run:
    """What one run of the check has done so far: the rows of every table and the parts it skipped."""

    device: str
    smoke: bool
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    checks: list[dict[str, Any]] = field(default_factory=list)
    selection: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    parts: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    kernels: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    save: Callable[[], object] = lambda: None  # rewrites the result files: a killed run keeps what it measured

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def fits(self, name: str, estimate_s: float) -> bool:
        """Whether ``name`` fits in what is left of the budget; records it as skipped if not."""
        if self.smoke or estimate_s <= self.left_s():
            return True
        status = f"skipped: estimated {estimate_s:.0f} s, {max(self.left_s(), 0):.0f} s of the budget left"
        self.parts.append({"part": name, "estimate_s": estimate_s, "wall_s": None, "status": status})
        print(f"[{name}] {status}", flush=True)
        return False


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def once_ms(fn: Callable[[], object], device: str) -> float:
    """Milliseconds of one call: on a GPU between CUDA events recorded before and after it (the device's
    timeline, including any wait for the host to launch kernels), the wall clock elsewhere."""
    if device != "cuda":
        began = time.perf_counter()
        fn()
        return (time.perf_counter() - began) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def timed_ms(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after one warm-up call."""
    fn()
    _synchronize(device)
    return statistics.median(once_ms(fn, device) for _ in range(repeats))


def _record(run: Run, name: str, fn: Callable[[], str | None]) -> None:
    """Run one check; a failure is a FAIL row with its message, never an abort of the whole run."""
    began = time.monotonic()
    try:
        detail = fn() or ""
        status = "n/a" if detail.startswith("n/a") else "PASS"
    except Exception as err:  # every failure becomes a row of the report
        detail, status = f"{type(err).__name__}: {' | '.join(str(err).strip().splitlines()[:4])[:400]}", "FAIL"
    run.checks.append({"check": name, "status": status, "seconds": time.monotonic() - began, "detail": detail})
    print(f"  {status} {name} {detail}", flush=True)
