"""The fused SNELL autograd function: y = op(x, W0 + ΔWˢ) + b in one GEMM (or convolution).

Forward builds ΔW from the factors, selects τ, adds the sparsified update to W0 and runs the layer's own
op once; it saves only x, the factors and τ (W0 and b are parameters, already alive). Backward rebuilds
ΔWˢ with the saved τ (no second selection), runs the two GEMMs every trained layer needs (dx and
dW = gyᵀx) and sends dW through the sparsifier and the kernel to A and B. No m×n tensor lives between
forward and backward: that is where SNELL's memory goes in the reference layout.
"""

from __future__ import annotations

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
        out = self.weight_shape[0]
        return out, int(torch.Size(self.weight_shape[1:]).numel())


def sparse_delta(
    spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor, tau: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(ΔWˢ, τ, ΔW), each shaped (groups, m/groups, n), computed in at least float32.

    At sparsity 0 every mode keeps the dense ΔW (the reference code's behaviour) and τ is -inf.
    """
    compute = torch.promote_types(a.dtype, torch.float32)
    a, b, coefficients = a.to(compute), b.to(compute), coefficients.to(compute)
    m, n = spec.matrix_shape
    delta = kernels.kernel_delta(spec.kernel, a, b, coefficients, spec.num_pieces).reshape(
        spec.groups, m // spec.groups, n
    )
    if spec.sparsity == 0.0:
        return delta, delta.new_full((spec.groups, 1, 1), -torch.inf), delta
    if tau is None:
        tau = sparsify.threshold(delta, spec.sparsity)
    return sparsify.apply(delta, tau, spec.mode), tau, delta


def to_weight_layout(spec: SnellSpec, delta: Tensor) -> Tensor:
    """Turn a (groups, m/groups, n) update into the layout of the layer's weight."""
    m, n = spec.matrix_shape
    matrix = delta.reshape(m, n)
    return matrix.mT if spec.op == "linear_t" else matrix.reshape(spec.weight_shape)


def from_weight_layout(spec: SnellSpec, grad_weight: Tensor) -> Tensor:
    m, n = spec.matrix_shape
    matrix = grad_weight.mT if spec.op == "linear_t" else grad_weight.reshape(m, n)
    return matrix.reshape(spec.groups, m // spec.groups, n)


def layer_op(spec: SnellSpec, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The layer's own forward with a given weight (in the weight's layout)."""
    if spec.op == "linear":
        return F.linear(x, weight, bias)
    if spec.op == "linear_t":
        return F.linear(x, weight.mT, bias)
    return F.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.conv_groups)


def _grad_input(spec: SnellSpec, x: Tensor, weight: Tensor, grad_out: Tensor) -> Tensor:
    if spec.op == "linear":
        return grad_out.matmul(weight)
    if spec.op == "linear_t":
        return grad_out.matmul(weight.mT)
    return torch.nn.grad.conv2d_input(
        x.shape, weight, grad_out, spec.stride, spec.padding, spec.dilation, spec.conv_groups
    )


def _grad_weight(spec: SnellSpec, x: Tensor, grad_out: Tensor) -> Tensor:
    """dL/dW in the weight's layout."""
    if spec.op == "conv2d":
        return torch.nn.grad.conv2d_weight(
            x, spec.weight_shape, grad_out, spec.stride, spec.padding, spec.dilation, spec.conv_groups
        )
    gy = grad_out.reshape(-1, grad_out.shape[-1])
    xs = x.reshape(-1, x.shape[-1])
    return gy.mT.matmul(xs) if spec.op == "linear" else xs.mT.matmul(gy)


def _effective_weight(spec: SnellSpec, weight: Tensor | None, delta_s: Tensor, dtype: torch.dtype) -> Tensor:
    update = to_weight_layout(spec, delta_s)
    if weight is None:
        return update.to(dtype)
    return (weight.to(update.dtype) + update).to(dtype)


def _bias_grad(spec: SnellSpec, grad_out: Tensor) -> Tensor:
    if spec.op == "conv2d":
        return grad_out.sum((0, 2, 3))
    return grad_out.reshape(-1, grad_out.shape[-1]).sum(0)


class FusedSnell(torch.autograd.Function):
    """y = op(x, W0 + ΔWˢ(A, B)) + b, saving only x, A, B, the coefficients and τ for backward.

    ``weight`` may be None: then y = op(x, ΔWˢ), the adapter branch alone (used with adapter dropout).
    All arithmetic on ΔW is in float32 or wider; the layer op runs in x's dtype (autocast is resolved by
    the caller), like a plain layer under autocast.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, coefficients, spec: SnellSpec):
        with torch.autocast(x.device.type, enabled=False):
            delta_s, tau, _ = sparse_delta(spec, a, b, coefficients)
            w = _effective_weight(spec, weight, delta_s, x.dtype)
            del delta_s
            out = layer_op(spec, x, w, None if bias is None else bias.to(x.dtype))
        ctx.spec = spec
        ctx.save_for_backward(x, weight, bias, a, b, coefficients, tau)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, a, b, coefficients, tau = ctx.saved_tensors
        spec: SnellSpec = ctx.spec
        need_x, need_w, need_bias, need_a, need_b, need_coef = ctx.needs_input_grad[:6]
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_coef = None
        with torch.autocast(x.device.type, enabled=False):
            grad_out = grad_out.to(x.dtype)
            delta_s, _, delta = sparse_delta(spec, a, b, coefficients, tau)
            if need_x:
                w = _effective_weight(spec, weight, delta_s, x.dtype)
                grad_x = _grad_input(spec, x, w, grad_out)
                del w
            del delta_s
            if need_w or need_a or need_b or need_coef:
                grad_weight = _grad_weight(spec, x, grad_out)
                if need_w:
                    grad_w = grad_weight.to(weight.dtype)
                if need_a or need_b or need_coef:
                    grad_delta = from_weight_layout(spec, grad_weight).to(delta.dtype)
                    if spec.sparsity > 0.0:
                        grad_delta = sparsify.backward(delta, tau, spec.mode, grad_delta)
                    del delta
                    compute = grad_delta.dtype
                    m = spec.matrix_shape[0] // spec.groups
                    grad_a, grad_b, grad_coef = kernels.kernel_backward(
                        spec.kernel,
                        a.to(compute),
                        b.to(compute),
                        coefficients.to(compute),
                        grad_delta.reshape(*b.shape[:-2], m, -1),
                        spec.num_pieces,
                        need_coef,
                    )
                    grad_a, grad_b = grad_a.to(a.dtype), grad_b.to(b.dtype)
                    if grad_coef is not None:
                        grad_coef = grad_coef.to(coefficients.dtype)
            if need_bias:
                grad_bias = _bias_grad(spec, grad_out).to(bias.dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_coef, None
