"""Which implementation builds, selects and differentiates ΔW for a layer: the one place that decides.

Three implementations share one interface (``merged_and_tau`` for forward, ``backward`` given what the forward
selected: τ, (G, 1, 1), with mixk's column statistics after it on the fused paths): the torch path
(torch_path.py, every device, kernel, mode and dtype), the fused CPU kernels (fused_cpu_path.py, numba) and
the fused Triton kernels (triton_path.py, CUDA). A fused path is the default only where it was measured
faster than the torch path; ``SNELL_KERNELS`` overrides the choice.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from snell import fused_cpu, fused_cpu_path, torch_path
from snell.spec import SnellSpec

CHOICES = ("auto", "torch", "fused", "triton")
_FUSED_DTYPES = (torch.float32, torch.bfloat16)
# Where the fused CPU path is the default: (fewest entries per matrix, widest piece r / P) rows, any of which
# may match. Only where it was measured faster than the torch path (benchmarks/results/fused_cpu/results.md,
# fwd + bwd of one layer, paired in one process; the last sweep after the forward's one-pass selection and merge
# and the banded selection on small matrices). Every shape measured, r = 8, 16 and 32 (widths 4 to 16): Linear
# 1.13-1.53× from 16 Ki entries (64×256, 128×128) through SmolLM2's matrices (192×576 1.47-1.53×, 576×576
# 1.21-1.25×), 1.06-1.20× at ViT-B's fp32 ones; Conv2d 0.99-1.10× from 16 Ki (the convolution dominates); mixk
# 1.08-1.17×. Wider pieces were not measured.
_FUSED_FROM: tuple[tuple[int, int], ...] = ((1 << 14, 16),)


# The Triton kernels are not the default on CUDA until a GPU has measured them faster than the torch path:
# `python -m benchmarks.gpu` times both per layer and prints the bound its numbers support. None: never by
# default; SNELL_KERNELS=fused takes them wherever they apply.
_TRITON_MIN_NUMEL: int | None = None


def kernel_path(spec: SnellSpec, device: torch.device, rank: int, *dtypes: torch.dtype) -> str:
    """ "torch", "fused_cpu" or "triton": which implementation builds, selects and differentiates ΔW here.

    ``rank``: r of the factors; ``dtypes``: those of x, the factors and W0 (whichever exist). Both fused
    paths cover the piecewise-linear kernel and mixk, with one sparsity for every adapter group or one each (set
    by the allocator). The CPU one takes float32/bf16 tensors whose weight is a row-major (m, n) matrix (Linear,
    Conv2d), where a row of ``_FUSED_FROM`` allows the matrix's entries and the columns per piece; the Triton one
    what ``triton_path.supports`` accepts, on CUDA from ``_TRITON_MIN_NUMEL``. ``SNELL_KERNELS``: ``torch`` forces
    the torch path; ``fused`` takes the device's fused path wherever it is supported, whatever the size and width
    (the tests use it on small matrices); ``triton`` takes the Triton kernels on any device (on the CPU only under
    the Triton interpreter, ``TRITON_INTERPRET=1``, for tests). The forward records its choice and the backward follows
    it: τ selects the same survivors only if both build ΔW the same way. Other kernels take the torch path.
    """
    choice = os.environ.get("SNELL_KERNELS", "auto")
    if choice not in CHOICES:
        raise ValueError(f"SNELL_KERNELS must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "torch" or spec.kernel not in ("piecewise_linear", "mixk"):
        return "torch"
    numel = spec.grouped_shape[1] * spec.grouped_shape[2]
    if choice == "triton" or device.type == "cuda":
        wanted = choice != "auto" or (_TRITON_MIN_NUMEL is not None and numel >= _TRITON_MIN_NUMEL)
        if not wanted:
            return "torch"
        triton = implementation("triton")
        return "triton" if triton.supports(spec, rank, dtypes) and triton.available(device) else "torch"
    width = rank // spec.num_pieces
    supported = (
        device.type == "cpu"
        and spec.op in ("linear", "conv2d")
        and all(dtype in _FUSED_DTYPES for dtype in dtypes)
        and (choice == "fused" or any(numel >= least and width <= widest for least, widest in _FUSED_FROM))
    )
    return "fused_cpu" if supported and fused_cpu.available() else "torch"


def implementation(path: str) -> ModuleType:
    """The module that implements ``path`` (the Triton one is imported on first use: it imports triton)."""
    if path == "triton":
        from snell import triton_path

        return triton_path
    return {"torch": torch_path, "fused_cpu": fused_cpu_path}[path]
