"""The Triton path: glue between the fused function and the kernels of fused_triton.py (same contracts as
fused_cpu_path.py, with τ a device tensor that is never read on the host)."""

from __future__ import annotations

import torch
from torch import Tensor

from snell import fused_triton
from snell.spec import SnellSpec, WeightGradRows, base_blocks, grad_input, grouped_factors, row_blocks

# Rows of dW = gyᵀx per backward block: its GEMM and its fused pass see this many entries (64 MiB of float32).
BLOCK_ENTRIES = 1 << 24
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OPS = ("linear", "linear_t", "conv2d")


def supports(spec: SnellSpec, rank: int, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Piecewise-linear kernel with one sparsity for every adapter group, a layer seen as a row-major (m, n) matrix
    (Linear, Conv2d) or its transpose (Conv1D, read through W0's strides), float32/bf16/fp16 tensors, r a multiple
    of the pieces, and fewer than 2^31 entries in the layer's matrix (the kernels' offsets and the radix
    histograms' counts are int32)."""
    m, n = spec.matrix_shape
    return (
        spec.kernel == "piecewise_linear"
        and not spec.group_sparsity
        and spec.op in _OPS
        and rank % spec.num_pieces == 0
        and all(dtype in _DTYPES for dtype in dtypes)
        and m * n < 1 << 31
    )


def available(device: torch.device) -> bool:
    return fused_triton.available(device)


def merged_and_tau(
    spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor, weight: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(W0 + ΔWˢ, or ΔWˢ alone without ``weight``, as (G, m/G, n) in ``dtype``; τ (G, 1, 1) float32 on the
    device): four radix passes and one merge pass, ΔW never stored, no host synchronisation."""
    a_g, b_g, coefficients = grouped_factors(spec, a, b, coefficients)
    tau = fused_triton.select_tau(a_g, b_g, coefficients, spec.num_pieces, spec.sparsity)
    merged = fused_triton.merge(
        a_g, b_g, coefficients, spec.num_pieces, tau, spec.mode, spec.sparsity, base_blocks(spec, weight), dtype
    )
    return merged, tau


def backward(spec, x, weight, a, b, coefficients, tau, grad_out, need_x, need_w, need_factors, need_coef):
    """:func:`snell.torch_path.backward` on the Triton kernels. Per block of rows, dW = gyᵀx is one cuBLAS GEMM;
    one fused pass rebuilds ΔW (bit-identical to the forward's, so τ keeps the same survivors), writes the
    block of the merged weight for dx and reduces the kernel's gradient into per-tile partial sums."""
    groups, rows_per_group, n = spec.grouped_shape
    a_g, b_g, coefficients = grouped_factors(spec, a, b, coefficients)
    base = base_blocks(spec, weight)
    merged = None
    weight_grad = WeightGradRows(spec, x, grad_out, need_w, need_w or need_factors)
    if not need_factors:
        if need_x:
            merged = fused_triton.merge(
                a_g, b_g, coefficients, spec.num_pieces, tau, spec.mode, spec.sparsity, base, x.dtype
            )
        if need_w:
            for g in range(groups):
                weight_grad.block(g, slice(0, rows_per_group))
    factor_grads = None
    if need_factors:
        merged = x.new_empty((groups, rows_per_group, n)) if need_x else None
        accumulator = fused_triton.FactorGrads(a_g, b_g, coefficients, spec.num_pieces, need_coef)
        for g, rows in row_blocks(spec, BLOCK_ENTRIES):
            accumulator.add_rows(g, tau, spec.mode, spec.sparsity, rows.start, weight_grad.block(g, rows), base, merged)
        factor_grads = accumulator.result()
    grad_x = None if merged is None else grad_input(spec, x, merged.reshape(spec.matrix_shape), grad_out)
    return grad_x, weight_grad.matrix, factor_grads
