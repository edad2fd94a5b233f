"""A SNELL layer seen as one (m, n) matrix: its static description, the views between the layer's weight and
that matrix, the blocks of rows ΔW is built in, and the layer's own op with its two gradient GEMMs.

Every implementation of the fused function (torch_path, fused_cpu_path, triton_path) works on these views.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor


def keeps_dense(kernel: str, mode: str, sparsity: float) -> bool:
    """Whether a matrix keeps its dense ΔW, with no selection: at sparsity 0, as the reference SNELL code does, except
    for mixk in the reference and soft modes, whose reference module (SNELLA) sparsifies at every ratio, 0 included.
    mixk in mask mode at sparsity 0 keeps every entry as it is: the authors' dense MixK module."""
    return sparsity == 0.0 and (kernel != "mixk" or mode == "mask")


@dataclass(frozen=True)
class SnellSpec:
    """Static description of one adapted layer (hashable, so torch.compile treats it as a constant).

    op: "linear" (weight (m, n)), "linear_t" (weight stored (n, m), transformers' Conv1D) or "conv2d"
    (weight (m, n/groups', kh, kw) seen as an (m, n·kh·kw/groups') matrix).
    groups: number of adapter groups stacked along the output dimension (3 for a split fused qkv).
    group_sparsity: one sparsity per group where they differ (set per layer by the sparsity allocator or a saved
    ``layer_sparsity``); empty when every group uses ``sparsity``. Use :meth:`sparsity_of`.
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
    group_sparsity: tuple[float, ...] = ()

    def sparsity_of(self, group: int) -> float:
        return self.group_sparsity[group] if self.group_sparsity else self.sparsity

    def dense(self, group: int) -> bool:
        """Whether group ``group`` keeps the dense ΔW (:func:`keeps_dense`)."""
        return keeps_dense(self.kernel, self.mode, self.sparsity_of(group))

    @property
    def whole_matrix(self) -> bool:
        """Whether ΔW must be built a whole group at a time (mixk's softmax couples the rows of a column)."""
        return self.kernel == "mixk"

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
BLOCK_ENTRIES = 1 << 20  # 4 MB of float32: a few blocks per ViT-B matrix, each fits in L3


def with_sparsities(spec: SnellSpec, sparsities: list[float] | tuple[float, ...]) -> SnellSpec:
    """``spec`` with one sparsity per adapter group (a single value when they are all equal)."""
    if len(sparsities) != spec.groups:
        raise ValueError(
            f"a layer with {spec.groups} adapter groups takes {spec.groups} sparsities, got {sparsities!r}"
        )
    uniform = all(s == sparsities[0] for s in sparsities)
    return replace(spec, sparsity=float(sparsities[0]), group_sparsity=() if uniform else tuple(map(float, sparsities)))


def group_coefficients(coefficients: Tensor, group: int) -> Tensor:
    """The kernel coefficients of adapter group ``group``: mixk's are (G, P + 3), one row per group; the other
    kernels' (K,) are shared by every group."""
    return coefficients[group] if coefficients.dim() == 2 else coefficients


def row_blocks(spec: SnellSpec, entries: int | None = None):
    groups, rows_per_group, n = spec.grouped_shape
    step = rows_per_group if spec.whole_matrix else max(1, (entries or BLOCK_ENTRIES) // n)
    for g in range(groups):
        for start in range(0, rows_per_group, step):
            yield g, slice(start, min(start + step, rows_per_group))


def grouped_factors(spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A as (G, n, r), B as (G, m/G, r) and the coefficients, in at least float32."""
    groups, rows_per_group, n = spec.grouped_shape
    compute = torch.promote_types(a.dtype, torch.float32)
    return (
        a.to(compute).reshape(groups, n, -1),
        b.to(compute).reshape(groups, rows_per_group, -1),
        coefficients.to(compute),
    )


def base_blocks(spec: SnellSpec, weight: Tensor | None) -> Tensor | None:
    """W0 as (G, m/G, n) (a view when the layout allows it), or None for the adapter branch alone."""
    return None if weight is None else weight_matrix(spec, weight).reshape(spec.grouped_shape)


def layer_op(spec: SnellSpec, x: Tensor, matrix: Tensor, bias: Tensor | None) -> Tensor:
    """The layer's own forward with its weight given as the (m, n) matrix."""
    if spec.op == "conv2d":
        weight = matrix.reshape(spec.weight_shape)
        return F.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.conv_groups)
    return F.linear(x, matrix, bias)


def grad_input(spec: SnellSpec, x: Tensor, matrix: Tensor, grad_out: Tensor) -> Tensor:
    if spec.op == "conv2d":
        weight = matrix.reshape(spec.weight_shape)
        return torch.nn.grad.conv2d_input(
            x.shape, weight, grad_out, spec.stride, spec.padding, spec.dilation, spec.conv_groups
        )
    return grad_out.matmul(matrix)


def add_grad_input_(spec: SnellSpec, x: Tensor, matrix: Tensor, grad_out: Tensor, into: Tensor) -> None:
    """into += dL/dx of op(x, matrix), without a second x-sized buffer for a linear layer."""
    if spec.op == "conv2d":
        into.add_(grad_input(spec, x, matrix, grad_out))
    else:
        into.view(-1, into.shape[-1]).addmm_(grad_out.reshape(-1, grad_out.shape[-1]), matrix)


def matrix_grad(spec: SnellSpec, x: Tensor, grad_out: Tensor) -> Tensor:
    """dL/dW as the (m, n) matrix."""
    if spec.op == "conv2d":
        grad = torch.nn.grad.conv2d_weight(
            x, spec.weight_shape, grad_out, spec.stride, spec.padding, spec.dilation, spec.conv_groups
        )
        return grad.reshape(spec.matrix_shape)
    return grad_out.reshape(-1, grad_out.shape[-1]).mT.matmul(x.reshape(-1, x.shape[-1]))


class WeightGradRows:
    """dW = gyᵀx of a layer, handed out by blocks of rows to the fused backward passes.

    A convolution's dW is computed whole when anything needs it (its GEMM does not split by output rows) and
    sliced; a linear layer's is one GEMM per block, written into :attr:`matrix` too when dW itself is wanted.
    """

    def __init__(self, spec: SnellSpec, x: Tensor, grad_out: Tensor, keep: bool, needed: bool) -> None:
        groups, self.rows_per_group, n = spec.grouped_shape
        self.conv = spec.op == "conv2d"
        self.matrix: Tensor | None = None
        if needed and self.conv:
            self.matrix = matrix_grad(spec, x, grad_out).reshape(groups, self.rows_per_group, n)
        elif keep:
            self.matrix = x.new_empty((groups, self.rows_per_group, n))
        if not self.conv:
            self.x_rows, self.grad_rows = x.reshape(-1, n), grad_out.reshape(-1, groups * self.rows_per_group)

    def block(self, group: int, rows: slice) -> Tensor:
        """dW's rows ``rows`` of adapter group ``group``, (rows, n) in x's dtype."""
        if self.conv:
            return self.matrix[group, rows]
        first = group * self.rows_per_group + rows.start
        block = self.grad_rows[:, first : first + rows.stop - rows.start].mT.matmul(self.x_rows)
        if self.matrix is not None:
            self.matrix[group, rows] = block
        return block


def bias_grad(spec: SnellSpec, grad_out: Tensor) -> Tensor:
    if spec.op == "conv2d":
        return grad_out.sum((0, 2, 3))
    return grad_out.reshape(-1, grad_out.shape[-1]).sum(0)


def without_autocast(device_type: str) -> AbstractContextManager:
    """Autocast off inside the function: dtypes are chosen explicitly (no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()
