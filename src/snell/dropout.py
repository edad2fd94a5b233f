"""SNELL with adapter dropout: the dropped-out input is never saved, backward draws the mask again from its seed."""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from snell.dispatch import implementation, kernel_path
from snell.function import in_factor_layouts, sparse_delta
from snell.spec import (
    SnellSpec,
    add_grad_input_,
    bias_grad,
    layer_op,
    matrix_grad,
    to_weight_layout,
    weight_matrix,
    without_autocast,
)


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
    y (None for no stochastic depth). ``weight`` may be None (then ``bias`` must be too): y = k ⊙ op(D ⊙ x, ΔWˢ),
    the adapter branch alone, as in :class:`snell.function.FusedSnell` (a peft layer's further active adapters).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, coefficients, spec: SnellSpec, p: float, sample_scale):
        seed = _draw_seed() if p > 0.0 else None
        path = kernel_path(spec, x.device, a.shape[-1], x.dtype, a.dtype)
        with without_autocast(x.device.type):
            update, tau = sparse_delta(spec, a, b, coefficients, path)
            update = update.reshape(spec.matrix_shape).to(x.dtype)
            dropped = x if seed is None else x * dropout_keep(x, p, seed)
            branch = layer_op(spec, dropped, update, None)
            del dropped, update
            inverse_keep = 1.0 / keep_probability(p)
            if weight is None:
                out = branch.mul_(inverse_keep if sample_scale is None else sample_scale.to(x.dtype) * inverse_keep)
            else:
                base = weight_matrix(spec, weight).to(x.dtype)
                out = layer_op(spec, x, base, None if bias is None else bias.to(x.dtype))
                if sample_scale is None:
                    out.add_(branch, alpha=inverse_keep)
                else:
                    out.addcmul_(branch, sample_scale.to(x.dtype), value=inverse_keep)
        ctx.spec, ctx.p, ctx.seed, ctx.path = spec, p, seed, path
        ctx.save_for_backward(x, weight, bias, a, b, coefficients, tau, sample_scale)
        # F.linear of a 3-D input with a bias returns a view of its 2-D GEMM, and autograd refuses in-place edits of
        # a custom Function's view outputs (Longformer divides its query projection in place): the same storage,
        # as a plain tensor.
        return out.detach()

    @staticmethod
    @once_differentiable  # its backward is no autograd graph: a second derivative is refused, not wrong
    def backward(ctx, grad_out):
        x, weight, bias, a, b, coefficients, tau, sample_scale = ctx.saved_tensors
        spec: SnellSpec = ctx.spec
        need_x, need_w, need_bias, need_a, need_b, need_coef = ctx.needs_input_grad[:6]
        need_factors = need_a or need_b or need_coef
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_coef = None
        with without_autocast(x.device.type):
            grad_out = grad_out.to(x.dtype)
            inverse_keep = 1.0 / keep_probability(ctx.p)
            if sample_scale is None:
                grad_branch = grad_out if ctx.seed is None else grad_out * inverse_keep
            else:
                grad_branch = grad_out * sample_scale.to(x.dtype).mul(inverse_keep)
            keep = None if ctx.seed is None else dropout_keep(x, ctx.p, ctx.seed)
            dropped = x if keep is None else x * keep
            grad_dropped, _, factor_grads = implementation(ctx.path).backward(
                spec, dropped, None, a, b, coefficients, tau, grad_branch, need_x, False, need_factors, need_coef
            )
            del dropped, grad_branch
            if need_x:
                grad_x = grad_dropped if keep is None else grad_dropped.mul_(keep)
                del keep
                if weight is not None:
                    add_grad_input_(spec, x, weight_matrix(spec, weight).to(x.dtype), grad_out, grad_x)
            if need_w:
                grad_w = to_weight_layout(spec, matrix_grad(spec, x, grad_out)).to(weight.dtype)
            if factor_grads is not None:
                grad_a, grad_b, grad_coef = in_factor_layouts(factor_grads, a, b, coefficients)
            if need_bias:
                grad_bias = bias_grad(spec, grad_out).to(bias.dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_coef, None, None, None
