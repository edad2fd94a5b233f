"""Kernelized merges ΔW[j, i] = κ(A[i], B[j]) and their hand-written gradients.

Factors may carry leading batch dimensions (one per adapter group, e.g. q, k and v of a fused projection):
A has shape (..., n, r), B has shape (..., m, r) and ΔW has shape (..., m, n). Every kernel is written
with GEMMs plus a few in-place element-wise passes over ΔW, so forward and backward cost O(m·n·r) with
no (m, n, r) tensor. Element-wise passes over m×n matrices are what a kernel costs beyond its GEMMs, so
the code below counts them: the distance kernels get ‖a − b‖² from a single GEMM of augmented factors.

"mixk" is SNELLA's mixed kernel (Shen et al., arXiv 2510.24037; the authors' ``MixK`` and ``SNELLA`` modules in
``model/vision_transformer_timm.py``): with D the piecewise-linear merge above,

    ΔW = D + α·softmax(D / γ) + β,

the softmax taken over the output dimension (ΔW's rows j, for each input column i: the authors' ``dim=-1`` of
their (in, out) matrix). Its coefficients are the P piecewise ones followed by (α, γ, β). The softmax couples
every row of a column, so a mixk ΔW is built and differentiated a whole matrix at a time, never by blocks of
rows. It is max-subtracted (exp ≤ 1, column sums ≥ 1), so it neither overflows nor divides by zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _piece(t: Tensor, piece: int, width: int) -> Tensor:
    return t[..., piece * width : (piece + 1) * width]


def _squared_distances(b: Tensor, a: Tensor, out: Tensor | None = None) -> Tensor:
    """‖b_j − a_i‖² for every pair, (..., m, n): one GEMM of [b, ‖b‖², 1]·[−2a, 1, ‖a‖²]ᵀ, clamped at 0."""
    b_aug = torch.cat([b, b.square().sum(-1, keepdim=True), torch.ones_like(b[..., :1])], -1)
    a_aug = torch.cat([a * -2.0, torch.ones_like(a[..., :1]), a.square().sum(-1, keepdim=True)], -1)
    return torch.matmul(b_aug, a_aug.mT, out=out).clamp_min_(0.0)


def _factor_products(g: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(gᵀb, g·a): what every kernel's backward sends to the factors, shapes (..., n, k) and (..., m, k).

    Computed as (bᵀg)ᵀ and (aᵀgᵀ)ᵀ: with the m×n matrix as the right operand, the GEMM streams it row by row
    into a k-row result, several times faster on the CPU than gᵀb, which reads g down its columns.
    """
    return torch.matmul(b.mT, g).mT, torch.matmul(a.mT, g.mT).mT


def _with_ones(t: Tensor) -> Tensor:
    return torch.cat([t, torch.ones_like(t[..., :1])], -1)


