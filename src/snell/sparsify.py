"""Competition-based sparsification: keep the largest-magnitude entries of ΔW, with no stored indices.

The threshold τ is the k-th largest |ΔW| of each matrix (k = round((1 − s)·N)), found by selection, not
by a sort or torch.quantile (which refuses more than 2^24 entries and anything but fp32/fp64). It stays
a tensor on ΔW's device, so no host synchronisation happens on an accelerator. τ is one scalar per
matrix: the forward saves it and the backward reuses it instead of selecting again.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

MODES = ("reference", "mask", "soft")

# Sample-then-select is used on the CPU for matrices above this many entries.
_BAND_MIN_NUMEL = 1 << 18
_SAMPLE_SIZE = 1 << 16


@functools.cache
def _sample_positions(n: int) -> Tensor:
    """Fixed random sample positions for a matrix of n entries: drawn once per size, read-only afterwards, so
    concurrent threads share no generator state and a forward allocates no index tensor. ΔW changes every
    step, so a fixed set of positions is still a fresh sample of it; the answer is exact either way."""
    return torch.randint(n, (_SAMPLE_SIZE,), generator=torch.Generator().manual_seed(n))


def keep_count(numel: int, sparsity: float) -> int:
    """Number of entries a matrix of ``numel`` entries keeps at ``sparsity`` (fraction zeroed)."""
    return round((1.0 - sparsity) * numel)


def _kth_largest_sampled(values: Tensor, k: int) -> Tensor | None:
    """Exact k-th largest of a flat CPU tensor from a small random sample and one pass over the data.

    A sample quantile gives a cut safely beyond the answer; the entries on the answer's side of the cut
    (about the kept fraction plus a 1 % margin) are the candidates. A second sample quantile, as far on the
    other side of the answer, narrows them to a band of about 1.4 % of the entries, and only the band goes
    through ``kthvalue``, which copies its input and allocates int64 indices: over all the candidates that
    was most of the selection's time. The band is exact for any second bound (it holds the candidates'
    smallest or largest entries, and is used only when the answer's rank falls inside it). When k is more
    than half the entries, the same is done from below. Returns None in the rare case the cut lands on the
    wrong side, so the caller can fall back to a full selection.
    """
    n = values.numel()
    sample = values[_sample_positions(n)]
    q = 1.0 - k / n  # the answer's quantile
    margin = 6.0 * math.sqrt(max(q * (1.0 - q), 1.0 / _SAMPLE_SIZE) / _SAMPLE_SIZE) + 2.0 / _SAMPLE_SIZE
    low_rank = max(int((q - margin) * _SAMPLE_SIZE), 1)
    high_rank = min(math.ceil((q + margin) * _SAMPLE_SIZE), _SAMPLE_SIZE)
    if k <= n // 2:
        cut = torch.kthvalue(sample, low_rank).values
        candidates = values[values > cut]  # holds the k largest whenever it has at least k entries
        rank = candidates.numel() - k + 1  # the answer's rank from below among the candidates
        if rank < 1:
            return None
        upper = sample[sample > cut]
        upper_rank = high_rank - (_SAMPLE_SIZE - upper.numel())  # the sample's high_rank-th smallest, in upper
        if 1 <= upper_rank <= upper.numel():
            band = candidates[candidates <= torch.kthvalue(upper, upper_rank).values]  # the smallest candidates
            if rank <= band.numel():
                candidates = band
        return torch.kthvalue(candidates, rank).values
    rank = n - k + 1
    cut = torch.kthvalue(sample, high_rank).values
    candidates = values[values < cut]  # holds the n − k + 1 smallest whenever it has that many entries
    if candidates.numel() < rank:
        return None
    lower = sample[sample < cut]
    if low_rank <= lower.numel():
        band = candidates[candidates >= torch.kthvalue(lower, low_rank).values]  # the largest candidates
        below = candidates.numel() - band.numel()
        if rank > below:
            candidates, rank = band, rank - below
    return torch.kthvalue(candidates, rank).values


def kth_largest(values: Tensor, k: int) -> Tensor:
    """Per row of ``values`` (shape (G, N)), the k-th largest entry, shape (G, 1).

    ``k = 0`` gives +inf (nothing is kept). Ties at the threshold are all kept.
    """
    groups, n = values.shape
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0:
        return values.new_full((groups, 1), math.inf)
    if values.device.type == "cpu" and n >= _BAND_MIN_NUMEL:
        rows = []
        for row in values:
            tau = _kth_largest_sampled(row, k)
            rows.append(tau if tau is not None else torch.kthvalue(row, n - k + 1).values)
        return torch.stack(rows).unsqueeze(-1)
    return torch.kthvalue(values, n - k + 1, dim=-1, keepdim=True).values


def magnitude_threshold(magnitude: Tensor, sparsity: float) -> Tensor:
    """τ per matrix for |ΔW| of shape (G, m, n): entries with |ΔW| >= τ survive. Shape (G, 1, 1)."""
    flat = magnitude.flatten(1)
    return kth_largest(flat, keep_count(flat.shape[1], sparsity)).unsqueeze(-1)


def threshold(delta: Tensor, sparsity: float) -> Tensor:
    """τ per matrix for ΔW of shape (G, m, n)."""
    return magnitude_threshold(delta.detach().abs(), sparsity)


def survivor_scale_(magnitude: Tensor, tau: Tensor, mode: str) -> Tensor:
    """The factor S with ΔWˢ = ΔW ⊙ S, computed in place over ``magnitude`` (= |ΔW|, consumed).

    reference: S = |ΔW| on survivors (ΔW·|ΔW|); mask: S = 1 on survivors; soft: S = max(|ΔW| − τ, 0).
    In the reference and mask modes S is also the factor the gradient w.r.t. ΔW gets (|ΔW| is detached).
    """
    if mode == "reference":
        return magnitude.masked_fill_(magnitude < tau, 0.0)
    if mode == "mask":
        return (magnitude >= tau).to(magnitude.dtype)
    if mode == "soft":
        return magnitude.sub_(tau).clamp_min_(0.0)
    raise ValueError(f"sparsify_mode must be one of {MODES}, got {mode!r}")


def gradient_scale(scale: Tensor, tau: Tensor, mode: str) -> Tensor:
    """dΔWˢ/dΔW element-wise, from the survivor factor S of :func:`survivor_scale_`.

    reference and mask: S itself. soft: ∂(ΔW·(|ΔW| − τ))/∂ΔW = 2|ΔW| − τ = 2S + τ above τ, with τ treated
    as a constant (it is a selection, not a differentiable function of one entry).
    """
    if mode == "soft":
        return torch.where(scale > 0, scale * 2.0 + tau, 0.0)
    return scale


def apply(delta: Tensor, tau: Tensor, mode: str) -> Tensor:
    """The sparsified update ΔWˢ (a new tensor). ``tau`` broadcasts against ``delta``."""
    return delta * survivor_scale_(delta.abs(), tau, mode)


def backward(delta: Tensor, tau: Tensor, mode: str, grad: Tensor) -> Tensor:
    """Gradient w.r.t. the dense ΔW given the gradient w.r.t. ΔWˢ (dropped entries get zero)."""
    return grad * gradient_scale(survivor_scale_(delta.abs(), tau, mode), tau, mode)
