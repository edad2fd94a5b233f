"""Rounding-error bounds for a fused path (numba or Triton) against the float64 naive formula.

A fused path builds ΔW in float32 with its own summation order, so its last bits differ from the torch path's
and from float64. Its values and gradients are compared with the float64 naive formula evaluated on the
path's own survivors and τ, within the standard bound γ_K·M: M is the same computation on absolute values
(every term's magnitude, so cancellation cannot hide an error) and γ_K = K·u/(1 − K·u) with u = 2^-24 and K
the longest chain of float32 roundings (GEMM depths plus the per-entry operations). The bound is worst case
and holds for any summation order, so for any vector width, tile shape and thread count.
"""

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from naive import naive_kernel

U32 = 2.0**-24


def gamma(k: int) -> float:
    return k * U32 / (1 - k * U32)


def _matrix(spec, weight):
    """The base weight as the (m, n) matrix the adapter updates (a Conv1D's is stored transposed)."""
    return weight.mT if spec.op == "linear_t" else weight.reshape(spec.matrix_shape)


def naive_with_bound(spec, x, weight, bias, a, b, coef, keep, tau):
    """float64 plain autograd: y, the absolute-value computation M that bounds y's rounding error, and |W|'s bound."""
    m, n = spec.matrix_shape
    a_g = a.reshape(spec.groups, n, -1)
    b_g = b.reshape(spec.groups, m // spec.groups, -1)
    delta = naive_kernel("piecewise_linear", a_g, b_g, coef, 2)
    magnitude = delta.abs()
    if spec.sparsity == 0:
        sparse = delta
    elif spec.mode == "mask":
        sparse = delta * keep
    elif spec.mode == "reference":
        sparse = delta * magnitude.detach() * keep
    else:
        sparse = delta * (magnitude - tau) * keep
    # D = Σ_p |α_p|·d_p >= |ΔW| and >= τ: ΔWˢ's rounding error is at most a few u of D (mask) or D² (else).
    pieces = naive_kernel("piecewise_linear", a_g.detach(), b_g.detach(), coef.detach().abs(), 2)
    d_bound = pieces if spec.mode == "mask" or spec.sparsity == 0 else pieces * (pieces + tau.clamp_min(0))
    w = _matrix(spec, weight) + sparse.reshape(m, n)
    w_abs = _matrix(spec, weight.abs()) + d_bound.reshape(m, n)
    if spec.op != "conv2d":
        return F.linear(x, w, bias), F.linear(x.abs(), w_abs, bias.abs()), w_abs
    shape = spec.weight_shape
    y = F.conv2d(x, w.reshape(shape), bias, spec.stride, spec.padding)
    y_abs = F.conv2d(x.abs(), w_abs.reshape(shape), bias.abs(), spec.stride, spec.padding)
    return y, y_abs, w_abs


def abs_gradient_scale(spec, inputs, keep, tau, grad, leaf):
    """A bound on Σ|terms| of one gradient entry. For x, W0 and the bias it is the gradient of the
    absolute-value forward M. For A, B and the coefficients, each term of dA_p[i] = Σ_j w_p[j,i]·(a_i − b_j)
    is at most |w_p[j,i]|·(|a_i| + |b_j|) with |w_p| = |α_p|·|g|·S'/d_p, where the kernels form
    a_i·Σw − Σw·b_j (so 1/d_p enters the bound) and g = gyᵀx itself carries γ·|gy|ᵀ|x|."""
    x, weight, bias, a, b, coef = (t.double() for t in inputs)
    m, n = spec.matrix_shape
    absolute = [t.abs().requires_grad_() for t in (x, weight, bias)]
    _, y_abs, _ = naive_with_bound(spec, *absolute, a, b, coef, keep, tau)
    y_abs.backward(grad.abs())
    if leaf is inputs[0]:
        return absolute[0].grad
    if leaf is inputs[1]:
        return absolute[1].grad
    if leaf is inputs[2]:
        return absolute[2].grad
    a_g, b_g = a.reshape(spec.groups, n, -1), b.reshape(spec.groups, m // spec.groups, -1)
    if spec.op != "conv2d":
        g_abs = grad.abs().reshape(-1, m).T @ x.abs().reshape(-1, n)
    else:
        g_abs = torch.nn.grad.conv2d_weight(x.abs(), spec.weight_shape, grad.abs(), spec.stride, spec.padding)
    g_abs = g_abs.reshape(spec.groups, m // spec.groups, n)
    delta = naive_kernel("piecewise_linear", a_g, b_g, coef, 2)
    if spec.sparsity == 0:
        slope = torch.ones_like(delta)
    else:
        slope = {"mask": keep, "reference": delta.abs() * keep, "soft": (3 * delta.abs() + tau.abs()) * keep}[spec.mode]
    q = g_abs * slope
    width = a.shape[-1] // 2
    bound_a, bound_b, bound_c = torch.zeros_like(a_g), torch.zeros_like(b_g), torch.zeros(2, dtype=torch.float64)
    for p in range(2):
        cols = slice(p * width, (p + 1) * width)
        dist = torch.cdist(b_g[..., cols], a_g[..., cols])
        w = torch.where(dist > 0, coef[p].abs() * q / dist.clamp_min(1e-300), 0)
        bound_a[..., cols] = a_g[..., cols].abs() * w.sum(-2).unsqueeze(-1) + (w.mT @ b_g[..., cols].abs())
        bound_b[..., cols] = b_g[..., cols].abs() * w.sum(-1).unsqueeze(-1) + (w @ a_g[..., cols].abs())
        bound_c[p] = (q * dist).sum()
    if leaf is inputs[3]:
        return bound_a.reshape(a.shape) + 1e-300
    if leaf is inputs[4]:
        return bound_b.reshape(b.shape) + 1e-300
    return bound_c


class snell_kernels:
    """Context manager setting SNELL_KERNELS."""

    def __init__(self, value):
        self.value = value

    def __enter__(self):
        self.mp = pytest.MonkeyPatch()
        self.mp.setenv("SNELL_KERNELS", self.value)

    def __exit__(self, *exc):
        self.mp.undo()


@contextmanager
def torch_threads(count):
    """torch's (and so the fused kernels') thread count set to ``count`` inside, given back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
