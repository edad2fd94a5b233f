"""What every fused Triton pass shares (fused_triton.py, fused_triton_mixk.py): the kernels' operands, the tile
shape and launch options, and the per-tile arithmetic: one tile of ΔW rebuilt from A and B, its survivor factor,
its merge and its store.

Every entry of ΔW is the same sequence of IEEE operations on A[i], B[j] (and, for mixk, its column's statistics)
alone: element-wise, a static loop over the columns, ``sqrt_rn`` and ``div_rn``, launched with
``enable_fp_fusion=False`` so no multiply-add is contracted. Defining it once here is what makes every pass see
the same ΔW bit for bit, whatever the tile shape or launch.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path is used; fused_triton.available() warns once
    triton = None

MODE_CODES = {"reference": 0, "mask": 1, "soft": 2}  # the kernels' MODE
BLOCK_ROWS, BLOCK_COLS = 64, 64  # a tile of ΔW per program
# No FMA contraction: every pass must build ΔW with the same roundings (the interpreter ignores the option).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def factors(a: Tensor, b: Tensor, coefficients: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Aᵀ (G, r, n), B (G, m, r) and the coefficients, one row per group (G, K), contiguous float32: the kernels'
    operands. Coefficients shared by every group ((K,)) are repeated."""
    at = a.detach().to(torch.float32).transpose(-1, -2).contiguous()
    coef = coefficients.detach().to(torch.float32).expand(a.shape[0], -1).contiguous()
    return at, b.detach().to(torch.float32).contiguous(), coef


if triton is not None:

    @triton.jit
    def piece_distance(at_ptr, b_ptr, rows, cols, row_ok, col_ok, n, piece, RANK: tl.constexpr, WIDTH: tl.constexpr):
        """‖A_p[i] − B_p[j]‖ for the tile: squared differences summed over the piece's columns in order, sqrt_rn."""
        squares = tl.zeros((rows.shape[0], cols.shape[0]), tl.float32)
        for c in tl.static_range(WIDTH):
            column = piece * WIDTH + c
            a_c = tl.load(at_ptr + column * n + cols, mask=col_ok, other=0.0)
            b_c = tl.load(b_ptr + rows * RANK + column, mask=row_ok, other=0.0)
            diff = a_c[None, :] - b_c[:, None]
            squares = squares + diff * diff
        return tl.sqrt_rn(squares)

    @triton.jit
    def delta_tile(at_ptr, b_ptr, coef_ptr, rows, cols, row_ok, col_ok, n, RANK: tl.constexpr, PIECES: tl.constexpr):
        """The piecewise-linear D for the tile: Σ_p α_p·d_p, left to right, every entry from A[i] and B[j] alone."""
        width: tl.constexpr = RANK // PIECES
        delta = tl.load(coef_ptr) * piece_distance(at_ptr, b_ptr, rows, cols, row_ok, col_ok, n, 0, RANK, width)
        for p in tl.static_range(1, PIECES):
            distance = piece_distance(at_ptr, b_ptr, rows, cols, row_ok, col_ok, n, p, RANK, width)
            delta = delta + tl.load(coef_ptr + p) * distance
        return delta

    @triton.jit
    def inverse_gamma(coef_ptr, PIECES: tl.constexpr):
        """1/γ of mixk's coefficients (the P piecewise ones, then α, γ, β), correctly rounded."""
        return tl.math.div_rn(1.0, tl.load(coef_ptr + PIECES + 1))

    @triton.jit
    def mix_tile(delta, coef_ptr, stats_ptr, cols, col_ok, n, PIECES: tl.constexpr):
        """mixk from the tile's D: (ΔW = (D + s·α) + β, s) with s = exp(min(D·(1/γ) − M_i, 0))·(1/S_i), the softmax
        over each column's rows from its max M_i of D/γ (stats[0]) and reciprocal sum 1/S_i (stats[1]). The min is
        a no-op on the matrix's entries (M_i is the max of the same bits) and keeps a partial tile's padding rows
        finite."""
        col_max = tl.load(stats_ptr + cols, mask=col_ok, other=0.0)
        inverse_sum = tl.load(stats_ptr + n + cols, mask=col_ok, other=0.0)
        exponent = tl.minimum(delta * inverse_gamma(coef_ptr, PIECES) - col_max[None, :], 0.0)
        soft = tl.exp(exponent) * inverse_sum[None, :]
        return (delta + soft * tl.load(coef_ptr + PIECES)) + tl.load(coef_ptr + PIECES + 2), soft

    @triton.jit
    def weight_tile(
        at_ptr, b_ptr, coef_ptr, stats_ptr, rows, cols, row_ok, col_ok, n,
        RANK: tl.constexpr, PIECES: tl.constexpr, MIX: tl.constexpr,
    ):  # fmt: skip
        """ΔW for the tile: the piecewise-linear D, mixed (:func:`mix_tile`) for mixk."""
        delta = delta_tile(at_ptr, b_ptr, coef_ptr, rows, cols, row_ok, col_ok, n, RANK, PIECES)
        if MIX:
            delta, _ = mix_tile(delta, coef_ptr, stats_ptr, cols, col_ok, n, PIECES)
        return delta

    @triton.jit
    def _mode_scale(magnitude, tau, MODE: tl.constexpr):
        if MODE == 0:  # reference
            return tl.where(magnitude >= tau, magnitude, 0.0)
        elif MODE == 1:  # mask
            return tl.where(magnitude >= tau, 1.0, 0.0)
        else:  # soft
            return tl.maximum(magnitude - tau, 0.0)

    @triton.jit
    def survivor(delta, tau, MODE: tl.constexpr):
        """S with ΔWˢ = ΔW·S (sparsify.survivor_scale_); 1 in a group that keeps its dense ΔW, which τ = −inf marks
        (select_tau gives −inf there and nowhere else: any other τ is some |ΔW|)."""
        dense = tau == -float("inf")
        return tl.where(dense, 1.0, _mode_scale(tl.abs(delta), tl.where(dense, 0.0, tau), MODE))

    @triton.jit
    def gradient_scale(delta, tau, MODE: tl.constexpr):
        """S' = dΔWˢ/dΔW (sparsify.gradient_scale): S, or in the soft mode 2S + τ where S > 0; 1 where τ = −inf."""
        dense = tau == -float("inf")
        finite_tau = tl.where(dense, 0.0, tau)  # no inf − inf in a dense group's discarded lanes
        scale = _mode_scale(tl.abs(delta), finite_tau, MODE)
        if MODE == 2:
            scale = tl.where(scale > 0.0, 2.0 * scale + finite_tau, 0.0)
        return tl.where(dense, 1.0, scale)

    @triton.jit
    def merged_value(delta, tau, base_ptrs, mask, MODE: tl.constexpr, HAS_BASE: tl.constexpr):
        """W0 + ΔW·S (or ΔW·S), float32: the forward's merge and the backward's weight for dx share it."""
        sparse = delta * survivor(delta, tau, MODE)
        if HAS_BASE:
            return tl.load(base_ptrs, mask=mask, other=0.0).to(tl.float32) + sparse
        else:
            return sparse

    @triton.jit
    def store(ptrs, value, mask, KIND: tl.constexpr):
        """float32 (0), bf16 bits rounded to nearest even (1; ``ptrs`` to int16) or float16 (2)."""
        if KIND == 1:
            bits = value.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)
            tl.store(ptrs, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        elif KIND == 2:
            tl.store(ptrs, value.to(tl.float16), mask=mask)
        else:
            tl.store(ptrs, value, mask=mask)
