"""The fused SNELL autograd function: y = op(x, W0 + ΔWˢ) + b in one GEMM (or convolution).

Forward builds ΔW from the factors, selects τ, adds the sparsified update to W0 and runs the layer's own
op once; it saves only x, the factors and τ (W0 and b are parameters, already alive). No m×n tensor lives
between forward and backward: that is where SNELL's memory goes in the reference layout. Backward rebuilds
W0 + ΔWˢ for dx, with the saved τ (no second selection), in one of two designs:

- Survivor path (CPU, s > 0): backward rebuilds ΔW once, block by block exactly as forward did, for
  W0 + ΔWˢ and to find the survivors |ΔW| >= τ again. It takes dW = gyᵀx only there (a sampled GEMM: a
  tenth of the dense flops at s = 0.9) and runs the kernel's gradient per survivor from the gathered rows
  of A and B, so the dense dW GEMM and the dense kernel backward are gone.
- Dense row-block path (s = 0, and accelerators, where reading the survivor count would make the host
  wait for the device): backward rebuilds ΔW block by block of rows, runs dW = gyᵀx per block and sends it
  through the sparsifier and the kernel, with no m×n temporary but the merged weight.

Everything is done on the weight seen as an (m, n) matrix: a Linear's weight, a Conv1D's weight
transposed, a Conv2d's weight flattened to (out, in·kh·kw / groups).
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from snell import kernels, sparsify


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
# and allocates no m×n temporary but the merged weight for dx. Forward uses the same blocks so that the
# recomputed ΔW is bit-identical and the saved τ selects exactly the same survivors.
_BLOCK_ENTRIES = 1 << 20  # 4 MB of float32: a few blocks per ViT-B matrix, each fits in L3


def _row_blocks(spec: SnellSpec):
    groups, rows_per_group, n = spec.grouped_shape
    step = max(1, _BLOCK_ENTRIES // n)
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
        delta[g, rows] = kernels.kernel_delta(spec.kernel, a_g[g], b_g[g, rows], coefficients, spec.num_pieces)
    return delta


def survivor_scale(spec: SnellSpec, delta: Tensor, tau: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
    """(S, τ) with ΔWˢ = ΔW ⊙ S; S is None at sparsity 0, where every mode keeps the dense ΔW (as the
    reference code does) and τ is -inf."""
    if spec.sparsity == 0.0:
        return None, delta.new_full((spec.groups, 1, 1), -torch.inf)
    magnitude = delta.abs()
    if tau is None:
        tau = sparsify.magnitude_threshold(magnitude, spec.sparsity)
    return sparsify.survivor_scale_(magnitude, tau, spec.mode), tau


def sparse_delta(
    spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor, tau: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(ΔWˢ as (G, m/G, n), τ)."""
    delta = dense_delta(spec, a, b, coefficients)
    scale, tau = survivor_scale(spec, delta, tau)
    return (delta if scale is None else delta.mul_(scale)), tau


def _effective_matrix(spec: SnellSpec, weight: Tensor | None, delta: Tensor, scale: Tensor | None) -> Tensor:
    """W0 + ΔW ⊙ S as an (m, n) matrix in ΔW's dtype, in one pass (or ΔW ⊙ S alone without W0)."""
    if weight is None:
        update = delta if scale is None else delta * scale
        return update.reshape(spec.matrix_shape)
    base = weight_matrix(spec, weight).to(delta.dtype).reshape(spec.grouped_shape)
    merged = base + delta if scale is None else torch.addcmul(base, delta, scale)
    return merged.reshape(spec.matrix_shape)


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


def _uses_survivors(spec: SnellSpec, x: Tensor) -> bool:
    """The survivor path: sparsified layers on the CPU, where the gradient is only needed on the
    surviving entries and reading their number costs nothing. Accelerators keep the dense row-block
    path, which never waits for the host."""
    return spec.sparsity > 0.0 and x.device.type == "cpu"


