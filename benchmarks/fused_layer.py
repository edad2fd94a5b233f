"""One SNELL layer, forward + backward, on the torch path and on the fused CPU kernels, timed in turns.

Issue 18's per-layer target: an 11008×4096 layer at 256 bf16 tokens, fwd + bwd, within 3× a plain bf16
nn.Linear with a trainable weight. The three variants run in one process, in turns (torch, fused, plain,
then the next round in reverse order), so a slow spell of a shared machine lands on all of them, under the
suite's pinned allocator (the process re-executes itself with it, as ``ab_step`` does); the report gives
each one's median and the median of the per-round ratios. The forward alone (ΔW, τ, merge and the one
GEMM) is timed the same way.

    python -m benchmarks.fused_layer                       # 11008×4096, 256 tokens, bf16, SNELL-8 s=0.9
    python -m benchmarks.fused_layer --tokens 1024 --rank 32 --dtype float32
    python -m benchmarks.fused_layer --sweep 768x3072 2048x2048 4096x4096 --out sweep.json   # fwd + bwd per shape
    python -m benchmarks.fused_layer --kernel mixk --sweep 768x768 3072x768   # SNELLA's kernel, (α, γ, β) trained

``--sweep`` times forward + backward alone for each out×in shape (the other options apply to all), one table
row per shape: where the fused path starts to pay (snell.dispatch's ``_FUSED_FROM``). A shape out×in×kh×kw is a
Conv2d with 'same' padding over images of 28×28 positions, as many as ``--tokens`` positions make (at least one).

    python -m benchmarks.fused_layer --sweep 64x64x3x3 512x128x1x1 --tokens 6272 --dtype float32   # batch 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.report import layer_shape, positive_int, sparsity
from benchmarks.run import TIMED_ENV
from snell import SnellConfig, fused_cpu
from snell.function import FusedSnell
from snell.layers import init_factors
from snell.spec import SnellSpec

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
IMAGE = 28  # a Conv2d's input side in a sweep


Step = Callable[[], None]


def _layer_input(weight_shape: tuple[int, ...], tokens: int, dtype: torch.dtype) -> Tensor:
    """The input of a Linear (tokens, in), or of a Conv2d (tokens / IMAGE² images of IMAGE² positions)."""
    if len(weight_shape) == 2:
        return torch.randn(tokens, weight_shape[1], dtype=dtype, requires_grad=True)
    return torch.randn(max(1, tokens // IMAGE**2), weight_shape[1], IMAGE, IMAGE, dtype=dtype, requires_grad=True)


def _snell_layer(
    weight_shape: tuple[int, ...],
    rank: int,
    tokens: int,
    dtype: torch.dtype,
    sparsity: float,
    kernel: str = "piecewise_linear",
) -> tuple[Step, Step]:
    """(forward + backward, forward alone) of a SNELL Linear (out, in) or Conv2d (out, in, kh, kw; 'same' padding)
    with a frozen W0 and no bias; for mixk its (α, γ, β) train, as in a SNELLA layer (the piecewise coefficients
    stay fixed in both)."""
    m, n = weight_shape[0], math.prod(weight_shape[1:])
    weight = nn.Parameter(torch.randn(weight_shape, dtype=dtype) * 0.02, requires_grad=False)
    a = nn.Parameter(torch.empty(n, rank, dtype=dtype))
    b = nn.Parameter(torch.empty(m, rank, dtype=dtype))
    init_factors(a, b, num_pieces=2)
    coefficients = torch.tensor([0.1, -0.1])
    if kernel == "mixk":  # one (α, γ, β) row per adapter group, at the authors' initial values
        coefficients = nn.Parameter(torch.tensor([[0.1, -0.1, 1.0, 1.0, 0.0]]))
    if len(weight_shape) == 2:
        spec = SnellSpec("linear", weight_shape, kernel, 2, "reference", sparsity)
    else:
        padding = (weight_shape[2] // 2, weight_shape[3] // 2)
        spec = SnellSpec("conv2d", weight_shape, kernel, 2, "reference", sparsity, padding=padding)
    x = _layer_input(weight_shape, tokens, dtype)
    with torch.no_grad():
        grad = torch.randn_like(FusedSnell.apply(x, weight, None, a, b, coefficients, spec))

    def step() -> None:
        x.grad = a.grad = b.grad = coefficients.grad = None  # as optimizer.zero_grad(set_to_none=True) leaves them
        FusedSnell.apply(x, weight, None, a, b, coefficients, spec).backward(grad)

    def forward() -> None:
        with torch.no_grad():
            FusedSnell.apply(x, weight, None, a, b, coefficients, spec)

    return step, forward


def _plain_layer(weight_shape: tuple[int, ...], tokens: int, dtype: torch.dtype) -> tuple[Step, Step]:
    """(forward + backward, forward alone) of a plain Linear or Conv2d with a trainable weight."""
    if len(weight_shape) == 2:
        layer = nn.Linear(weight_shape[1], weight_shape[0], bias=False, dtype=dtype)
    else:
        out, inputs, kh, kw = weight_shape
        layer = nn.Conv2d(inputs, out, (kh, kw), padding=(kh // 2, kw // 2), bias=False, dtype=dtype)
    x = _layer_input(weight_shape, tokens, dtype)
    with torch.no_grad():
        grad = torch.randn_like(layer(x))

    def step() -> None:
        x.grad = layer.weight.grad = None
        layer(x).backward(grad)

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    return step, forward


def _with_kernels(choice: str, fn: Step) -> Step:
    def run() -> None:
        os.environ["SNELL_KERNELS"] = choice
        fn()

    return run


def paired(variants: dict[str, Step], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each variant over ``rounds`` rounds, in turns (every other round reversed)."""
    names = list(variants)
    for name in names:  # warm-up: compiles, allocator
        variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def report(title: str, times: dict[str, list[float]], against: str) -> None:
    """Medians, and the median of the per-round ratios to ``against`` (and fused to torch)."""
    print(f"\n{title}")
    for name, values in times.items():
        ratios = [v / w for v, w in zip(values, times[against], strict=True)]
        print(
            f"  {name:>8}: median {statistics.median(values) * 1e3:8.1f} ms"
            f"  (min {min(values) * 1e3:7.1f})  / {against}: median of rounds {statistics.median(ratios):.3f}"
        )
    speedups = [t / f for t, f in zip(times["torch"], times["fused"], strict=True)]
    print(f"  torch / fused: median of rounds {statistics.median(speedups):.2f}")


