"""Memory probes for the benchmarks: the kernel's peak-RSS counter and the bytes autograd saves for backward.

Peak RSS comes from the kernel's own high-water mark (VmHWM in /proc/self/status), reset by writing "5" to
/proc/self/clear_refs. Unlike a sampling thread it cannot miss a short spike, and unlike ru_maxrss it can be
reset after the model is loaded, so the peak of the training steps alone is measured.
"""

from __future__ import annotations

import gc
import os
import re
import resource
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import torch
from torch import Tensor

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{field} missing from {_STATUS}: peak-RSS measurement needs Linux procfs")
    return int(match.group(1))


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Highest resident set size since the last :func:`reset_peak_rss` (or process start)."""
    return _status_kib("VmHWM") * 1024


def rss_counter_slack_bytes() -> int:
    """How far VmRSS and VmHWM may be off, either way. Since Linux 6.2 a process's RSS is a per-CPU counter that
    /proc reads without summing the CPUs' pending parts: each CPU holds fewer than ``batch`` = max(32, 2·CPUs) pages,
    so a reading is within batch · CPUs pages of the truth (0.25 MB on 2 CPUs, 32 MB on 64). A peak of a few pages
    above the loaded RSS can therefore read below it; only a peak outside this slack is a measurement."""
    cpus = os.cpu_count() or 1
    return max(32, 2 * cpus) * cpus * resource.getpagesize()


def reset_peak_rss() -> None:
    """Set the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
    _CLEAR_REFS.write_text("5")


class SavedTensorBytes:
    """Counts the bytes autograd keeps for backward while active: each storage once, model state excluded.

    Parameters and buffers are alive anyway, so saving them costs nothing; views of one storage (x and
    x.t(), say) cost it once. Tensors kept by a non-reentrant checkpoint for recomputation are not saved
    through these hooks and are therefore not counted.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._excluded:
            self._storages.setdefault(pointer, storage.nbytes())
        return tensor

    @staticmethod
    def _unpack(tensor: Tensor) -> Tensor:
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._hooks.__exit__(exc_type, exc, traceback)


class StepRun(NamedTuple):
    """What :func:`run_steps` measured."""

    times: list[float]  # seconds of each timed step
    loaded: int  # RSS when the window opened (bytes): the model, its adapters and the batch
    peak: int  # the highest RSS above ``loaded`` over the warm-up and the timed steps (bytes)
    minor_faults: int  # fresh pages the timed steps touched
    system_s: float  # kernel time of the timed steps (page faults are most of it)


def run_steps(step: Callable[[], object], warmup: int, steps: int) -> StepRun:
    """``warmup`` untimed then ``steps`` timed calls of ``step``, inside one peak-RSS window that opens after a
    garbage collection, so it holds what training adds (gradients, optimizer state, activations, allocator
    slack); the warm-up, which allocates the optimizer state, is inside the window but not timed."""
    gc.collect()
    reset_peak_rss()
    # read after the reset: read before it, RSS that fell in between (a thread pool's or the allocator's release) put
    # the mark below the loaded RSS, and the peak above it came out negative (-0.04 MB in one CI run)
    loaded = rss_bytes()
    for _ in range(warmup):
        step()
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    peak = peak_rss_bytes() - loaded
    return StepRun(times, loaded, peak, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime)
