"""Direct, slow transcriptions of SNELL's formulas that plain autograd differentiates: the ground truth."""

import torch


def naive_kernel(kernel, a, b, coefficients, num_pieces=1):
    """ΔW[..., j, i] = κ(a_i, b_j) from explicit differences (no GEMM tricks)."""
    diff = a.unsqueeze(-3) - b.unsqueeze(-2)  # (..., m, n, r)
    if kernel == "linear":
        return coefficients[0] * (b @ a.mT)
    if kernel == "mixk":  # SNELLA: D + α·softmax(D/γ) over the output dimension (rows) + β
        d = naive_kernel("piecewise_linear", a, b, coefficients[:num_pieces], num_pieces)
        alpha, gamma, beta = coefficients[num_pieces:]
        return d + alpha * torch.softmax(d / gamma, dim=-2) + beta
    if kernel == "piecewise_linear":
        width = a.shape[-1] // num_pieces
        total = 0
        for p in range(num_pieces):
            piece = diff[..., p * width : (p + 1) * width]
            total = total + coefficients[p] * piece.square().sum(-1).sqrt()
        return total
    alpha, beta, gamma = coefficients
    if kernel == "rbf":
        return alpha * torch.exp(-beta * diff.square().sum(-1)) + gamma
    return alpha * torch.sigmoid(beta * (b @ a.mT)) + gamma


def naive_sparsify(delta, sparsity, mode, dense_at_zero=True):
    """Keep the round((1-s)·N) largest |ΔW| of each matrix (last two dims; at least one below s = 1), per the three
    modes; at s = 0 the dense ΔW unless ``dense_at_zero`` is False (mixk: SNELLA's module sparsifies at every ratio)."""
    if sparsity == 0 and dense_at_zero:
        return delta
    flat = delta.detach().abs().flatten(-2)
    k = 0 if sparsity == 1 else max(1, round((1 - sparsity) * flat.shape[-1]))  # at least one below s = 1
    if k == 0:  # s = 1: nothing kept
        return delta * 0
    tau = flat.topk(k, dim=-1).values[..., -1:].unsqueeze(-1)
    magnitude = delta.abs()
    keep = magnitude.detach() >= tau
    if mode == "mask":
        return delta * keep
    if mode == "reference":
        return delta * magnitude.detach() * keep
    return delta * torch.clamp(magnitude - tau, min=0)


def reference_code_delta(a_pieces, b_pieces, sparsity, alphas=(0.1, -0.1)):
    """The reference code's formula: cdist kernel, torch.quantile threshold, ΔW·|ΔW| survivors.

    a_pieces: (P, n, r/P), b_pieces: (P, m, r/P), as the reference code stores them.
    """
    delta = sum(alpha * torch.cdist(b_pieces[p], a_pieces[p]) for p, alpha in enumerate(alphas))
    if sparsity == 0:
        return delta
    magnitude = delta.abs()
    tau = torch.quantile(magnitude.flatten(), sparsity)
    return delta * magnitude * (magnitude >= tau)