def sweep(
    shapes: list[str], tokens: int, rank: int, dtype: torch.dtype, sparsity: float, rounds: int, kernel: str
) -> list[dict]:
    """One row per out×in shape: medians of forward + backward on each path, and the per-round ratios."""
    rows = []
    for shape in shapes:
        weight_shape = tuple(int(side) for side in shape.lower().split("x"))
        if len(weight_shape) not in (2, 4):
            raise SystemExit(f"a --sweep shape is OUTxIN or OUTxINxKHxKW, got {shape!r}")
        m, n = weight_shape[0], math.prod(weight_shape[1:])
        snell_step, _ = _snell_layer(weight_shape, rank, tokens, dtype, sparsity, kernel)
        plain_step, _ = _plain_layer(weight_shape, tokens, dtype)
        steps = {"torch": _with_kernels("torch", snell_step), "fused": _with_kernels("fused", snell_step)}
        times = paired({**steps, "plain": plain_step}, rounds)
        row = {"shape": "x".join(map(str, weight_shape)), "numel": m * n, "tokens": tokens}
        row["dtype"] = str(dtype).removeprefix("torch.")
        row["kernel"], row["rank"] = kernel, rank
        row |= {f"{name}_ms": statistics.median(values) * 1e3 for name, values in times.items()}
        row["torch_over_fused"] = statistics.median(
            [t / f for t, f in zip(times["torch"], times["fused"], strict=True)]
        )
        rows.append(row)
        print(
            f"  {row['shape']:>10} ({m * n / (1 << 20):6.2f} Mi entries): torch {row['torch_ms']:8.1f} ms, "
            f"fused {row['fused_ms']:8.1f} ms, plain {row['plain_ms']:7.1f} ms, "
            f"torch / fused {row['torch_over_fused']:.2f}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-features", type=positive_int, default=11008)
    parser.add_argument("--in-features", type=positive_int, default=4096)
    parser.add_argument("--tokens", type=positive_int, default=256)
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--sparsity", type=sparsity, default=0.9)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--kernel", choices=("piecewise_linear", "mixk"), default="piecewise_linear")
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument(
        "--sweep",
        nargs="+",
        type=layer_shape,
        metavar="OUTxIN",
        help="time fwd + bwd for each of these shapes (OUTxINxKHxKW: a Conv2d)",
    )
    parser.add_argument("--out", help="with --sweep: write the rows as JSON here")
    args = parser.parse_args()
    try:  # the library's own checks: the factors here are built by hand, past get_snell_model's
        SnellConfig(r=args.rank, kernel=args.kernel, sparsity=args.sparsity)
    except ValueError as err:
        parser.error(str(err))
    if any(os.environ.get(name) != value for name, value in TIMED_ENV.items()):
        # the suite's pinned allocator (as ab_step): no method pays page faults for its m×n buffers
        os.execve(
            sys.executable, [sys.executable, "-m", "benchmarks.fused_layer", *sys.argv[1:]], {**os.environ, **TIMED_ENV}
        )
    if not fused_cpu.available():
        raise SystemExit("the fused kernels are unavailable here (is numba installed?)")
    m, n, dtype = args.out_features, args.in_features, DTYPES[args.dtype]
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    print(
        f"{args.sweep or f'{m}×{n}'}, {args.tokens} tokens, {args.dtype}, {args.kernel} r={args.rank} "
        f"s={args.sparsity}, "
        f"{torch.get_num_threads()} threads, load average {load:.2f} at start"
    )
    if args.sweep:
        rows = sweep(args.sweep, args.tokens, args.rank, dtype, args.sparsity, args.rounds, args.kernel)
        print(f"load average {os.getloadavg()[0]:.2f} at end")
        if args.out:
            Path(args.out).write_text(json.dumps({"load_average": [load, os.getloadavg()[0]], "rows": rows}, indent=1))
        return
    snell_step, snell_forward = _snell_layer((m, n), args.rank, args.tokens, dtype, args.sparsity, args.kernel)
    plain_step, plain_forward = _plain_layer((m, n), args.tokens, dtype)
    steps = {
        "torch": _with_kernels("torch", snell_step),
        "fused": _with_kernels("fused", snell_step),
        "plain": plain_step,
    }
    report("forward + backward", paired(steps, args.rounds), "plain")
    forwards = {
        "torch": _with_kernels("torch", snell_forward),
        "fused": _with_kernels("fused", snell_forward),
        "plain": plain_forward,
    }
    report("forward alone", paired(forwards, args.rounds), "plain")
    os.environ.pop("SNELL_KERNELS")
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
