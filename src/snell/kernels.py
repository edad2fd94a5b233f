"""Kernelized merges ΔW[j, i] = κ(A[i], B[j]) and their hand-written gradients.

Factors may carry leading batch dimensions (one per adapter group, e.g. q, k and v of a fused projection):
A has shape (..., n, r), B has shape (..., m, r) and ΔW has shape (..., m, n). Every kernel is written
with GEMMs plus element-wise passes over ΔW, so forward and backward cost O(m·n·r) with no (m, n, r)
tensor. The backward recomputes what it needs from A and B, so nothing of size m×n is kept.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _piece(t: Tensor, piece: int, width: int) -> Tensor:
    return t[..., piece * width : (piece + 1) * width]


def _squared_distances(b: Tensor, a: Tensor) -> Tensor:
    """‖b_j − a_i‖² for every pair, (..., m, n), via one GEMM (clamped at 0 against cancellation)."""
    d2 = torch.matmul(b, a.mT).mul_(-2.0)
    d2.add_(b.square().sum(-1, keepdim=True)).add_(a.square().sum(-1).unsqueeze(-2))
    return d2.clamp_min_(0.0)


def _pairwise_grads(g: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. a and b of a loss whose derivative w.r.t. (a_i − b_j) is g[j, i]·(a_i − b_j).

    Σ_j g[j, i](a_i − b_j) = a_i·Σ_j g[j, i] − (gᵀ b)_i, and symmetrically Σ_i g[j, i](b_j − a_i) for b,
    so two GEMMs suffice.
    """
    grad_a = a * g.sum(-2).unsqueeze(-1) - torch.matmul(g.mT, b)
    grad_b = b * g.sum(-1, keepdim=True) - torch.matmul(g, a)
    return grad_a, grad_b


def kernel_delta(kernel: str, a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int = 1) -> Tensor:
    """The dense kernelized update ΔW with shape (..., m, n)."""
    if kernel == "linear":
        return torch.matmul(b, a.mT).mul_(coefficients[0])
    if kernel == "piecewise_linear":
        width = a.shape[-1] // num_pieces
        delta = None
        for p in range(num_pieces):
            dist = _squared_distances(_piece(b, p, width), _piece(a, p, width)).sqrt_().mul_(coefficients[p])
            delta = dist if delta is None else delta.add_(dist)
        return delta
    alpha, beta, gamma = coefficients[0], coefficients[1], coefficients[2]
    if kernel == "rbf":
        return _squared_distances(b, a).mul_(-beta).exp_().mul_(alpha).add_(gamma)
    if kernel == "sigmoid":
        return torch.matmul(b, a.mT).mul_(beta).sigmoid_().mul_(alpha).add_(gamma)
    raise ValueError(f"unknown kernel {kernel!r}")


def kernel_backward(
    kernel: str,
    a: Tensor,
    b: Tensor,
    coefficients: Tensor,
    grad_delta: Tensor,
    num_pieces: int = 1,
    need_coefficients: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients (dA, dB, dcoefficients) of Σ grad_delta ⊙ ΔW.

    The distance kernel's derivative at a_i = b_j is undefined; we use the zero subgradient there so
    the result is always finite.
    """
    g = grad_delta
    grad_coef = torch.zeros_like(coefficients) if need_coefficients else None
    if kernel == "linear":
        if need_coefficients:
            grad_coef[0] = (g * torch.matmul(b, a.mT)).sum()
        return torch.matmul(g.mT, b).mul_(coefficients[0]), torch.matmul(g, a).mul_(coefficients[0]), grad_coef
    if kernel == "piecewise_linear":
        width = a.shape[-1] // num_pieces
        grads_a, grads_b = [], []
        for p in range(num_pieces):
            a_p, b_p = _piece(a, p, width), _piece(b, p, width)
            dist = _squared_distances(b_p, a_p).sqrt_()
            if need_coefficients:
                grad_coef[p] = (g * dist).sum()
            # ∂‖a−b‖/∂a = (a − b)/‖a − b‖; zero where the distance is zero.
            scaled = torch.where(dist > 0, g / dist, 0.0).mul_(coefficients[p])
            grad_a, grad_b = _pairwise_grads(scaled, a_p, b_p)
            grads_a.append(grad_a)
            grads_b.append(grad_b)
        return torch.cat(grads_a, -1), torch.cat(grads_b, -1), grad_coef
    alpha, beta = coefficients[0], coefficients[1]
    if kernel == "rbf":
        d2 = _squared_distances(b, a)
        e = d2.mul(-beta).exp_()
        if need_coefficients:
            grad_coef[0] = (g * e).sum()
            grad_coef[1] = -(g * e * d2).sum() * alpha
            grad_coef[2] = g.sum()
        # ∂ΔW/∂(a − b) = −2αβ·e·(a − b)
        scaled = (g * e).mul_(-2.0 * alpha * beta)
        grad_a, grad_b = _pairwise_grads(scaled, a, b)
        return grad_a, grad_b, grad_coef
    if kernel == "sigmoid":
        dot = torch.matmul(b, a.mT)
        s = dot.mul(beta).sigmoid_()
        if need_coefficients:
            grad_coef[0] = (g * s).sum()
            grad_coef[2] = g.sum()
        inner = (g * s * (1.0 - s)).mul_(alpha)  # ∂/∂(β a·b)
        if need_coefficients:
            grad_coef[1] = (inner * dot).sum()
        inner.mul_(beta)
        return torch.matmul(inner.mT, b), torch.matmul(inner, a), grad_coef
    raise ValueError(f"unknown kernel {kernel!r}")
