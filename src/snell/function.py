"""The fused SNELL autograd function: y = op(x, W0 + ΔWˢ) + b in one GEMM (or convolution).

Forward builds ΔW from the factors, selects τ, adds the sparsified update to W0 and runs the layer's own
op once; it saves only x, the factors and τ (W0 and b are parameters, already alive). Backward rebuilds
ΔWˢ with the saved τ (no second selection), runs the two GEMMs every trained layer needs (dx and
dW = gyᵀx) and sends dW through the sparsifier and the kernel to A and B. No m×n tensor lives between
forward and backward: that is where SNELL's memory goes in the reference layout.

Everything is done on the weight seen as an (m, n) matrix: a Linear's weight, a Conv1D's weight
transposed, a Conv2d's weight flattened to (out, in·kh·kw / groups).
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from snell import fused_cpu, kernels, sparsify


@dataclass(frozen=True)
class SnellSpec:
    """Static description of one adapted layer (hashable, so torch.compile treats it as a constant).

    op: "linear" (weight (m, n)), "linear_t" (weight stored (n, m), transformers' Conv1D) or "conv2d"
    (weight (m, n/groups', kh, kw) seen as an (m, n·kh·kw/groups') matrix).
    groups: number of adapter groups stacked along the output dimension (3 for a split fused qkv).
    """

    op: str
    weight_shape: tuple[int, ...]
    kernel: str
    num_pieces: int
    mode: str
    sparsity: float
    groups: int = 1
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    conv_groups: int = 1

    @property
    def matrix_shape(self) -> tuple[int, int]:
        if self.op == "linear_t":
            return self.weight_shape[1], self.weight_shape[0]
        return self.weight_shape[0], int(torch.Size(self.weight_shape[1:]).numel())

    @property
    def grouped_shape(self) -> tuple[int, int, int]:
        m, n = self.matrix_shape
        return self.groups, m // self.groups, n


def weight_matrix(spec: SnellSpec, weight: Tensor) -> Tensor:
    """The base weight as the (m, n) matrix the adapter updates (a view)."""
    return weight.mT if spec.op == "linear_t" else weight.reshape(spec.matrix_shape)


def to_weight_layout(spec: SnellSpec, matrix: Tensor) -> Tensor:
    """An (m, n) matrix (or its grouped (G, m/G, n) form) in the layout of the layer's weight."""
    matrix = matrix.reshape(spec.matrix_shape)
    return matrix.mT if spec.op == "linear_t" else matrix.reshape(spec.weight_shape)


# ΔW is built in blocks of rows of about this many entries, in forward and again in backward. Backward
# keeps each block's temporaries (ΔW, the piece distances, the survivor factor, its rows of dW) in cache
# and allocates no m×n temporary but the merged weight for dx. Forward uses the same blocks so that
# the recomputed ΔW is bit-identical and the saved τ selects exactly the same survivors.
_BLOCK_ENTRIES = 1 << 20  # 4 MB of float32: a few blocks per ViT-B matrix, each fits in L3


# The fused backward's blocks hold only their rows of dW (no piece distances, no ΔW): larger blocks mean
# fewer hand-overs between torch's and numba's thread pools.
_FUSED_BLOCK_ENTRIES = 1 << 22


def _row_blocks(spec: SnellSpec, entries: int | None = None):
    groups, rows_per_group, n = spec.grouped_shape
    step = max(1, (entries or _BLOCK_ENTRIES) // n)
    for g in range(groups):
        for start in range(0, rows_per_group, step):
            yield g, slice(start, min(start + step, rows_per_group))


def _grouped_factors(spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A as (G, n, r), B as (G, m/G, r) and the coefficients, in at least float32."""
    groups, rows_per_group, n = spec.grouped_shape
    compute = torch.promote_types(a.dtype, torch.float32)
    return (
        a.to(compute).reshape(groups, n, -1),
        b.to(compute).reshape(groups, rows_per_group, -1),
        coefficients.to(compute),
    )


def dense_delta(spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor) -> Tensor:
    """ΔW as (G, m/G, n) in at least float32."""
    a_g, b_g, coefficients = _grouped_factors(spec, a, b, coefficients)
    delta = a_g.new_empty(spec.grouped_shape)
    for g, rows in _row_blocks(spec):
        kernels.kernel_delta(spec.kernel, a_g[g], b_g[g, rows], coefficients, spec.num_pieces, out=delta[g, rows])
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


def _block_scale(spec: SnellSpec, delta: Tensor, tau: Tensor) -> Tensor | None:
    """S for a block of ΔW's rows (None at sparsity 0, where every mode keeps the dense ΔW, as the
    reference code does)."""
    return None if spec.sparsity == 0.0 else sparsify.survivor_scale_(delta.abs(), tau, spec.mode)


def sparsify_(spec: SnellSpec, delta: Tensor, base: Tensor | None = None) -> Tensor:
    """Turn ΔW (G, m/G, n) into W0 + ΔWˢ (or ΔWˢ alone without ``base``) in place; returns τ, (G, 1, 1).

    τ is selected on ΔW itself (no m×n |ΔW|), then each block of rows gets its S and is merged while it is
    in cache, so the forward needs one m×n buffer. τ is -inf at sparsity 0.
    """
    if spec.sparsity == 0.0:
        tau = delta.new_full((spec.groups, 1, 1), -torch.inf)
    else:
        tau = sparsify.threshold(delta, spec.sparsity)
    for g, rows in _row_blocks(spec):
        block = delta[g, rows]
        _merged(None if base is None else base[g, rows], block, _block_scale(spec, block, tau[g]), out=block)
    return tau


# Below this many entries per matrix the torch path is used: the fused path is the default only where it was
# measured faster. On one 11008×4096 bf16 layer (LLaMA-2-7B's MLP; its 4096×4096 projections are 2^24) at 256
# tokens it ran fwd + bwd 1.75× faster than the torch path; on ViT-B (768×768 to 3072×768, fp32, 1576 tokens) a
# whole step was no faster: 1.53× LoRA-8 with it against 1.48× without, paired in one process (README).
_FUSED_MIN_NUMEL = 1 << 24
_FUSED_DTYPES = (torch.float32, torch.bfloat16)
# Widest piece (r / P) the fused path takes: one 11008×4096 bf16 layer at 256 tokens, fwd + bwd, ran 1.75×
# (r = 8), 1.32× (r = 16) and 1.01× (r = 32) faster than on the torch path, whose distance GEMMs gain on the
# fused loops as the pieces widen (benchmarks/README.md).
_FUSED_MAX_PIECE_WIDTH = 8


def kernel_path(spec: SnellSpec, device: torch.device, rank: int, *dtypes: torch.dtype) -> str:
    """ "fused_cpu" or "torch": which implementation builds, selects and differentiates ΔW for this layer.

    ``rank``: r of the factors; ``dtypes``: those of x, the factors and W0 (whichever exist). The fused CPU
    kernels cover the piecewise-linear kernel on float32/bf16 tensors whose weight is a row-major (m, n)
    matrix (Linear, Conv2d); they are chosen from ``_FUSED_MIN_NUMEL`` entries per matrix and up to
    ``_FUSED_MAX_PIECE_WIDTH`` columns per piece. ``SNELL_KERNELS=torch`` forces the torch path;
    ``SNELL_KERNELS=fused`` takes the fused one wherever it is supported, whatever the size and width (the
    tests use it on small matrices). The forward records its choice and the backward follows it: τ selects
    the same survivors only if both build ΔW the same way.
    """
    choice = os.environ.get("SNELL_KERNELS", "auto")
    if choice not in ("auto", "torch", "fused"):
        raise ValueError(f"SNELL_KERNELS must be auto, torch or fused, got {choice!r}")
    supported = (
        choice != "torch"
        and device.type == "cpu"
        and spec.kernel == "piecewise_linear"
        and spec.op in ("linear", "conv2d")
        and all(dtype in _FUSED_DTYPES for dtype in dtypes)
        and (
            choice == "fused"
            or (
                spec.grouped_shape[1] * spec.grouped_shape[2] >= _FUSED_MIN_NUMEL
                and rank // spec.num_pieces <= _FUSED_MAX_PIECE_WIDTH
            )
        )
    )
    return "fused_cpu" if supported and fused_cpu.available() else "torch"


def _fused_merged(
    spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor, weight: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(W0 + ΔWˢ, or ΔWˢ alone without ``weight``, as (G, m/G, n) in ``dtype``; τ (G, 1, 1) float32) by the
    fused CPU kernels: ΔW is never stored, only the merged matrix is written."""
    a_g, b_g, coefficients = _grouped_factors(spec, a, b, coefficients)
    base = _base_blocks(spec, weight)
    merged = torch.empty(spec.grouped_shape, dtype=dtype)
    taus = []
    for g in range(spec.groups):
        tau = -math.inf
        if spec.sparsity != 0.0:
            tau, _ = fused_cpu.select_tau(a_g[g], b_g[g], coefficients, spec.num_pieces, spec.sparsity)
        fused_cpu.merge(
            a_g[g], b_g[g], coefficients, spec.num_pieces, tau, spec.mode, spec.sparsity,
            None if base is None else base[g], dtype, out=merged[g],
        )  # fmt: skip
        taus.append(tau)
    return merged, torch.tensor(taus, dtype=torch.float32).reshape(-1, 1, 1)


def sparse_delta(
    spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor, path: str | None = None
) -> tuple[Tensor, Tensor]:
    """(ΔWˢ as (G, m/G, n), τ); ``path`` as :func:`kernel_path` chose (by default, for the factors alone)."""
    if (path or kernel_path(spec, a.device, a.shape[-1], a.dtype)) == "fused_cpu":
        return _fused_merged(spec, a, b, coefficients, None, torch.promote_types(a.dtype, torch.float32))
    delta = dense_delta(spec, a, b, coefficients)
    return delta, sparsify_(spec, delta)


def _base_blocks(spec: SnellSpec, weight: Tensor | None) -> Tensor | None:
    """W0 as (G, m/G, n) (a view when the layout allows it), or None for the adapter branch alone."""
    return None if weight is None else weight_matrix(spec, weight).reshape(spec.grouped_shape)


def layer_op(spec: SnellSpec, x: Tensor, matrix: Tensor, bias: Tensor | None) -> Tensor:
    """The layer's own forward with its weight given as the (m, n) matrix."""
    if spec.op == "conv2d":
        weight = matrix.reshape(spec.weight_shape)
        return F.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.conv_groups)
    return F.linear(x, matrix, bias)


def _grad_input(spec: SnellSpec, x: Tensor, matrix: Tensor, grad_out: Tensor) -> Tensor:
    if spec.op == "conv2d":
        weight = matrix.reshape(spec.weight_shape)
        return torch.nn.grad.conv2d_input(
            x.shape, weight, grad_out, spec.stride, spec.padding, spec.dilation, spec.conv_groups
        )
    return grad_out.matmul(matrix)


def _add_grad_input_(spec: SnellSpec, x: Tensor, matrix: Tensor, grad_out: Tensor, into: Tensor) -> None:
    """into += dL/dx of op(x, matrix), without a second x-sized buffer for a linear layer."""
    if spec.op == "conv2d":
        into.add_(_grad_input(spec, x, matrix, grad_out))
    else:
        into.view(-1, into.shape[-1]).addmm_(grad_out.reshape(-1, grad_out.shape[-1]), matrix)


def _grad_matrix(spec: SnellSpec, x: Tensor, grad_out: Tensor) -> Tensor:
    """dL/dW as the (m, n) matrix."""
    if spec.op == "conv2d":
        grad = torch.nn.grad.conv2d_weight(
            x, spec.weight_shape, grad_out, spec.stride, spec.padding, spec.dilation, spec.conv_groups
        )
        return grad.reshape(spec.matrix_shape)
    return grad_out.reshape(-1, grad_out.shape[-1]).mT.matmul(x.reshape(-1, x.shape[-1]))


def _bias_grad(spec: SnellSpec, grad_out: Tensor) -> Tensor:
    if spec.op == "conv2d":
        return grad_out.sum((0, 2, 3))
    return grad_out.reshape(-1, grad_out.shape[-1]).sum(0)


def _without_autocast(device_type: str) -> AbstractContextManager:
    """Autocast off inside the function: dtypes are chosen explicitly (no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


class FusedSnell(torch.autograd.Function):
    """y = op(x, W0 + ΔWˢ(A, B)) + b, saving only x, A, B, the coefficients and τ for backward.

    ``weight`` may be None: then y = op(x, ΔWˢ), the adapter branch alone.
    All arithmetic on ΔW is in float32 or wider; the layer op runs in x's dtype (autocast is resolved by
    the caller), like a plain layer under autocast.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, coefficients, spec: SnellSpec):
        dtypes = (x.dtype, a.dtype, *(() if weight is None else (weight.dtype,)))
        path = kernel_path(spec, x.device, a.shape[-1], *dtypes)
        with _without_autocast(x.device.type):
            if path == "fused_cpu":
                merged, tau = _fused_merged(spec, a, b, coefficients, weight, x.dtype)
            else:
                merged = dense_delta(spec, a, b, coefficients)
                tau = sparsify_(spec, merged, _base_blocks(spec, weight))
            matrix = merged.reshape(spec.matrix_shape).to(x.dtype)
            del merged
            out = layer_op(spec, x, matrix, None if bias is None else bias.to(x.dtype))
        ctx.spec, ctx.path = spec, path
        ctx.save_for_backward(x, weight, bias, a, b, coefficients, tau)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, a, b, coefficients, tau = ctx.saved_tensors
        spec: SnellSpec = ctx.spec
        need_x, need_w, need_bias, need_a, need_b, need_coef = ctx.needs_input_grad[:6]
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_coef = None
        with _without_autocast(x.device.type):
            grad_out = grad_out.to(x.dtype)
            grad_x, grad_matrix, factor_grads = _backward_by_row_blocks(
                spec,
                x,
                weight,
                a,
                b,
                coefficients,
                tau,
                grad_out,
                need_x,
                need_w,
                need_a or need_b or need_coef,
                need_coef,
                ctx.path,
            )
            if need_w:
                grad_w = to_weight_layout(spec, grad_matrix).to(weight.dtype)
            if factor_grads is not None:
                grad_a, grad_b, grad_coef = _in_factor_layouts(factor_grads, a, b, coefficients)
            if need_bias:
                grad_bias = _bias_grad(spec, grad_out).to(bias.dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_coef, None


def _in_factor_layouts(
    factor_grads, a: Tensor, b: Tensor, coefficients: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dA, dB, dcoefficients or None) in the shapes and dtypes of the factors themselves."""
    grad_a, grad_b, grad_coef = factor_grads
    grad_coef = None if grad_coef is None else grad_coef.to(coefficients.dtype)
    return grad_a.reshape(a.shape).to(a.dtype), grad_b.reshape(b.shape).to(b.dtype), grad_coef


def _backward_by_row_blocks(
    spec, x, weight, a, b, coefficients, tau, grad_out, need_x, need_w, need_factors, need_coef, path
):
    """(dL/dx or None, dL/dW or None, (dA, dB, dcoef) or None), block by block, on the forward's ``path``.

    Every row j of ΔW depends only on B[j] and all of A, so ΔWˢ, dW = gyᵀx, the sparsifier's gradient and
    the kernel's backward can be done for a block of rows at a time; dA sums over blocks. The merged
    W0 + ΔWˢ is gathered block by block for one dx GEMM after the loop: splitting dx = gy·(W0 + ΔWˢ) over
    the blocks instead would keep the tokens×n dx alive beside the block temporaries (a higher peak
    whenever there are more tokens than rows, as in a ViT-B batch) and re-read it once per block.
    """
    if path == "fused_cpu":
        return _fused_backward(
            spec, x, weight, a, b, coefficients, tau, grad_out, need_x, need_w, need_factors, need_coef
        )
    groups, rows_per_group, n = spec.grouped_shape
    a_g, b_g, coefficients = _grouped_factors(spec, a, b, coefficients)
    compute = a_g.dtype
    need_grad_matrix = need_w or need_factors
    base = _base_blocks(spec, weight)
    conv = spec.op == "conv2d"
    merged = x.new_empty((groups, rows_per_group, n)) if need_x else None
    grad_matrix = None
    if need_grad_matrix and conv:
        grad_matrix = _grad_matrix(spec, x, grad_out).reshape(groups, rows_per_group, n)
    elif need_w:
        grad_matrix = x.new_empty((groups, rows_per_group, n))
    if not conv:
        x_rows, grad_rows = x.reshape(-1, n), grad_out.reshape(-1, groups * rows_per_group)
    grad_a = torch.zeros_like(a_g) if need_factors else None
    grad_b = torch.empty_like(b_g) if need_factors else None
    grad_coef = torch.zeros_like(coefficients) if need_coef else None
    keep_pieces = need_factors and spec.kernel == "piecewise_linear"
    for g, rows in _row_blocks(spec):
        # Every block temporary is dropped as soon as it is used (ΔW once merged, the block of dW once it is
        # the gradient w.r.t. ΔW, the piece distances inside the kernel's backward), so the next block never
        # allocates beside this one's leftovers.
        b_block = b_g[g, rows]
        pieces = kernels.piece_distances(a_g[g], b_block, spec.num_pieces) if keep_pieces else None
        delta = kernels.kernel_delta(spec.kernel, a_g[g], b_block, coefficients, spec.num_pieces, pieces)
        scale = _block_scale(spec, delta, tau[g])
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
                spec.kernel, a_g[g], b_block, coefficients, grad_delta, spec.num_pieces, need_coef, pieces
            )
            grad_a[g] += block_a
            grad_b[g, rows] = block_b
            if need_coef:
                grad_coef += block_coef
        del scale, grad_delta, pieces
    grad_x = None if merged is None else _grad_input(spec, x, merged.reshape(spec.matrix_shape), grad_out)
    factor_grads = (grad_a, grad_b, grad_coef) if need_factors else None
    return grad_x, grad_matrix, factor_grads


def _fused_backward(spec, x, weight, a, b, coefficients, tau, grad_out, need_x, need_w, need_factors, need_coef):
    """:func:`_backward_by_row_blocks` on the fused CPU kernels. Per block of rows, dW = gyᵀx is one BLAS GEMM;
    one fused pass rebuilds ΔW (bit-identical to the forward's, so τ keeps the same survivors), writes the
    block of the merged weight for dx and reduces the kernel's gradient straight into dB and per-thread
    column sums for dA. Only the block's dW and those sums ((r + P) × n per thread) exist beside the merged
    matrix. (Writing the per-piece weights w_p out for torch's GEMMs to reduce was tried first: the skinny
    GEMMs and the hand-overs between numba's and torch's thread pools took 2.5× the fused pass itself.)"""
    groups, rows_per_group, n = spec.grouped_shape
    a_g, b_g, coefficients = _grouped_factors(spec, a, b, coefficients)
    base = _base_blocks(spec, weight)
    conv = spec.op == "conv2d"
    merged = x.new_empty((groups, rows_per_group, n)) if need_x else None
    grad_matrix = None
    if (need_w or need_factors) and conv:
        grad_matrix = _grad_matrix(spec, x, grad_out).reshape(groups, rows_per_group, n)
    elif need_w:
        grad_matrix = x.new_empty((groups, rows_per_group, n))
    if not conv:
        x_rows, grad_rows = x.reshape(-1, n), grad_out.reshape(-1, groups * rows_per_group)
    taus = [float(t) for t in tau.flatten()]
    if not need_factors:
        for g in range(groups):
            if need_x:
                fused_cpu.merge(
                    a_g[g], b_g[g], coefficients, spec.num_pieces, taus[g], spec.mode, spec.sparsity,
                    None if base is None else base[g], x.dtype, out=merged[g],
                )  # fmt: skip
            if need_w and not conv:
                grad_matrix[g] = grad_rows[:, g * rows_per_group : (g + 1) * rows_per_group].mT.matmul(x_rows)
    accumulators = [
        fused_cpu.FactorGrads(a_g[g], b_g[g], coefficients, spec.num_pieces, need_coef)
        for g in range(groups if need_factors else 0)
    ]
    for g, rows in _row_blocks(spec, _FUSED_BLOCK_ENTRIES) if need_factors else ():
        if conv:
            grad_delta = grad_matrix[g, rows]
        else:
            first = g * rows_per_group + rows.start
            grad_delta = grad_rows[:, first : first + rows.stop - rows.start].mT.matmul(x_rows)
            if need_w:
                grad_matrix[g, rows] = grad_delta
        accumulators[g].add_rows(
            taus[g], spec.mode, spec.sparsity, rows.start, grad_delta, None if base is None else base[g],
            None if merged is None else merged[g],
        )  # fmt: skip
        del grad_delta
    factor_grads = None
    if need_factors:
        results = [accumulator.result() for accumulator in accumulators]
        grad_a, grad_b = torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])
        grad_coef = sum(r[2] for r in results) if need_coef else None
        factor_grads = (grad_a, grad_b, grad_coef)
    grad_x = None if merged is None else _grad_input(spec, x, merged.reshape(spec.matrix_shape), grad_out)
    return grad_x, grad_matrix, factor_grads


def _draw_seed() -> int:
    """A seed for one dropout mask, from torch's default CPU generator (so torch.manual_seed governs it)."""
    return int(torch.randint(1 << 62, (), dtype=torch.int64))


_DROP_LEVELS = 1 << 16  # the mask compares 16-bit uniform integers against round(p · 2^16)


def _dropped_levels(p: float) -> int:
    return min(round(p * _DROP_LEVELS), _DROP_LEVELS - 1)


def keep_probability(p: float) -> float:
    """The probability an entry survives dropout at rate p, as the 16-bit draws realise it (|error| ≤ 2^-17)."""
    return 1.0 - _dropped_levels(p) / _DROP_LEVELS


def dropout_keep(x: Tensor, p: float, seed: int) -> Tensor:
    """Which entries of x dropout at rate p keeps (bool, x's shape), the same for the same seed: that seed is
    all backward keeps of the mask.

    Each 64-bit word the generator draws gives three 16-bit uniform integers (its low 48 bits; torch's int64
    random_ leaves the top bit 0). On the CPU that is about ten times cheaper than bernoulli_ per entry,
    which matters because the mask is drawn twice, in forward and again in backward.
    """
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    numel = x.numel()
    words = torch.empty((numel + 2) // 3, dtype=torch.int64, device=x.device).random_(generator=generator)
    low_lanes = slice(0, 3) if sys.byteorder == "little" else slice(1, 4)
    draws = words.view(torch.int16).view(-1, 4)[:, low_lanes]  # int16 spans −2^15 … 2^15 − 1 uniformly
    return (draws >= _dropped_levels(p) - _DROP_LEVELS // 2).reshape(-1)[:numel].view(x.shape)


class FusedSnellDropout(torch.autograd.Function):
    """y = op(x, W0) + b + k ⊙ op(D ⊙ x, ΔWˢ): SNELL with adapter dropout D and stochastic depth k.

    D is 0 with probability p, else 1 / (1 − p). The adapter branch sees a dropped-out x, so it cannot share
    the base layer's GEMM. What it avoids is the memory of an unfused branch: neither the dropped-out input
    (as large as x) nor the mask is saved; backward draws the mask again from its seed. Saved: x, the
    factors, τ and k, the same as the dropout-free path plus k. The 1 / (1 − p) is applied to the branch's
    output and to its incoming gradient, never to an x-sized tensor. ``sample_scale`` is k, broadcastable to
    y (None for no stochastic depth).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, coefficients, spec: SnellSpec, p: float, sample_scale):
        seed = _draw_seed() if p > 0.0 else None
        path = kernel_path(spec, x.device, a.shape[-1], x.dtype, a.dtype)
        with _without_autocast(x.device.type):
            update, tau = sparse_delta(spec, a, b, coefficients, path)
            update = update.reshape(spec.matrix_shape).to(x.dtype)
            dropped = x if seed is None else x * dropout_keep(x, p, seed)
            branch = layer_op(spec, dropped, update, None)
            del dropped, update
            base = weight_matrix(spec, weight).to(x.dtype)
            out = layer_op(spec, x, base, None if bias is None else bias.to(x.dtype))
            inverse_keep = 1.0 / keep_probability(p)
            if sample_scale is None:
                out.add_(branch, alpha=inverse_keep)
            else:
                out.addcmul_(branch, sample_scale.to(x.dtype), value=inverse_keep)
        ctx.spec, ctx.p, ctx.seed, ctx.path = spec, p, seed, path
        ctx.save_for_backward(x, weight, bias, a, b, coefficients, tau, sample_scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, a, b, coefficients, tau, sample_scale = ctx.saved_tensors
        spec: SnellSpec = ctx.spec
        need_x, need_w, need_bias, need_a, need_b, need_coef = ctx.needs_input_grad[:6]
        need_factors = need_a or need_b or need_coef
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_coef = None
        with _without_autocast(x.device.type):
            grad_out = grad_out.to(x.dtype)
            inverse_keep = 1.0 / keep_probability(ctx.p)
            if sample_scale is None:
                grad_branch = grad_out if ctx.seed is None else grad_out * inverse_keep
            else:
                grad_branch = grad_out * sample_scale.to(x.dtype).mul(inverse_keep)
            keep = None if ctx.seed is None else dropout_keep(x, ctx.p, ctx.seed)
            dropped = x if keep is None else x * keep
            grad_dropped, _, factor_grads = _backward_by_row_blocks(
                spec,
                dropped,
                None,
                a,
                b,
                coefficients,
                tau,
                grad_branch,
                need_x,
                False,
                need_factors,
                need_coef,
                ctx.path,
            )
            del dropped, grad_branch
            if need_x:
                grad_x = grad_dropped if keep is None else grad_dropped.mul_(keep)
                del keep
                _add_grad_input_(spec, x, weight_matrix(spec, weight).to(x.dtype), grad_out, grad_x)
            if need_w:
                grad_w = to_weight_layout(spec, _grad_matrix(spec, x, grad_out)).to(weight.dtype)
            if factor_grads is not None:
                grad_a, grad_b, grad_coef = _in_factor_layouts(factor_grads, a, b, coefficients)
            if need_bias:
                grad_bias = _bias_grad(spec, grad_out).to(bias.dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_coef, None, None, None
