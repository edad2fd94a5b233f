"""The torch path: ΔW built by GEMMs and element-wise passes (kernels.py), τ by sparsify's selection.

It runs on every device and for every kernel, mode and dtype; the fused paths are faster where they apply
(dispatch.py). Forward and backward build ΔW in the same blocks of rows, so the recomputed ΔW is
bit-identical and the saved τ selects exactly the same survivors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snell import kernels, sparsify
from snell.spec import (
    SnellSpec,
    base_blocks,
    grad_input,
    group_coefficients,
    grouped_factors,
    matrix_grad,
    row_blocks,
)


def dense_delta(spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor) -> Tensor:
    """ΔW as (G, m/G, n) in at least float32."""
    a_g, b_g, coefficients = grouped_factors(spec, a, b, coefficients)
    delta = a_g.new_empty(spec.grouped_shape)
    for g, rows in row_blocks(spec):
        coef = group_coefficients(coefficients, g)
        kernels.kernel_delta(spec.kernel, a_g[g], b_g[g, rows], coef, spec.num_pieces, out=delta[g, rows])
    return delta


def _merged(base: Tensor | None, delta: Tensor, scale: Tensor | None, out: Tensor | None = None) -> Tensor:
    """W0 + ΔW ⊙ S in ΔW's dtype, in one pass (or ΔW ⊙ S alone without W0), for a block of rows.

    Forward and backward both merge through here, block by block, so the weight dx is computed with is
    bit-identical to the one the forward used. ``out`` may be ΔW itself (the forward merges in place) or a
    block of the backward's merged matrix (no temporary per block).
    """
    if base is None:
        if scale is not None:
            return torch.mul(delta, scale, out=out)
        return delta if out is None or out is delta else out.copy_(delta)
    base = base.to(delta.dtype)
    return torch.add(base, delta, out=out) if scale is None else torch.addcmul(base, delta, scale, out=out)


def _block_scale(spec: SnellSpec, group: int, delta: Tensor, tau: Tensor) -> Tensor | None:
    """S for a block of ΔW's rows of adapter group ``group`` (None where it keeps the dense ΔW, see
    :meth:`SnellSpec.dense`)."""
    return None if spec.dense(group) else sparsify.survivor_scale_(delta.abs(), tau, spec.mode)


def _thresholds(spec: SnellSpec, delta: Tensor) -> Tensor:
    """τ per adapter group, (G, 1, 1): one selection over every group when they share a sparsity, else one each;
    -inf for a group that keeps the dense ΔW."""
    if not spec.group_sparsity:
        if spec.dense(0):
            return delta.new_full((spec.groups, 1, 1), -torch.inf)
        return sparsify.threshold(delta, spec.sparsity)
    taus = [
        delta.new_full((1, 1, 1), -torch.inf)
        if spec.dense(g)
        else sparsify.threshold(delta[g : g + 1], spec.sparsity_of(g))
        for g in range(spec.groups)
    ]
    return torch.cat(taus)


def sparsify_(spec: SnellSpec, delta: Tensor, base: Tensor | None = None) -> Tensor:
    """Turn ΔW (G, m/G, n) into W0 + ΔWˢ (or ΔWˢ alone without ``base``) in place; returns τ, (G, 1, 1).

    τ is selected on ΔW itself (no m×n |ΔW|), then each block of rows gets its S and is merged while it is
    in cache, so the forward needs one m×n buffer. τ is -inf where the dense ΔW is kept.
    """
    tau = _thresholds(spec, delta)
    for g, rows in row_blocks(spec):
        block = delta[g, rows]
        _merged(None if base is None else base[g, rows], block, _block_scale(spec, g, block, tau[g]), out=block)
    return tau


def merged_and_tau(
    spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor, weight: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(W0 + ΔWˢ, or ΔWˢ alone without ``weight``, as (G, m/G, n) in at least float32; τ (G, 1, 1)). ``dtype``
    (the layer op's) is not used: the caller converts."""
    merged = dense_delta(spec, a, b, coefficients)
    return merged, sparsify_(spec, merged, base_blocks(spec, weight))