def _pairwise_grads(g: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. a and b of a loss whose derivative w.r.t. (a_i − b_j) is g[j, i]·(a_i − b_j).

    Σ_j g[j, i](a_i − b_j) = a_i·Σ_j g[j, i] − (gᵀ b)_i, and symmetrically Σ_i g[j, i](b_j − a_i) for b.
    A column of ones appended to each factor makes the same two GEMMs give the sums of g as well.
    """
    by_column, by_row = _factor_products(g, _with_ones(a), _with_ones(b))
    grad_a = a * by_column[..., -1:] - by_column[..., :-1]
    grad_b = b * by_row[..., -1:] - by_row[..., :-1]
    return grad_a, grad_b


def _piece_distance(a: Tensor, b: Tensor, piece: int, width: int, out: Tensor | None = None) -> Tensor:
    return _squared_distances(_piece(b, piece, width), _piece(a, piece, width), out).sqrt_()


def piece_distances(a: Tensor, b: Tensor, num_pieces: int) -> list[Tensor]:
    """‖A_p[i] − B_p[j]‖ for each of the P contiguous column blocks: what the piecewise kernel is made of."""
    width = a.shape[-1] // num_pieces
    return [_piece_distance(a, b, p, width) for p in range(num_pieces)]


def _column_softmax(delta: Tensor, gamma: Tensor) -> Tensor:
    """softmax(ΔW / γ) over the rows of each column (the output dimension), max-subtracted, as a new tensor."""
    z = delta / gamma
    e = z.sub_(z.amax(-2, keepdim=True)).exp_()
    return e.div_(e.sum(-2, keepdim=True))


def kernel_delta(
    kernel: str,
    a: Tensor,
    b: Tensor,
    coefficients: Tensor,
    num_pieces: int = 1,
    pieces: list[Tensor] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The dense kernelized update ΔW with shape (..., m, n), written into ``out`` if given.

    For piecewise_linear, ``pieces`` may hold :func:`piece_distances` already computed (and kept, e.g.
    for the backward); otherwise they are computed here one at a time and consumed in place. The values
    do not depend on ``pieces`` or ``out``: the same products in the same order either way.
    """
    if kernel == "linear":
        return torch.matmul(b, a.mT, out=out).mul_(coefficients[0])
    if kernel == "mixk":
        delta = kernel_delta("piecewise_linear", a, b, coefficients[:num_pieces], num_pieces, pieces, out)
        alpha, gamma, beta = coefficients[num_pieces:]
        return delta.add_(_column_softmax(delta, gamma).mul_(alpha)).add_(beta)
    if kernel == "piecewise_linear":
        width = a.shape[-1] // num_pieces
        if pieces is None:
            delta = _piece_distance(a, b, 0, width, out).mul_(coefficients[0])
            for p in range(1, num_pieces):
                delta.addcmul_(_piece_distance(a, b, p, width), coefficients[p])
            return delta
        delta = torch.mul(pieces[0], coefficients[0], out=out)
        for p in range(1, num_pieces):
            delta.addcmul_(pieces[p], coefficients[p])
        return delta
    alpha, beta, gamma = coefficients[0], coefficients[1], coefficients[2]
    # α·exp(x) + γ and α·σ(t) + γ written as α·expm1(x) + (α + γ) and (α/2)·tanh(t/2) + (γ + α/2): the same values,
    # without the cancellation of exp(x) − 1 and σ(t) − 1/2 near 0, where the default coefficients start every
    # entry (σ(t) − 1/2 in float32 kept about 4 of its 24 bits there, and the top-k then broke ties that are not)
    if kernel == "rbf":
        return _squared_distances(b, a, out).mul_(-beta).expm1_().mul_(alpha).add_(alpha + gamma)
    if kernel == "sigmoid":
        return torch.matmul(b, a.mT, out=out).mul_(beta / 2).tanh_().mul_(alpha / 2).add_(gamma + alpha / 2)
    raise ValueError(f"unknown kernel {kernel!r}")


def _divide_distances_(g: Tensor, d: Tensor) -> Tensor:
    """g / d into ``d``, with 0 where d = 0 (the zero subgradient of ‖a − b‖ at a = b, as d = +inf gives it) and a
    non-finite quotient wherever g is not finite: an fp16 overflow must reach the loss scaler, which skips the step
    on an inf or NaN gradient (zeroing every non-finite quotient hid it, and the step was taken)."""
    return torch.div(g, d.masked_fill_(d == 0, math.inf), out=d)


def kernel_backward(
    kernel: str,
    a: Tensor,
    b: Tensor,
    coefficients: Tensor,
    grad_delta: Tensor,
    num_pieces: int = 1,
    need_coefficients: bool = False,
    pieces: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients (dA, dB, dcoefficients) of Σ grad_delta ⊙ ΔW.

    The distance kernel's derivative at a_i = b_j is undefined; we use the zero subgradient there so
    the result is always finite. ``pieces``: the piecewise distances, if the caller still has them; they
    are consumed (each is overwritten by its quotient g / distance, so no m×n temporary is allocated).
    """
    if kernel == "mixk":
        return _mixk_backward(a, b, coefficients, grad_delta, num_pieces, need_coefficients, pieces)
    g = grad_delta
    grad_coef = torch.zeros_like(coefficients) if need_coefficients else None
    if kernel == "linear":
        if need_coefficients:
            grad_coef[0] = (g * torch.matmul(b, a.mT)).sum()
        grad_a, grad_b = _factor_products(g, a, b)
        return grad_a * coefficients[0], grad_b * coefficients[0], grad_coef
    if kernel == "piecewise_linear":
        width = a.shape[-1] // num_pieces
        distances = pieces if pieces is not None else piece_distances(a, b, num_pieces)
        grads_a, grads_b = [], []
        for p, dist in enumerate(distances):
            if need_coefficients:
                grad_coef[p] = (g * dist).sum()
            # ∂‖a − b‖/∂a = (a − b)/‖a − b‖; the coefficient scales the small results, not the m×n matrix.
            quotient = _divide_distances_(g, dist)
            grad_a, grad_b = _pairwise_grads(quotient, _piece(a, p, width), _piece(b, p, width))
            grads_a.append(grad_a.mul_(coefficients[p]))
            grads_b.append(grad_b.mul_(coefficients[p]))
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
        grad_a, grad_b = _pairwise_grads(e.mul_(g), a, b)
        scale = -2.0 * alpha * beta
        return grad_a.mul_(scale), grad_b.mul_(scale), grad_coef
    if kernel == "sigmoid":
        dot = torch.matmul(b, a.mT)
        s = dot.mul(beta).sigmoid_()
        if need_coefficients:
            grad_coef[0] = (g * s).sum()
            grad_coef[2] = g.sum()
        inner = s.sub_(s.square()).mul_(g)  # g·σ'(β a·b)
        if need_coefficients:
            grad_coef[1] = (inner * dot).sum() * alpha
        scale = alpha * beta
        grad_a, grad_b = _factor_products(inner, a, b)
        return grad_a * scale, grad_b * scale, grad_coef
    raise ValueError(f"unknown kernel {kernel!r}")


def _mixk_backward(
    a: Tensor,
    b: Tensor,
    coefficients: Tensor,
    g: Tensor,
    num_pieces: int,
    need_coefficients: bool,
    pieces: list[Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Backward of ΔW = D + α·S + β, S = softmax(D / γ) over rows, then of the piecewise D.

    With u = g ⊙ S and c its column sums, softmax's backward is ∂L/∂(D/γ) = α·(u − S ⊙ c); hence
    ∂L/∂D = g + α·(u − S ⊙ c) / γ, ∂L/∂α = Σ u, ∂L/∂β = Σ g and ∂L/∂γ = −Σ α·(u − S ⊙ c) ⊙ D / γ².
    """
    piecewise = coefficients[:num_pieces]
    alpha, gamma, _ = coefficients[num_pieces:]
    if pieces is None:
        pieces = piece_distances(a, b, num_pieces)
    delta = kernel_delta("piecewise_linear", a, b, piecewise, num_pieces, pieces)
    softmax = _column_softmax(delta, gamma)
    u = g * softmax
    column_sums = u.sum(-2, keepdim=True)
    dz = u.sub_(softmax.mul_(column_sums)).mul_(alpha)  # ∂L/∂(D/γ); the softmax is consumed
    del softmax
    grad_mix = None
    if need_coefficients:
        grad_gamma = -(dz * delta).sum() / gamma.square()
        grad_mix = torch.stack([column_sums.sum(), grad_gamma, g.sum()])
    del delta
    grad_d = dz.div_(gamma).add_(g)
    grad_a, grad_b, grad_piecewise = kernel_backward(
        "piecewise_linear", a, b, piecewise, grad_d, num_pieces, need_coefficients, pieces
    )
    grad_coef = torch.cat([grad_piecewise, grad_mix]) if need_coefficients else None
    return grad_a, grad_b, grad_coef
