"""The fused CPU path: glue between the fused function and the numba kernels of fused_cpu.py."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from snell import fused_cpu
from snell.spec import (
    SnellSpec,
    WeightGradRows,
    base_blocks,
    grad_input,
    group_coefficients,
    grouped_factors,
    row_blocks,
)

# Entries per block of the fused backward. Where FactorGrads reduces through BLAS (pieces wider than 4 columns,
# matrices from fused_cpu._GEMM_MIN_NUMEL entries) the block's weights w_p exist beside its dW (P × 4 bytes an
# entry: 32 MB at 2^22). Fewer, larger blocks mean fewer hand-overs between numba's
# and torch's thread pools: 2^20 to 2^22 measured alike on a lightly loaded machine, 2^22 best under load.
BLOCK_ENTRIES = 1 << 22


def _mix(spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor) -> fused_cpu.Mix | None:
    """mixk's column statistics for one group's matrix (None for the piecewise-linear kernel)."""
    return fused_cpu.mix_stats(a, b, coefficients, spec.num_pieces) if spec.kernel == "mixk" else None


def _selection(tau: float, mix: fused_cpu.Mix | None) -> Tensor:
    """What the backward needs to rebuild one group's ΔWˢ: τ, then for mixk each column's softmax max and reciprocal
    sum (the forward's, so the backward neither pays that pass again nor can differ from it), as one float32 row."""
    tau_row = torch.tensor([tau], dtype=torch.float32)
    return tau_row if mix is None else torch.cat([tau_row, torch.from_numpy(mix.stats).flatten()])


def _selected(spec: SnellSpec, selection: Tensor, coefficients: Tensor) -> tuple[float, fused_cpu.Mix | None]:
    """(τ, the Mix or None) of one group back from its :func:`_selection` row."""
    if spec.kernel != "mixk":
        return float(selection[0]), None
    stats = selection[1:].reshape(2, -1).numpy()
    return float(selection[0]), fused_cpu.mix_from_stats(coefficients, spec.num_pieces, stats)


@torch.compiler.disable  # numpy and numba, and τ a Python float: traced, every new τ would compile again
def merged_and_tau(
    spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor, weight: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(W0 + ΔWˢ, or ΔWˢ alone without ``weight``, as (G, m/G, n) in ``dtype``; the selection, float32) by the
    fused CPU kernels: ΔW is never stored, only the merged matrix is written. The selection is τ, (G, 1, 1), and
    for mixk each column's softmax statistics after it, (G, 1, 1 + 2n): 2n floats a matrix, kept for backward."""
    a_g, b_g, coefficients = grouped_factors(spec, a, b, coefficients)
    base = base_blocks(spec, weight)
    merged = torch.empty(spec.grouped_shape, dtype=dtype)
    selections = []
    for g in range(spec.groups):
        coef, sparsity = group_coefficients(coefficients, g), spec.sparsity_of(g)
        mix = _mix(spec, a_g[g], b_g[g], coef)
        targets = (None if base is None else base[g], dtype, merged[g], mix)
        if spec.dense(g):
            tau = -math.inf
            fused_cpu.merge(a_g[g], b_g[g], coef, spec.num_pieces, tau, spec.mode, sparsity, *targets)
        else:
            _, tau = fused_cpu.merge_selected(a_g[g], b_g[g], coef, spec.num_pieces, spec.mode, sparsity, *targets)
        selections.append(_selection(tau, mix))
    return merged, torch.stack(selections).unsqueeze(1)


@torch.compiler.disable  # as merged_and_tau
def backward(spec, x, weight, a, b, coefficients, tau, grad_out, need_x, need_w, need_factors, need_coef):
    """:func:`snell.torch_path.backward` on the fused CPU kernels. Per block of rows, dW = gyᵀx is one BLAS GEMM;
    one fused pass rebuilds ΔW (bit-identical to the forward's, so τ keeps the same survivors), writes the
    block of the merged weight for dx and reduces the kernel's gradient into dB and dA, by itself or, for wide
    pieces on large matrices, through the block's per-piece weights w_p and BLAS GEMMs
    (:class:`fused_cpu.FactorGrads`).
    Only the block's dW (and w_p) exist beside the merged matrix. ``tau``: the forward's selection, τ and mixk's
    column statistics (:func:`merged_and_tau`)."""
    groups, rows_per_group, n = spec.grouped_shape
    a_g, b_g, coefficients = grouped_factors(spec, a, b, coefficients)
    base = base_blocks(spec, weight)
    merged = x.new_empty((groups, rows_per_group, n)) if need_x else None
    weight_grad = WeightGradRows(spec, x, grad_out, need_w, need_w or need_factors)
    coefs = [group_coefficients(coefficients, g) for g in range(groups)]
    taus, mixes = zip(*(_selected(spec, tau[g, 0], coefs[g]) for g in range(groups)), strict=True)
    if not need_factors:
        for g in range(groups):
            if need_x:
                fused_cpu.merge(
                    a_g[g], b_g[g], coefs[g], spec.num_pieces, taus[g], spec.mode, spec.sparsity_of(g),
                    None if base is None else base[g], x.dtype, out=merged[g], mix=mixes[g],
                )  # fmt: skip
            if need_w:
                weight_grad.block(g, slice(0, rows_per_group))
    accumulators = [
        fused_cpu.FactorGrads(a_g[g], b_g[g], coefs[g], spec.num_pieces, need_coef, mixes[g], spec.sparsity_of(g))
        for g in range(groups if need_factors else 0)
    ]
    for g, rows in row_blocks(spec, BLOCK_ENTRIES) if need_factors else ():
        accumulators[g].add_rows(
            taus[g], spec.mode, spec.sparsity_of(g), rows.start, weight_grad.block(g, rows),
            None if base is None else base[g], None if merged is None else merged[g],
        )  # fmt: skip
    factor_grads = None
    if need_factors:
        results = [accumulator.result() for accumulator in accumulators]
        grad_a, grad_b = torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])
        grad_coef = None
        if need_coef:  # mixk's are per group, (G, P + 3); the others' shared by every group
            grad_coef = torch.stack([r[2] for r in results]) if coefficients.dim() == 2 else sum(r[2] for r in results)
        factor_grads = (grad_a, grad_b, grad_coef)
    grad_x = None if merged is None else grad_input(spec, x, merged.reshape(spec.matrix_shape), grad_out)
    return grad_x, weight_grad.matrix, factor_grads
