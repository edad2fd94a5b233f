"""One prepared check of SNELL on a CUDA device: correctness first, then selection, speed and memory.

    PYTHONPATH=src python -m benchmarks.gpu                  # on a GPU machine: benchmarks/results/gpu/
    PYTHONPATH=src python -m benchmarks.gpu --budget-s 300   # skips the parts that do not fit, and lists them
    PYTHONPATH=src python -m benchmarks.gpu --smoke          # tiny sizes on the CPU, into a temp folder

Needs only torch, timm, transformers, peft, accelerate and safetensors (no pytest, no matplotlib, no network).
Parts run in this order, each only if its estimated time still fits in ``--budget-s``: the fused function
against the naive formulas (tests/checks.py, the test suite's own checks) for every kernel and mode in fp32
and under bf16 autocast, kept counts, merge/unmerge, save/load and dropout; no host synchronisation in a
training step; torch.compile graph breaks; the exact k-th-largest selection against torch's and one GEMM;
one SNELL layer per ΔW row-block size; the Triton kernels (SNELL_KERNELS=fused): the same checks, no host sync,
and one layer timed against the torch path (LLaMA's at r = 8 and at r = 32); then training steps (each model ×
method in its own process, memory reset per configuration) on ViT-B/16, LLaMA-2-7B-shaped layers, ViT-L/16 and
ViT-H/14. The estimates are guesses for an H200 until a run records each part's wall time (parts.csv).
"""

# The docstring above is also the command line's --help. One concept per module: run.py (Run, the budget, a check
# as a row, the device timers), correctness.py (the correctness, sync and compile parts), selection.py (the
# selection and blocks parts), triton_check.py (the Triton path's checks and timings), training.py (the training
# workers and parts), results.py (targets, verdicts, environment, result files), cli.py (the parts in order: main),
# __main__.py (python -m benchmarks.gpu).

from benchmarks.gpu.cli import DEFAULT_BUDGET_S, FULL_OUT, PARTS, main
from benchmarks.gpu.results import environment, measured_table_row, selection_verdicts, targets, write_results
from benchmarks.gpu.run import Run, once_ms, timed_ms
from benchmarks.gpu.selection import fastest_exact, layer_rows, sampled_bracket, selection_rows
from benchmarks.gpu.training import VIT_METHODS, TrainPart, _run_worker, run_train_part, train_parts, train_worker
from benchmarks.gpu.triton_check import triton_min_numel

__all__ = [
    "DEFAULT_BUDGET_S",
    "FULL_OUT",
    "PARTS",
    "VIT_METHODS",
    "Run",
    "TrainPart",
    "_run_worker",
    "environment",
    "fastest_exact",
    "layer_rows",
    "main",
    "measured_table_row",
    "once_ms",
    "run_train_part",
    "sampled_bracket",
    "selection_rows",
    "selection_verdicts",
    "targets",
    "timed_ms",
    "train_parts",
    "train_worker",
    "triton_min_numel",
    "write_results",
]