@dataclass
class _Survivors:
    """The entries of ΔW that the selection kept, as CSR of the (m, n) matrix."""

    row_offsets: Tensor  # (m + 1,) int32
    rows: Tensor  # (nnz,) int64, sorted
    columns: Tensor  # (nnz,) int64

    @classmethod
    def from_flat_index(cls, spec: SnellSpec, index: Tensor) -> _Survivors:
        m, n = spec.matrix_shape
        rows = index.div(n, rounding_mode="floor")
        return cls(_offsets(rows, m), rows, index - rows * n)

    def group(self, spec: SnellSpec) -> Tensor:
        return self.rows.div(spec.grouped_shape[1], rounding_mode="floor")

    def factor_rows(self, spec: SnellSpec) -> Tensor:
        """For each survivor, its row of A stacked as (G·n, r): the column plus the group's offset."""
        return self.columns + self.group(spec) * spec.grouped_shape[2]


def _offsets(sorted_index: Tensor, length: int) -> Tensor:
    """CSR offsets (length + 1, int32) of a sorted index."""
    offsets = sorted_index.new_zeros(length + 1, dtype=torch.int32)
    offsets[1:] = torch.bincount(sorted_index, minlength=length).cumsum(0)
    return offsets


def _csr(offsets: Tensor, columns: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # CSR tensors warn that they are a beta feature
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(offsets, columns.to(offsets.dtype), values, shape)


def _sum_by_index(index: Tensor, length: int, rows: Tensor, offsets: Tensor | None = None) -> Tensor:
    """out[i] = Σ rows[k] over k with index[k] = i, as a CSR product (much faster than index_add_ here).
    ``offsets``: the CSR offsets of ``index`` when it is already sorted."""
    if offsets is None:
        order = torch.sort(index, stable=True).indices
        offsets = _offsets(index[order], length)
    else:
        order = torch.arange(index.numel(), device=index.device)
    return _csr(offsets, order, rows.new_ones(order.numel()), (length, order.numel())) @ rows


def _paired_factors(spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor, survivors: _Survivors):
    """(A's row, B's row) for every survivor, both (nnz, r), and the coefficients, in at least float32."""
    a_g, b_g, coefficients = _grouped_factors(spec, a, b, coefficients)
    rank = a_g.shape[-1]
    a_rows = a_g.reshape(-1, rank).index_select(0, survivors.factor_rows(spec))
    return a_rows, b_g.reshape(-1, rank).index_select(0, survivors.rows), coefficients


def _sampled_grad_matrix(spec: SnellSpec, x: Tensor, grad_out: Tensor, survivors: _Survivors) -> Tensor:
    """dL/dW = gyᵀx at the survivors only (a sampled GEMM), for linear ops.

    torch's CPU sampled_addmm is fastest with CSR rows along the longer side of W, a row-major first
    factor and a column-major second one; handing it other layouts makes it copy them more slowly.
    """
    m, n = spec.matrix_shape
    compute = torch.promote_types(x.dtype, torch.float32)  # sampled_addmm has no half-precision kernel
    x_rows = x.reshape(-1, n).to(compute)
    grad_rows = grad_out.reshape(-1, m).to(compute)
    nnz = survivors.columns.numel()
    if m >= n:
        pattern = _csr(survivors.row_offsets, survivors.columns, x_rows.new_zeros(nnz), (m, n))
        return torch.sparse.sampled_addmm(
            pattern, grad_rows.mT.contiguous(), x_rows.mT.contiguous().mT, beta=0.0
        ).values()
    order = torch.sort(survivors.columns, stable=True).indices
    pattern = _csr(_offsets(survivors.columns[order], n), survivors.rows[order], x_rows.new_zeros(nnz), (n, m))
    by_column = torch.sparse.sampled_addmm(pattern, x_rows.mT.contiguous(), grad_rows.mT.contiguous().mT, beta=0.0)
    return by_column.values().new_empty(nnz).index_copy_(0, order, by_column.values())


def _backward_on_survivors(ctx, spec, x, weight, bias, a, b, coefficients, tau, grad_out):
    """Backward of the survivor path. ΔW is rebuilt as forward built it (same blocks, so bit for bit) to
    find the survivors with the saved τ and to rebuild W0 + ΔWˢ for dx; the gradient w.r.t. ΔW is then
    taken only at the survivors and sent through the sparsifier and the kernel for those entries alone.
    The steps run one after another so that their temporaries never coexist."""
    need_x, need_w, need_bias, need_a, need_b, need_coef = ctx.needs_input_grad[:6]
    need_factors = need_a or need_b or need_coef
    grad_x = grad_w = grad_bias = grad_a = grad_b = grad_coef = None
    with _without_autocast(x.device.type):
        grad_out = grad_out.to(x.dtype)
        delta = dense_delta(spec, a, b, coefficients)
        magnitude = delta.abs()
        survivors = _Survivors.from_flat_index(spec, (magnitude >= tau).flatten().nonzero().squeeze(1))
        scale = sparsify.survivor_scale_(magnitude, tau, spec.mode)
        if need_x:
            merged = _effective_matrix(spec, weight, delta, scale).to(x.dtype)
            grad_x = _grad_input(spec, x, merged, grad_out)
            del merged
        factor = scale.flatten()[survivors.rows * spec.matrix_shape[1] + survivors.columns]
        del delta, magnitude, scale
        grad_update = None
        if need_w or (need_factors and spec.op == "conv2d"):
            grad_matrix = _grad_matrix(spec, x, grad_out)
            grad_w = to_weight_layout(spec, grad_matrix).to(weight.dtype) if need_w else None
            grad_update = grad_matrix[survivors.rows, survivors.columns]
            del grad_matrix
        elif need_factors:
            grad_update = _sampled_grad_matrix(spec, x, grad_out, survivors)
        if need_factors:
            tau_each = tau.flatten()[survivors.group(spec)]
            grad_values = grad_update.to(factor.dtype).mul_(sparsify.gradient_scale(factor, tau_each, spec.mode))
            paired = _paired_factors(spec, a, b, coefficients, survivors)
            grad_a, grad_b, grad_coef = _factor_grads(spec, survivors, paired, grad_values, need_coef)
            grad_a = grad_a.reshape(a.shape).to(a.dtype) if need_a else None
            grad_b = grad_b.reshape(b.shape).to(b.dtype) if need_b else None
            grad_coef = grad_coef.to(coefficients.dtype) if need_coef else None
        if need_bias:
            grad_bias = _bias_grad(spec, grad_out).to(bias.dtype)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_coef, None


def _factor_grads(spec, survivors, paired, grad_values, need_coef):
    """(dA as (G·n, r), dB as (m, r), dcoef or None) from the gradient w.r.t. ΔW at the survivors."""
    groups, rows_per_group, n = spec.grouped_shape
    grad_a_rows, grad_b_rows, grad_coef = kernels.paired_backward(
        spec.kernel, *paired, grad_values, spec.num_pieces, need_coef
    )
    grad_a = _sum_by_index(survivors.factor_rows(spec), groups * n, grad_a_rows)
    if grad_b_rows is None:  # a distance kernel: each pair's dB is minus its dA
        grad_b_rows, sign = grad_a_rows, -1.0
    else:
        sign = 1.0
    grad_b = _sum_by_index(survivors.rows, groups * rows_per_group, grad_b_rows, survivors.row_offsets)
    return grad_a, grad_b.mul_(sign), grad_coef


class FusedSnell(torch.autograd.Function):
    """y = op(x, W0 + ΔWˢ(A, B)) + b, saving only x, A, B, the coefficients and τ for backward.

    ``weight`` may be None: then y = op(x, ΔWˢ), the adapter branch alone (used with adapter dropout).
    All arithmetic on ΔW is in float32 or wider; the layer op runs in x's dtype (autocast is resolved by
    the caller), like a plain layer under autocast.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, coefficients, spec: SnellSpec):
        with _without_autocast(x.device.type):
            delta = dense_delta(spec, a, b, coefficients)
            scale, tau = survivor_scale(spec, delta)
            matrix = _effective_matrix(spec, weight, delta, scale).to(x.dtype)
            del delta, scale
            out = layer_op(spec, x, matrix, None if bias is None else bias.to(x.dtype))
        ctx.spec = spec
        ctx.save_for_backward(x, weight, bias, a, b, coefficients, tau)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, a, b, coefficients, tau = ctx.saved_tensors
        spec: SnellSpec = ctx.spec
        if _uses_survivors(spec, x):
            return _backward_on_survivors(ctx, spec, x, weight, bias, a, b, coefficients, tau, grad_out)
        need_x, need_w, need_bias, need_a, need_b, need_coef = ctx.needs_input_grad[:6]
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_coef = None
        with _without_autocast(x.device.type):
            grad_out = grad_out.to(x.dtype)
            merged, grad_matrix, factor_grads = _backward_by_row_blocks(
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
            )
            if need_x:
                grad_x = _grad_input(spec, x, merged.reshape(spec.matrix_shape), grad_out)
            if need_w:
                grad_w = to_weight_layout(spec, grad_matrix).to(weight.dtype)
            if factor_grads is not None:
                grad_a, grad_b, grad_coef = factor_grads
                grad_a, grad_b = grad_a.reshape(a.shape).to(a.dtype), grad_b.reshape(b.shape).to(b.dtype)
                grad_coef = grad_coef.to(coefficients.dtype) if need_coef else None
            if need_bias:
                grad_bias = _bias_grad(spec, grad_out).to(bias.dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_coef, None


def _backward_by_row_blocks(
    spec, x, weight, a, b, coefficients, tau, grad_out, need_x, need_w, need_factors, need_coef
):
    """(merged W0 + ΔWˢ in x's dtype or None, dL/dW or None, (dA, dB, dcoef) or None), block by block.

    Every row j of ΔW depends only on B[j] and all of A, so ΔWˢ, dW = gyᵀx, the sparsifier's gradient and
    the kernel's backward can be done for a block of rows at a time; dA sums over blocks.
    """
    groups, rows_per_group, n = spec.grouped_shape
    a_g, b_g, coefficients = _grouped_factors(spec, a, b, coefficients)
    compute = a_g.dtype
    need_grad_matrix = need_w or need_factors
    base = None if weight is None else weight_matrix(spec, weight).reshape(groups, rows_per_group, n)
    merged = x.new_empty((groups, rows_per_group, n)) if need_x else None
    grad_matrix = None
    if need_grad_matrix and spec.op == "conv2d":
        grad_matrix = _grad_matrix(spec, x, grad_out).reshape(groups, rows_per_group, n)
    elif need_w:
        grad_matrix = x.new_empty((groups, rows_per_group, n))
    if spec.op != "conv2d":
        x_rows, grad_rows = x.reshape(-1, n), grad_out.reshape(-1, groups * rows_per_group)
    grad_a = torch.zeros_like(a_g) if need_factors else None
    grad_b = torch.empty_like(b_g) if need_factors else None
    grad_coef = torch.zeros_like(coefficients)
    keep_pieces = need_factors and spec.kernel == "piecewise_linear"
    for g, rows in _row_blocks(spec):
        b_block = b_g[g, rows]
        pieces = kernels.piece_distances(a_g[g], b_block, spec.num_pieces) if keep_pieces else None
        delta = kernels.kernel_delta(spec.kernel, a_g[g], b_block, coefficients, spec.num_pieces, pieces)
        scale = None
        if spec.sparsity > 0.0:
            scale = sparsify.survivor_scale_(delta.abs(), tau[g], spec.mode)
        if need_x:
            update = delta if scale is None else delta * scale
            merged[g, rows] = update if base is None else update.add_(base[g, rows])
        if not need_grad_matrix:
            continue
        if spec.op == "conv2d":
            grad_block = grad_matrix[g, rows]
        else:
            first = g * rows_per_group + rows.start
            grad_block = grad_rows[:, first : first + b_block.shape[0]].mT.matmul(x_rows)
            if need_w:
                grad_matrix[g, rows] = grad_block
        if need_factors:
            grad_delta = grad_block.to(compute)
            if scale is not None:
                grad_delta = grad_delta * sparsify.gradient_scale(scale, tau[g], spec.mode)
            block_a, block_b, block_coef = kernels.kernel_backward(
                spec.kernel, a_g[g], b_block, coefficients, grad_delta, spec.num_pieces, need_coef, pieces
            )
            grad_a[g] += block_a
            grad_b[g, rows] = block_b
            if need_coef:
                grad_coef += block_coef
    factor_grads = (grad_a, grad_b, grad_coef) if need_factors else None
    return merged, grad_matrix, factor_grads
