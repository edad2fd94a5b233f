"""Which implementation builds, selects and differentiates ΔW for a layer: the one place that decides.

Three implementations share one interface (``merged_and_tau`` for forward, ``backward``): the torch path
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
# Below this many entries per matrix the torch path is used: the fused path is the default only where it was
# measured faster (benchmarks/results/fused_cpu/results.md, fwd + bwd of one layer, paired in one process): at
# every shape measured, from ViT-B's 768×768 (1.04×) through ViT-L/H's MLPs (1.08–1.20×, fp32, 1576 tokens) to
# LLaMA-sized bf16 layers at 256 tokens (1.55× at 1024×1024, 2.15× at 11008×4096). A whole ViT-B step went from
# 1.47× to 1.36× LoRA-8 with it (benchmarks.ab_step). Smaller matrices were not measured.
_FUSED_MIN_NUMEL = 1 << 19
_FUSED_DTYPES = (torch.float32, torch.bfloat16)
# Widest piece (r / P) the fused path takes: one 11008×4096 bf16 layer at 256 tokens, fwd + bwd, ran 1.75×
# (r = 8), 1.32× (r = 16) and 1.01× (r = 32) faster than on the torch path, whose distance GEMMs gain on the
# fused loops as the pieces widen (benchmarks/README.md).
_FUSED_MAX_PIECE_WIDTH = 8


# The Triton kernels are not the default on CUDA until a GPU has measured them faster than the torch path:
# `python -m benchmarks.gpu` times both per layer and prints the bound its numbers support. None: never by
# default; SNELL_KERNELS=fused takes them wherever they apply.
_TRITON_MIN_NUMEL: int | None = None


def kernel_path(spec: SnellSpec, device: torch.device, rank: int, *dtypes: torch.dtype) -> str:
    """ "torch", "fused_cpu" or "triton": which implementation builds, selects and differentiates ΔW here.

    ``rank``: r of the factors; ``dtypes``: those of x, the factors and W0 (whichever exist). Both fused
    paths cover the piecewise-linear kernel. The CPU one takes float32/bf16 tensors whose weight is a
    row-major (m, n) matrix (Linear, Conv2d), from ``_FUSED_MIN_NUMEL`` entries per matrix and up to
    ``_FUSED_MAX_PIECE_WIDTH`` columns per piece; the Triton one what ``triton_path.supports`` accepts, on
    CUDA from ``_TRITON_MIN_NUMEL``. ``SNELL_KERNELS``: ``torch`` forces the torch path; ``fused`` takes the
    device's fused path wherever it is supported, whatever the size and width (the tests use it on small
    matrices); ``triton`` takes the Triton kernels on any device (on the CPU only under the Triton
    interpreter, ``TRITON_INTERPRET=1``, for tests). The forward records its choice and the backward follows
    it: τ selects the same survivors only if both build ΔW the same way.
    """
    choice = os.environ.get("SNELL_KERNELS", "auto")
    if choice not in CHOICES:
        raise ValueError(f"SNELL_KERNELS must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "torch" or spec.kernel != "piecewise_linear":
        return "torch"
    numel = spec.grouped_shape[1] * spec.grouped_shape[2]
    if choice == "triton" or device.type == "cuda":
        wanted = choice != "auto" or (_TRITON_MIN_NUMEL is not None and numel >= _TRITON_MIN_NUMEL)
        if not wanted:
            return "torch"
        triton = implementation("triton")
        return "triton" if triton.supports(spec, rank, dtypes) and triton.available(device) else "torch"
    supported = (
        device.type == "cpu"
        and spec.op in ("linear", "conv2d")
        and all(dtype in _FUSED_DTYPES for dtype in dtypes)
        and (choice == "fused" or (numel >= _FUSED_MIN_NUMEL and rank // spec.num_pieces <= _FUSED_MAX_PIECE_WIDTH))
    )
    return "fused_cpu" if supported and fused_cpu.available() else "torch"


def implementation(path: str) -> ModuleType:
    """The module that implements ``path`` (the Triton one is imported on first use: it imports triton)."""
    if path == "triton":
        from snell import triton_path

        return triton_path
    return {"torch": torch_path, "fused_cpu": fused_cpu_path}[path]
