"""The fused SNELL autograd function: y = op(x, W0 + ΔWˢ) + b in one GEMM (or convolution).

Forward builds ΔW from the factors, selects τ, adds the sparsified update to W0 and runs the layer's own
op once; it saves only x, the factors and τ (W0 and b are parameters, already alive; the fused paths add
mixk's column statistics, 2n floats a matrix). Backward rebuilds
ΔWˢ with the saved τ (no second selection), runs the two GEMMs every trained layer needs (dx and
dW = gyᵀx) and sends dW through the sparsifier and the kernel to A and B. No m×n tensor lives between
forward and backward: that is where SNELL's memory goes in the reference layout.

Everything is done on the weight seen as an (m, n) matrix: a Linear's weight, a Conv1D's weight
transposed, a Conv2d's weight flattened to (out, in·kh·kw / groups).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from snell.dispatch import implementation, kernel_path
from snell.spec import SnellSpec, bias_grad, layer_op, to_weight_layout, without_autocast


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
        with without_autocast(x.device.type):
            merged, tau = implementation(path).merged_and_tau(spec, a, b, coefficients, weight, x.dtype)
            matrix = merged.reshape(spec.matrix_shape).to(x.dtype)
            del merged
            out = layer_op(spec, x, matrix, None if bias is None else bias.to(x.dtype))
        ctx.spec, ctx.path = spec, path
        ctx.save_for_backward(x, weight, bias, a, b, coefficients, tau)
        # F.linear of a 3-D input with a bias returns a view of its 2-D GEMM, and autograd refuses in-place edits of
        # a custom Function's view outputs (Longformer divides its query projection in place): the same storage,
        # as a plain tensor.
        return out.detach()

    @staticmethod
    @once_differentiable  # its backward is no autograd graph: a second derivative is refused, not wrong
    def backward(ctx, grad_out):
        x, weight, bias, a, b, coefficients, tau = ctx.saved_tensors
        spec: SnellSpec = ctx.spec
        need_x, need_w, need_bias, need_a, need_b, need_coef = ctx.needs_input_grad[:6]
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_coef = None
        with without_autocast(x.device.type):
            grad_out = grad_out.to(x.dtype)
            need_factors = need_a or need_b or need_coef
            grad_x, grad_matrix, factor_grads = implementation(ctx.path).backward(
                spec, x, weight, a, b, coefficients, tau, grad_out, need_x, need_w, need_factors, need_coef
            )
            if need_w:
                grad_w = to_weight_layout(spec, grad_matrix).to(weight.dtype)
            if factor_grads is not None:
                grad_a, grad_b, grad_coef = in_factor_layouts(factor_grads, a, b, coefficients)
            if need_bias:
                grad_bias = bias_grad(spec, grad_out).to(bias.dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_coef, None


def in_factor_layouts(factor_grads, a: Tensor, b: Tensor, coefficients: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dA, dB, dcoefficients or None) in the shapes and dtypes of the factors themselves."""
    grad_a, grad_b, grad_coef = factor_grads
    grad_coef = None if grad_coef is None else grad_coef.to(coefficients.dtype)
    return grad_a.reshape(a.shape).to(a.dtype), grad_b.reshape(b.shape).to(b.dtype), grad_coef


def sparse_delta(
    spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor, path: str | None = None
) -> tuple[Tensor, Tensor]:
    """(ΔWˢ as (G, m/G, n), τ); ``path`` as :func:`kernel_path` chose (by default, for the factors alone)."""
    path = path or kernel_path(spec, a.device, a.shape[-1], a.dtype)
    compute = torch.promote_types(a.dtype, torch.float32)
    return implementation(path).merged_and_tau(spec, a, b, coefficients, None, compute)