def backward(spec, x, weight, a, b, coefficients, tau, grad_out, need_x, need_w, need_factors, need_coef):
    """(dL/dx or None, dL/dW or None, (dA, dB, dcoef) or None), block by block.

    Every row j of ΔW depends only on B[j] and all of A, so ΔWˢ, dW = gyᵀx, the sparsifier's gradient and
    the kernel's backward can be done for a block of rows at a time; dA sums over blocks. The merged
    W0 + ΔWˢ is gathered block by block for one dx GEMM after the loop: splitting dx = gy·(W0 + ΔWˢ) over
    the blocks instead would keep the tokens×n dx alive beside the block temporaries (a higher peak
    whenever there are more tokens than rows, as in a ViT-B batch) and re-read it once per block.
    """
    groups, rows_per_group, n = spec.grouped_shape
    a_g, b_g, coefficients = grouped_factors(spec, a, b, coefficients)
    compute = a_g.dtype
    need_grad_matrix = need_w or need_factors
    base = base_blocks(spec, weight)
    conv = spec.op == "conv2d"
    merged = x.new_empty((groups, rows_per_group, n)) if need_x else None
    grad_matrix = None
    if need_grad_matrix and conv:
        grad_matrix = matrix_grad(spec, x, grad_out).reshape(groups, rows_per_group, n)
    elif need_w:
        grad_matrix = x.new_empty((groups, rows_per_group, n))
    if not conv:
        x_rows, grad_rows = x.reshape(-1, n), grad_out.reshape(-1, groups * rows_per_group)
    grad_a = torch.zeros_like(a_g) if need_factors else None
    grad_b = torch.empty_like(b_g) if need_factors else None
    grad_coef = torch.zeros_like(coefficients) if need_coef else None
    keep_pieces = need_factors and spec.kernel in ("piecewise_linear", "mixk")
    for g, rows in row_blocks(spec):
        coef = group_coefficients(coefficients, g)
        # Every block temporary is dropped as soon as it is used (ΔW once merged, the block of dW once it is
        # the gradient w.r.t. ΔW, the piece distances inside the kernel's backward), so the next block never
        # allocates beside this one's leftovers.
        b_block = b_g[g, rows]
        pieces = kernels.piece_distances(a_g[g], b_block, spec.num_pieces) if keep_pieces else None
        delta = kernels.kernel_delta(spec.kernel, a_g[g], b_block, coef, spec.num_pieces, pieces)
        scale = _block_scale(spec, g, delta, tau[g])
        if need_x:
            _merged(None if base is None else base[g, rows], delta, scale, out=merged[g, rows])
        del delta
        grad_delta = None
        if need_grad_matrix:
            if conv:
                grad_delta = grad_matrix[g, rows]
            else:
                first = g * rows_per_group + rows.start
                grad_delta = grad_rows[:, first : first + b_block.shape[0]].mT.matmul(x_rows)
                if need_w:
                    grad_matrix[g, rows] = grad_delta
        if need_factors:
            # The block of dW becomes the gradient w.r.t. ΔW in place, unless it is a convolution's dW itself.
            grad_delta = grad_delta.to(compute, copy=conv and need_w)
            if scale is not None:
                grad_delta.mul_(sparsify.gradient_scale(scale, tau[g], spec.mode))
                scale = None
            block_a, block_b, block_coef = kernels.kernel_backward(
                spec.kernel, a_g[g], b_block, coef, grad_delta, spec.num_pieces, need_coef, pieces
            )
            grad_a[g] += block_a
            grad_b[g, rows] = block_b
            if need_coef:
                group_coefficients(grad_coef, g).add_(block_coef)
        del scale, grad_delta, pieces
    grad_x = None if merged is None else grad_input(spec, x, merged.reshape(spec.matrix_shape), grad_out)
    factor_grads = (grad_a, grad_b, grad_coef) if need_factors else None
    return grad_x, grad_matrix, factor_grads
