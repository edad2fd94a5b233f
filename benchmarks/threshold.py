"""Threshold micro-benchmark: our top-k selection against torch's, and against one dense GEMM of the matrix.

The matrices are real piecewise-linear ΔW (random factors, the library's initialisation), so the value
distribution is the one the selection meets in training. The GEMM is the layer's forward on a 2048-token
batch: the cost the selection should stay small against.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.report import matrix_shape, positive_int
from snell import sparsify
from snell.kernels import kernel_delta
from snell.layers import init_factors

SPARSITY = 0.9
TOKENS = 2048
SHAPES = ((768, 768), (3072, 768), (4096, 4096), (11008, 4096))


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def piecewise_delta(m: int, n: int, r: int = 8, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """A (1, m, n) piecewise-linear ΔW from freshly initialised factors (drawn on the CPU, the same on every
    device), built on ``device``."""
    torch.manual_seed(seed)
    a, b = torch.empty(n, r), torch.empty(m, r)
    init_factors(a, b, num_pieces=2)
    coefficients = torch.tensor([0.1, -0.1], device=device)
    return kernel_delta("piecewise_linear", a.to(device), b.to(device), coefficients, 2).unsqueeze(0)


def quantile_call(magnitude: torch.Tensor) -> Callable[[], object] | str:
    """torch.quantile at SPARSITY as a call to time, or why this torch refuses the input (first line)."""
    try:
        torch.quantile(magnitude, SPARSITY)
    except RuntimeError as err:
        return f"refused: {str(err).splitlines()[0][:80]}"
    return lambda: torch.quantile(magnitude, SPARSITY)


def benchmark_shape(m: int, n: int, repeats: int) -> list[dict[str, Any]]:
    """One row per selection method for an (m, n) matrix, each with its time relative to the GEMM."""
    delta = piecewise_delta(m, n)
    magnitude = delta.abs().flatten()
    k = sparsify.keep_count(magnitude.numel(), SPARSITY)
    x = torch.randn(TOKENS, n)
    gemm = timed(lambda: F.linear(x, delta[0]), repeats)
    ours = sparsify.threshold(delta, SPARSITY).flatten()
    exact = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
    candidates: dict[str, Callable[[], object] | str] = {
        "snell threshold (τ of |ΔW| from ΔW)": lambda: sparsify.threshold(delta, SPARSITY),
        "snell kth_largest (selection only)": lambda: sparsify.kth_largest(magnitude[None], k),
        "torch.kthvalue": lambda: torch.kthvalue(magnitude, magnitude.numel() - k + 1),
        "torch.topk (unsorted)": lambda: torch.topk(magnitude, k, sorted=False),
        "torch.quantile": quantile_call(magnitude),
    }
    rows = []
    for name, fn in candidates.items():
        row: dict[str, Any] = {"shape": f"{m}x{n}", "numel": m * n, "method": name, "gemm_s": gemm}
        if isinstance(fn, str):
            row.update(seconds=None, ratio_to_gemm=None, note=fn)
        else:
            seconds = timed(fn, repeats)
            row.update(seconds=seconds, ratio_to_gemm=seconds / gemm, note="")
        rows.append(row)
    rows[0]["note"] = "exact" if torch.equal(ours, exact.reshape(1)) else "DIFFERS from torch.kthvalue"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--shapes", nargs="+", type=matrix_shape, default=[f"{m}x{n}" for m, n in SHAPES], help="MxN, ..."
    )
    parser.add_argument("--repeats", type=positive_int, default=5)
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        m, n = (int(v) for v in shape.split("x"))
        rows.extend(benchmark_shape(m, n, args.repeats))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
