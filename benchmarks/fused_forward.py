"""The fused CPU forward's τ and merged weight: two passes over ΔW (``select_tau``, then ``merge``) against one
(``merge_selected``, the reference and mask modes), per shape and rank, in turns in one process.

Both must give the same τ and the same merged matrix bit for bit; each row says so. The factors have the library's
initialisation (``init_factors``), so |ΔW| has the distribution the selection meets at the start of training.

    python -m benchmarks.fused_forward                                    # SmolLM2's, ViT-B's and LLaMA's matrices
    python -m benchmarks.fused_forward --shapes 1536x576 --ranks 8 32 --dtype bfloat16 --out forward.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from torch import nn

from benchmarks.fused_layer import paired
from benchmarks.report import matrix_shape, positive_int, sparsity
from snell import SnellConfig, fused_cpu
from snell.layers import init_factors

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SHAPES = ("192x576", "576x576", "1536x576", "768x768", "3072x768", "4096x4096", "11008x4096")


def compare(m: int, n: int, rank: int, dtype: torch.dtype, mode: str, sparsity: float, rounds: int) -> dict:
    """Median ms of each way over ``rounds`` rounds in turns (every other round reversed), and whether they agree."""
    a, b = nn.Parameter(torch.empty(n, rank)), nn.Parameter(torch.empty(m, rank))
    init_factors(a, b, num_pieces=2)
    coef = torch.tensor([0.1, -0.1])
    base = (torch.randn(m, n) * 0.02).to(dtype)
    outputs = {"two passes": torch.empty(m, n, dtype=dtype), "one pass": torch.empty(m, n, dtype=dtype)}
    taus = {}

    def two_passes() -> None:
        taus["two passes"], _ = fused_cpu.select_tau(a, b, coef, 2, sparsity)
        fused_cpu.merge(a, b, coef, 2, taus["two passes"], mode, sparsity, base, dtype, outputs["two passes"])

    def one_pass() -> None:
        _, taus["one pass"] = fused_cpu.merge_selected(a, b, coef, 2, mode, sparsity, base, dtype, outputs["one pass"])

    times = paired({"two passes": two_passes, "one pass": one_pass}, rounds)
    same = taus["two passes"] == taus["one pass"] and torch.equal(
        *(out.view(torch.int16 if dtype == torch.bfloat16 else torch.int32) for out in outputs.values())
    )
    row = {"shape": f"{m}x{n}", "rank": rank, "dtype": str(dtype).removeprefix("torch."), "mode": mode}
    row |= {f"{name.replace(' ', '_')}_ms": statistics.median(t) * 1e3 for name, t in times.items()}
    row["speedup"] = statistics.median(t / o for t, o in zip(times["two passes"], times["one pass"], strict=True))
    row["identical"] = same
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=matrix_shape, default=list(SHAPES), metavar="OUTxIN")
    parser.add_argument("--ranks", nargs="+", type=positive_int, default=[8, 32])
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--mode", choices=("reference", "mask"), default="reference")
    parser.add_argument("--sparsity", type=sparsity, default=0.9)
    parser.add_argument("--rounds", type=positive_int, default=9)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    for rank in args.ranks:  # the library's own checks: the factors here are built by hand
        try:
            SnellConfig(r=rank, sparsity=args.sparsity)
        except ValueError as err:
            parser.error(str(err))
    if not fused_cpu.available():
        raise SystemExit("the fused kernels are unavailable here (is numba installed?)")
    torch.manual_seed(0)
    print(
        f"{args.dtype}, {args.mode} mode, s={args.sparsity}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    rows = []
    for shape in args.shapes:
        m, n = (int(side) for side in shape.lower().split("x"))
        for rank in args.ranks:
            row = compare(m, n, rank, DTYPES[args.dtype], args.mode, args.sparsity, args.rounds)
            rows.append(row)
            print(
                f"  {row['shape']:>10} r={rank:<3} select_tau + merge {row['two_passes_ms']:8.2f} ms, merge_selected "
                f"{row['one_pass_ms']:8.2f} ms, {row['speedup']:.2f}x, identical: {row['identical']}",
                flush=True,
            )
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
