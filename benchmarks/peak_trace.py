"""Where a training step's peak memory happens: RSS and its high-water mark after every block's forward and
backward, for one step after a warm-up step.

    MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=1048576 \\
        .venv/bin/python -m benchmarks.peak_trace --method snell8_s0.9 [--trim]

Run it with the benchmark's pinned malloc (above) to see what ``benchmarks.run`` reports. ``--trim`` calls
glibc's ``malloc_trim(0)`` once the forward ends, and prints how much RSS that returns: freed heap chunks
(allocator slack), not live tensors. The free bytes glibc's heap holds when the forward ends (``mallinfo2``)
are printed either way. Backs the peak-memory findings in benchmarks/README.md; not timed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import re

import torch
from torch import nn

from benchmarks.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from benchmarks.methods import METHODS, MODELS, NUM_CLASSES
from benchmarks.report import positive_int
from benchmarks.step import make_step

MB = 1024 * 1024
Event = tuple[str, str, float, float]  # (phase, module, RSS MB, high-water MB) above the RSS before the step


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def free_heap_mb(libc: ctypes.CDLL) -> float:
    """Bytes in glibc's free heap chunks (mallinfo2's fordblks): memory malloc holds but no tensor uses."""
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().fordblks / MB


def trace_step(model_name: str, method: str, batch: int, trim: bool) -> tuple[list[Event], float, float]:
    """(the events of one step after a warm-up step, the step's peak MB above the RSS before it, MB of free
    heap chunks when that step's forward ends)."""
    torch.manual_seed(0)
    spec = MODELS[model_name]
    model = METHODS[method].build(spec.create()).train()
    images = torch.randn(batch, 3, spec.image_size, spec.image_size)
    labels = torch.randint(NUM_CLASSES, (batch,))
    step = make_step(model, images, labels, "fp32", after_step=METHODS[method].step_hook(model))
    events: list[Event] = []
    start = 0

    def record(phase: str, name: str) -> None:
        events.append((phase, name, (rss_bytes() - start) / MB, (peak_rss_bytes() - start) / MB))

    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in model.named_modules():
        if module is head or re.search(r"(^|\.)blocks\.\d+$", name):
            module.register_forward_hook(lambda m, i, o, name=name: record("forward", name))
            module.register_full_backward_hook(lambda m, gi, go, name=name: record("backward", name))
    libc = ctypes.CDLL("libc.so.6")
    heap_free = [0.0]

    def forward_ended(m: nn.Module, i: tuple, o: torch.Tensor) -> None:
        heap_free[0] = free_heap_mb(libc)
        if trim:
            libc.malloc_trim(0)
            record("after malloc_trim", "")

    head.register_forward_hook(forward_ended)
    step()
    gc.collect()
    events.clear()
    reset_peak_rss()
    start = rss_bytes()
    step()
    return events, (peak_rss_bytes() - start) / MB, heap_free[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="vit_b16")
    parser.add_argument("--method", choices=list(METHODS), required=True)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) when the forward ends")
    args = parser.parse_args()
    events, peak, heap_free = trace_step(args.model, args.method, args.batch, args.trim)
    print(f"{'phase':<18} {'module':<34} {'RSS MB':>8} {'peak MB':>8}")
    for phase, name, rss, high in events:
        print(f"{phase:<18} {name:<34} {rss:8.1f} {high:8.1f}")
    print(f"free heap chunks when the forward ends (glibc mallinfo2): {heap_free:.1f} MB")
    print(f"step peak above the RSS before the step: {peak:.1f} MB")


if __name__ == "__main__":
    main()
