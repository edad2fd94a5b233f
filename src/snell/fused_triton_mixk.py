"""mixk's column passes on Triton (ΔW = D + α·softmax(D/γ) + β, the softmax over each column's rows): what the
softmax couples across a whole column, reduced before the tile-by-tile passes of :mod:`snell.fused_triton` need it.

Each program owns a tile of columns and walks down all the group's rows in order, so its sums have one fixed
order: no float atomics, the same bits on every run. Both passes rebuild D and ΔW with
:mod:`snell.fused_triton_tiles`, as every other pass does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snell import fused_triton_tiles as tiles
from snell.fused_triton_tiles import BLOCK_COLS, BLOCK_ROWS, LAUNCH_OPTIONS, MODE_CODES, factors, on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path is used; fused_triton.available() warns once
    triton = None

if triton is not None:

    @triton.jit(do_not_specialize=["m", "n"])  # one compile for every shape
    def _column_stats(
        at_ptr, b_ptr, coef_ptr, stats_ptr, m, n,
        RANK: tl.constexpr, PIECES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        """stats (G, 2, n): each column's max M of D·(1/γ) and 1/S, S = Σ_j exp(D·(1/γ) − M), over the group's
        rows tile by tile (online: the running sum is rescaled when the max grows)."""
        group = tl.program_id(1)
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        col_ok = cols < n
        at_ptr += group * RANK * n
        b_ptr += group * m * RANK
        coef_ptr += group * (PIECES + 3)
        stats_ptr += group * 2 * n
        inverse_gamma = tiles.inverse_gamma(coef_ptr, PIECES)
        col_max = tl.full((BN,), -float("inf"), tl.float32)
        total = tl.zeros((BN,), tl.float32)
        for first in range(0, m, BM):
            rows = first + tl.arange(0, BM)
            row_ok = rows < m
            z = tiles.delta_tile(at_ptr, b_ptr, coef_ptr, rows, cols, row_ok, col_ok, n, RANK, PIECES) * inverse_gamma
            z = tl.where(row_ok[:, None], z, -float("inf"))
            new_max = tl.maximum(col_max, tl.max(z, axis=0))
            total = total * tl.exp(col_max - new_max) + tl.sum(tl.exp(z - new_max[None, :]), axis=0)
            col_max = new_max
        tl.store(stats_ptr + cols, col_max, mask=col_ok)
        tl.store(stats_ptr + n + cols, tl.math.div_rn(1.0, total), mask=col_ok)

    @triton.jit(do_not_specialize=["m", "n"])  # one compile for every shape
    def _column_grads(
        at_ptr, b_ptr, coef_ptr, stats_ptr, tau_ptr, grad_ptr, soft_sums_ptr, grad_sums_ptr, m, n,
        MODE: tl.constexpr, RANK: tl.constexpr, PIECES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        """For one group: per column Σ_j gΔ·s (the softmax backward's c_i, and α's gradient) and Σ_j gΔ (β's), with
        gΔ = dW·S' the gradient w.r.t. ΔW (grad: the group's whole dW, (m, n))."""
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        col_ok = cols < n
        tau = tl.load(tau_ptr)
        soft_sums = tl.zeros((BN,), tl.float32)
        grad_sums = tl.zeros((BN,), tl.float32)
        for first in range(0, m, BM):
            rows = first + tl.arange(0, BM)
            row_ok = rows < m
            mask = row_ok[:, None] & col_ok[None, :]
            delta = tiles.delta_tile(at_ptr, b_ptr, coef_ptr, rows, cols, row_ok, col_ok, n, RANK, PIECES)
            weight, soft = tiles.mix_tile(delta, coef_ptr, stats_ptr, cols, col_ok, n, PIECES)
            g = tl.load(grad_ptr + rows[:, None] * n + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.where(mask, g * tiles.gradient_scale(weight, tau, MODE), 0.0)
            soft_sums += tl.sum(g * soft, axis=0)
            grad_sums += tl.sum(g, axis=0)
        tl.store(soft_sums_ptr + cols, soft_sums, mask=col_ok)
        tl.store(grad_sums_ptr + cols, grad_sums, mask=col_ok)


@torch.compiler.disable  # Triton launches: torch.compile runs them as they are
def column_stats(a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int) -> Tensor:
    """(G, 2, n) float32 on the factors' device: per group and column, the max of D/γ and the reciprocal sum of the
    softmax's exponentials, which every later pass mixes its tiles of ΔW with. a: (G, n, r), b: (G, m, r);
    coefficients: the P + 3 of mixk, (P + 3,) or one row per group."""
    at, b, coef = factors(a, b, coefficients)
    groups, rank, n = at.shape
    stats = torch.empty(groups, 2, n, device=at.device)
    with on_device(at):
        _column_stats[(triton.cdiv(n, BLOCK_COLS), groups)](
            at, b, coef, stats, b.shape[1], n, RANK=rank, PIECES=num_pieces, BM=BLOCK_ROWS, BN=BLOCK_COLS,
            **LAUNCH_OPTIONS,
        )  # fmt: skip
    return stats


@torch.compiler.disable  # Triton launches: torch.compile runs them as they are
def column_grads(
    at: Tensor, b: Tensor, coef: Tensor, stats: Tensor, tau: Tensor, mode: str, grad: Tensor
) -> tuple[Tensor, Tensor]:
    """(Σ_j gΔ·s, Σ_j gΔ), each (n,) float32, for one group from the kernels' operands (at (r, n), b (m, r), coef
    (P + 3,), stats (2, n), tau (1, 1), all contiguous float32) and its whole dW ``grad`` (m, n), contiguous."""
    rank, n = at.shape
    soft_sums, grad_sums = torch.empty(n, device=at.device), torch.empty(n, device=at.device)
    with on_device(at):
        _column_grads[(triton.cdiv(n, BLOCK_COLS),)](
            at, b, coef, stats, tau, grad, soft_sums, grad_sums, b.shape[0], n, MODE=MODE_CODES[mode], RANK=rank,
            PIECES=coef.shape[0] - 3, BM=BLOCK_ROWS, BN=BLOCK_COLS, **LAUNCH_OPTIONS,
        )  # fmt: skip
    return soft_sums, grad_sums
