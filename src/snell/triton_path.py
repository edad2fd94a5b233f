"""The Triton path: glue between the fused function and the kernels of fused_triton.py (same contracts as
fused_cpu_path.py, with τ a device tensor that is never read on the host)."""

from __future__ import annotations

import torch
from torch import Tensor

from snell import fused_triton, fused_triton_mixk
from snell.spec import SnellSpec, WeightGradRows, base_blocks, grad_input, grouped_factors, row_blocks

# Rows of dW = gyᵀx per backward block: its GEMM and its fused pass see this many entries (64 MiB of float32).
# mixk's backward takes a group's whole matrix at once (its softmax couples the rows of a column).
BLOCK_ENTRIES = 1 << 24
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OPS = ("linear", "linear_t", "conv2d")


def supports(spec: SnellSpec, rank: int, dtypes: tuple[torch.dtype, ...]) -> bool:
    """The piecewise-linear and mixk kernels, with one sparsity for every adapter group or one each, a layer seen as a
    row-major (m, n) matrix (Linear, Conv2d) or its transpose (Conv1D, read through W0's strides),
    float32/bf16/fp16 tensors, r a multiple of the pieces, and fewer than 2^31 entries in the layer's matrix (the
    kernels' offsets and the radix histograms' counts are int32)."""
    m, n = spec.matrix_shape
    return (
        spec.kernel in ("piecewise_linear", "mixk")
        and spec.op in _OPS
        and rank % spec.num_pieces == 0
        and all(dtype in _DTYPES for dtype in dtypes)
        and m * n < 1 << 31
    )


def available(device: torch.device) -> bool:
    return fused_triton.available(device)


def _sparsities(spec: SnellSpec) -> list[float | None]:
    """Each group's sparsity for select_tau, None where the group keeps its dense ΔW (:meth:`SnellSpec.dense`)."""
    return [None if spec.dense(g) else spec.sparsity_of(g) for g in range(spec.groups)]


def merged_and_tau(
    spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor, weight: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(W0 + ΔWˢ, or ΔWˢ alone without ``weight``, as (G, m/G, n) in ``dtype``; the selection, float32 on the
    device): four radix passes and one merge pass (mixk: after its column statistics' pass), ΔW never stored, no
    host synchronisation. The selection is τ, (G, 1, 1), and for mixk each column's softmax max and reciprocal sum
    after it, (G, 1, 1 + 2n), as on the fused CPU path: 2n floats a matrix, kept for the backward."""
    a_g, b_g, coefficients = grouped_factors(spec, a, b, coefficients)
    stats = fused_triton_mixk.column_stats(a_g, b_g, coefficients, spec.num_pieces) if spec.kernel == "mixk" else None
    tau = fused_triton.select_tau(a_g, b_g, coefficients, spec.num_pieces, _sparsities(spec), stats)
    merged = fused_triton.merge(
        a_g, b_g, coefficients, spec.num_pieces, tau, spec.mode, base_blocks(spec, weight), dtype, stats
    )
    selection = tau if stats is None else torch.cat([tau, stats.reshape(spec.groups, 1, -1)], -1)
    return merged, selection


def backward(spec, x, weight, a, b, coefficients, tau, grad_out, need_x, need_w, need_factors, need_coef):
    """:func:`snell.torch_path.backward` on the Triton kernels. Per block of rows, dW = gyᵀx is one cuBLAS GEMM;
    one fused pass rebuilds ΔW (bit-identical to the forward's, so τ keeps the same survivors), writes the
    block of the merged weight for dx and reduces the kernel's gradient into per-tile partial sums. ``tau``: the
    forward's selection (:func:`merged_and_tau`)."""
    groups, rows_per_group, n = spec.grouped_shape
    a_g, b_g, coefficients = grouped_factors(spec, a, b, coefficients)
    stats = tau[:, 0, 1:].reshape(groups, 2, n) if spec.kernel == "mixk" else None
    tau = tau[..., :1]
    base = base_blocks(spec, weight)
    merged = None
    weight_grad = WeightGradRows(spec, x, grad_out, need_w, need_w or need_factors)
    if not need_factors:
        if need_x:
            merged = fused_triton.merge(a_g, b_g, coefficients, spec.num_pieces, tau, spec.mode, base, x.dtype, stats)
        if need_w:
            for g in range(groups):
                weight_grad.block(g, slice(0, rows_per_group))
    factor_grads = None
    if need_factors:
        merged = x.new_empty((groups, rows_per_group, n)) if need_x else None
        accumulator = fused_triton.FactorGrads(a_g, b_g, coefficients, spec.num_pieces, need_coef, stats)
        for g, rows in row_blocks(spec, BLOCK_ENTRIES):
            accumulator.add_rows(g, tau, spec.mode, rows.start, weight_grad.block(g, rows), base, merged)
        grad_a, grad_b, grad_coef = accumulator.result()
        if grad_coef is not None and coefficients.dim() == 1:  # shared by every group
            grad_coef = grad_coef.sum(0)
        factor_grads = grad_a, grad_b, grad_coef
    grad_x = None if merged is None else grad_input(spec, x, merged.reshape(spec.matrix_shape), grad_out)
    return grad_x, weight_grad.matrix, factor_grads
