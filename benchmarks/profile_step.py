"""Where a training step's time goes: torch.profiler over one step, after warm-up, as a table of ops.

    .venv/bin/python -m benchmarks.profile_step --method snell8_s0.9 [--model vit_b16] [--rows 25] [--by-shape]

``--by-shape`` splits every op by its input shapes: which GEMM of which layer, which m×n block pass.

Backs the profile findings in the benchmark report; not part of the timed suite.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.methods import METHODS, MODELS, NUM_CLASSES
from benchmarks.step import DTYPES, make_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="vit_b16")
    parser.add_argument("--method", choices=list(METHODS), required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--sort", default="self_cpu_time_total", help="profiler table sort key")
    parser.add_argument("--by-shape", action="store_true", help="one row per (op, input shapes)")
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = MODELS[args.model]
    model = METHODS[args.method].build(spec.create()).train()
    images = torch.randn(args.batch, 3, spec.image_size, spec.image_size)
    labels = torch.randint(NUM_CLASSES, (args.batch,))
    step = make_step(model, images, labels, args.dtype, after_step=METHODS[args.method].step_hook(model))
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=args.by_shape) as prof:
        step()
    table = prof.key_averages(group_by_input_shape=args.by_shape).table(
        sort_by=args.sort, row_limit=args.rows, max_name_column_width=60, max_shapes_column_width=60
    )
    print(table)


if __name__ == "__main__":
    main()
