"""Fused Triton kernels for the piecewise-linear and mixk kernels: ΔW is rebuilt tile by tile from A and B, never
stored (the per-tile arithmetic: :mod:`snell.fused_triton_tiles`; mixk's column passes:
:mod:`snell.fused_triton_mixk`).

Passes, each a launch over (row tiles, column tiles, groups) that rebuilds its tiles of ΔW:

0. mixk only (ΔW = D + α·softmax(D/γ) + β, the softmax over each column's rows): each column's max of D/γ and
   reciprocal sum of the softmax, in a fixed order (:func:`snell.fused_triton_mixk.column_stats`). Every later pass
   mixes its tiles with these statistics, so all of them see the same ΔW.
1. τ by radix select on the float32 bits of |ΔW| (non-negative floats order like their bit patterns): four
   passes of 8 bits. A pass histograms the next digit of the entries whose higher digits equal the prefix
   found so far (``tl.histogram``, then one integer ``tl.atomic_add`` of the 256 counts per program: exact,
   whatever the order the programs run in); torch ops on the device pick the digit and the count still to
   skip, per group (each its own k). Prefix and count stay device tensors the next pass reads, so nothing waits
   for the host. After the fourth pass the prefix is the bit pattern of the k-th largest |ΔW| itself: exact, ties
   all kept. A group that keeps its dense ΔW gets τ = −inf, which every pass reads as S = 1.
2. The merge pass writes W0 + ΔWˢ (or ΔWˢ alone) in the layer's dtype.
3. Backward, per block of rows of dW = gyᵀx (a cuBLAS GEMM by the caller; mixk's whole group at once, after its
   column pass of the softmax's Σ_j g·s): one pass rebuilds ΔW, writes the block of the merged weight for dx and
   reduces w_p = α_p·g·S'/d_p over each tile into per-tile partial sums (rows for dB, columns for dA, the tile's
   totals for the coefficients); torch sums the partials in a fixed order. No float atomics: the gradients are
   deterministic.

bf16 results are rounded to nearest even with integer ops (the interpreter's own cast truncates), so they match
torch's conversion everywhere. Coefficients are one row per group ((G, P) or mixk's (G, P + 3)).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from snell import fused_triton_mixk as mixk
from snell import fused_triton_tiles as tiles
from snell.fallback import warn_once
from snell.fused_triton_tiles import BLOCK_COLS, BLOCK_ROWS, LAUNCH_OPTIONS, MODE_CODES, factors, on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path is used; available() warns once
    triton = None

_BINS = 256  # one 8-bit digit per radix pass
_SHIFTS = (24, 16, 8, 0)  # most significant digit first; |ΔW|'s sign bit is 0, so the top digit is < 128
_STORE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

if triton is not None:

    @triton.jit(do_not_specialize=["m", "n"])  # one compile for every shape
    def _radix_pass(
        at_ptr, b_ptr, coef_ptr, stats_ptr, prefix_ptr, hist_ptr, m, n,
        SHIFT: tl.constexpr, RANK: tl.constexpr, PIECES: tl.constexpr, MIX: tl.constexpr, BM: tl.constexpr,
        BN: tl.constexpr,
    ):  # fmt: skip
        """Histogram of digit (|ΔW| bits >> SHIFT) & 255 over the entries whose higher digits match the prefix."""
        group = tl.program_id(2)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        row_ok, col_ok = rows < m, cols < n
        at_ptr += group * RANK * n
        b_ptr += group * m * RANK
        coef_ptr += group * (PIECES + 3 * MIX)
        stats_ptr += group * 2 * n
        delta = tiles.weight_tile(at_ptr, b_ptr, coef_ptr, stats_ptr, rows, cols, row_ok, col_ok, n, RANK, PIECES, MIX)
        bits = tl.abs(delta).to(tl.int32, bitcast=True)
        counted = row_ok[:, None] & col_ok[None, :]
        if SHIFT < 24:
            prefix = tl.load(prefix_ptr + group)
            counted = counted & ((bits >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        digits = tl.reshape((bits >> SHIFT) & 255, (BM * BN,))
        counts = tl.histogram(digits, 256, mask=tl.reshape(counted, (BM * BN,)))
        tl.atomic_add(hist_ptr + group * 256 + tl.arange(0, 256), counts)

    @triton.jit(do_not_specialize=["m", "n", "base_sg", "base_sm", "base_sn"])  # one compile for every shape
    def _merge(
        at_ptr, b_ptr, coef_ptr, stats_ptr, tau_ptr, base_ptr, out_ptr, m, n, base_sg, base_sm, base_sn,
        MODE: tl.constexpr, HAS_BASE: tl.constexpr, KIND: tl.constexpr, RANK: tl.constexpr, PIECES: tl.constexpr,
        MIX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        """out (G, m, n) contiguous = W0 + ΔWˢ, W0 read through its strides (a Conv1D's is transposed)."""
        group = tl.program_id(2)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        row_ok, col_ok = rows < m, cols < n
        mask = row_ok[:, None] & col_ok[None, :]
        delta = tiles.weight_tile(
            at_ptr + group * RANK * n, b_ptr + group * m * RANK, coef_ptr + group * (PIECES + 3 * MIX),
            stats_ptr + group * 2 * n, rows, cols, row_ok, col_ok, n, RANK, PIECES, MIX,
        )  # fmt: skip
        base_ptrs = base_ptr + group * base_sg + rows[:, None] * base_sm + cols[None, :] * base_sn
        value = tiles.merged_value(delta, tl.load(tau_ptr + group), base_ptrs, mask, MODE, HAS_BASE)
        tiles.store(out_ptr + group * m * n + rows[:, None] * n + cols[None, :], value, mask, KIND)

    @triton.jit(
        do_not_specialize=["group", "first_row", "rows_in_block", "m", "n", "base_sm", "base_sn"]
    )  # one compile for every shape
    def _backward_rows(
        at_ptr, b_ptr, coef_ptr, stats_ptr, soft_sums_ptr, tau_ptr, grad_ptr, base_ptr, merged_ptr, row_part_ptr,
        col_part_ptr, coef_part_ptr, group, first_row, rows_in_block, m, n, base_sm, base_sn,
        MODE: tl.constexpr, HAS_BASE: tl.constexpr, NEED_MERGED: tl.constexpr, KIND: tl.constexpr,
        NEED_COEF: tl.constexpr, RANK: tl.constexpr, PIECES: tl.constexpr, MIX: tl.constexpr, BM: tl.constexpr,
        BN: tl.constexpr,
    ):  # fmt: skip
        """One tile of rows first_row.. of one group's ΔW, whose dW rows are ``grad`` (rows_in_block, n).

        Writes the tile's merged weight (if asked) and, with g the gradient w.r.t. D and w_p = α_p·g/d_p (0 where
        d_p = 0): per row Σ_i w_p·A_p[i, c] and Σ_i w_p into row_part[tile column, row, c | r + p]; per column
        Σ_j w_p·B_p[j, c] and Σ_j w_p into col_part[tile row, c | r + p, column]; Σ g·d_p into
        coef_part[tile row, tile column, p]. mixk: g = gΔ + dz/γ, dz = α·(gΔ·s − s·c_i) with gΔ = dW·S' and the
        softmax's column sums c_i = Σ_j gΔ·s (soft_sums), and Σ dz·D (γ's gradient, times −1/γ²) into
        coef_part[.., P]."""
        tile_m, tile_n = tl.program_id(0), tl.program_id(1)
        local = tile_m * BM + tl.arange(0, BM)
        rows = first_row + local
        cols = tile_n * BN + tl.arange(0, BN)
        row_ok, col_ok = local < rows_in_block, cols < n
        mask = row_ok[:, None] & col_ok[None, :]
        width: tl.constexpr = RANK // PIECES
        sums: tl.constexpr = RANK + PIECES
        coefs: tl.constexpr = PIECES + MIX
        at_ptr += group * RANK * n
        b_ptr += group * m * RANK
        coef_ptr += group * (PIECES + 3 * MIX)
        stats_ptr += group * 2 * n
        tau = tl.load(tau_ptr + group)
        delta = tiles.delta_tile(at_ptr, b_ptr, coef_ptr, rows, cols, row_ok, col_ok, n, RANK, PIECES)
        weight = delta
        if MIX:
            weight, soft = tiles.mix_tile(delta, coef_ptr, stats_ptr, cols, col_ok, n, PIECES)
        if NEED_MERGED:
            base_ptrs = base_ptr + rows[:, None] * base_sm + cols[None, :] * base_sn
            value = tiles.merged_value(weight, tau, base_ptrs, mask, MODE, HAS_BASE)
            tiles.store(merged_ptr + rows[:, None] * n + cols[None, :], value, mask, KIND)
        g = tl.load(grad_ptr + local[:, None] * n + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.where(mask, g * tiles.gradient_scale(weight, tau, MODE), 0.0)
        tile = tile_m * tl.num_programs(1) + tile_n
        if MIX:
            column_sums = tl.load(soft_sums_ptr + cols, mask=col_ok, other=0.0)
            dz = (g * soft - soft * column_sums[None, :]) * tl.load(coef_ptr + PIECES)
            dz = tl.where(mask, dz, 0.0)
            if NEED_COEF:
                tl.store(coef_part_ptr + tile * coefs + PIECES, tl.sum(dz * delta))
            g = dz * tiles.inverse_gamma(coef_ptr, PIECES) + g
        for p in tl.static_range(PIECES):
            distance = tiles.piece_distance(at_ptr, b_ptr, rows, cols, row_ok, col_ok, n, p, RANK, width)
            if NEED_COEF:
                tl.store(coef_part_ptr + tile * coefs + p, tl.sum(g * distance))
            nonzero = distance != 0.0  # the zero subgradient of ‖a − b‖ at a = b; no 0/0 is evaluated
            w = tl.where(nonzero, tl.load(coef_ptr + p) * g / tl.where(nonzero, distance, 1.0), 0.0)
            row_base = row_part_ptr + (tile_n * rows_in_block + local) * sums
            col_base = col_part_ptr + tile_m * sums * n + cols
            tl.store(row_base + RANK + p, tl.sum(w, axis=1), mask=row_ok)
            tl.store(col_base + (RANK + p) * n, tl.sum(w, axis=0), mask=col_ok)
            for c in tl.static_range(width):
                column = p * width + c
                a_c = tl.load(at_ptr + column * n + cols, mask=col_ok, other=0.0)
                b_c = tl.load(b_ptr + rows * RANK + column, mask=row_ok, other=0.0)
                tl.store(row_base + column, tl.sum(w * a_c[None, :], axis=1), mask=row_ok)
                tl.store(col_base + column * n, tl.sum(w * b_c[:, None], axis=0), mask=col_ok)


def interpreted() -> bool:
    """Whether the kernels were decorated under the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return triton is not None and type(tiles.delta_tile).__name__ == "InterpretedFunction"


@functools.cache
def _runs_on(device: torch.device) -> bool:
    """Compile and run every kernel once on a tiny problem (piecewise-linear and mixk); False, with one warning, if
    any fails."""
    try:
        generator = torch.Generator().manual_seed(0)  # not the default one: the check must not shift a run's draws
        a = torch.rand(1, 70, 4, generator=generator).to(device)
        b = torch.rand(1, 6, 4, generator=generator).to(device)
        for coef in (torch.tensor([0.1, -0.1], device=device), torch.tensor([0.1, -0.1, 1.0, 1.0, 0.0], device=device)):
            stats = mixk.column_stats(a, b, coef, 2) if len(coef) > 2 else None
            tau = select_tau(a, b, coef, 2, [0.5], stats)
            merge(a, b, coef, 2, tau, "reference", None, torch.float32, stats)
            grads = FactorGrads(a, b, coef, 2, True, stats)
            grads.add_rows(0, tau, "reference", 0, torch.ones(6, 70, device=device), None, None)
            grads.result()
    except Exception as err:  # any compile or runtime failure means: use the torch path
        warn_once("fused Triton kernels", f"{type(err).__name__}: {err}")
        return False
    return True


@torch.compiler.disable  # a cached compile with a warning: not for dynamo to trace
def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA, or the CPU under the Triton interpreter."""
    if triton is None:
        warn_once("fused Triton kernels", "triton is not installed")
        return False
    if device.type != "cuda" and not (device.type == "cpu" and interpreted()):
        warn_once(
            "fused Triton kernels",
            f"{device.type}: they run on CUDA, or on the CPU under TRITON_INTERPRET=1 set before triton's import",
        )
        return False
    return _runs_on(torch.device(device.type, device.index) if device.index is not None else device)


def _grid(groups: int, m: int, n: int) -> tuple[int, int, int]:
    return triton.cdiv(m, BLOCK_ROWS), triton.cdiv(n, BLOCK_COLS), groups


def _stats_operand(stats: Tensor | None, coef: Tensor) -> Tensor:
    """mixk's column statistics, contiguous, or any float32 tensor where the kernel has none (it reads nothing)."""
    return coef if stats is None else stats.to(torch.float32).contiguous()


def _per_group(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A (G,) device tensor from host numbers, by fills: no host-to-device copy, which could wait for the device."""
    return torch.stack([torch.full((), value, dtype=dtype, device=device) for value in values])


@torch.compiler.disable  # Triton launches: torch.compile runs them as they are
def select_tau(
    a: Tensor,
    b: Tensor,
    coefficients: Tensor,
    num_pieces: int,
    sparsities: Sequence[float | None],
    stats: Tensor | None = None,
) -> Tensor:
    """τ (G, 1, 1) float32 on the factors' device: per group the exact k-th largest |ΔW| of the kernels' own ΔW,
    k = keep_count(m·n, s) with s the group's entry of ``sparsities`` (+inf for k = 0), or −inf where it is None (the
    group keeps its dense ΔW). a: (G, n, r), b: (G, m, r); ``stats``: mixk's column statistics (G, 2, n) or None for
    the piecewise-linear kernel. No host read."""
    from snell.sparsify import keep_count

    at, b, coef = factors(a, b, coefficients)
    groups, rank, n = at.shape
    m = b.shape[1]
    keep = [None if s is None else keep_count(m * n, s) for s in sparsities]
    fixed = [-math.inf if k is None else math.inf if k == 0 else None for k in keep]
    if all(value is not None for value in fixed):
        return _per_group(fixed, torch.float32, at.device).reshape(groups, 1, 1)
    prefix = torch.zeros(groups, dtype=torch.int32, device=at.device)
    remaining = _per_group([k or 0 for k in keep], torch.int64, at.device)
    for shift in _SHIFTS:
        hist = torch.zeros(groups, _BINS, dtype=torch.int32, device=at.device)
        with on_device(at):
            _radix_pass[_grid(groups, m, n)](
                at, b, coef, _stats_operand(stats, coef), prefix, hist, m, n, SHIFT=shift, RANK=rank,
                PIECES=num_pieces, MIX=stats is not None, BM=BLOCK_ROWS, BN=BLOCK_COLS, **LAUNCH_OPTIONS,
            )  # fmt: skip
        at_or_above = hist.flip(-1).cumsum(-1).flip(-1)  # entries with this digit or a larger one
        digit = (at_or_above >= remaining[:, None]).sum(-1, keepdim=True) - 1  # the k-th largest's digit
        remaining = remaining - (at_or_above.gather(-1, digit) - hist.gather(-1, digit).long()).squeeze(-1)
        prefix = prefix | (digit.squeeze(-1).to(torch.int32) << shift)
    tau = prefix.view(torch.float32)
    for group, value in enumerate(fixed):
        if value is not None:
            tau[group] = value  # a fill on the device
    return tau.reshape(groups, 1, 1)


def _store_view(out: Tensor) -> Tensor:
    """What the kernels store into: bf16 as its int16 bits (rounded by :func:`tiles.store`), others as they are."""
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


def _base_strides(base: Tensor | None) -> tuple[Tensor | None, int, int, int]:
    return (None, 0, 0, 0) if base is None else (base, *base.stride())


@torch.compiler.disable  # Triton launches: torch.compile runs them as they are
def merge(
    a: Tensor,
    b: Tensor,
    coefficients: Tensor,
    num_pieces: int,
    tau: Tensor,
    mode: str,
    base: Tensor | None,
    dtype: torch.dtype,
    stats: Tensor | None = None,
) -> Tensor:
    """W0 + ΔWˢ (or ΔWˢ alone when ``base`` is None) as (G, m, n) in ``dtype``; base (G, m, n), any strides; τ from
    :func:`select_tau` (−inf: the group's dense ΔW); ``stats``: mixk's column statistics or None."""
    at, b, coef = factors(a, b, coefficients)
    groups, rank, n = at.shape
    m = b.shape[1]
    out = torch.empty((groups, m, n), dtype=dtype, device=at.device)
    base, *strides = _base_strides(base)
    with on_device(at):
        _merge[_grid(groups, m, n)](
            at, b, coef, _stats_operand(stats, coef), tau.to(torch.float32).contiguous(),
            out if base is None else base, _store_view(out), m, n, *strides, MODE=MODE_CODES[mode],
            HAS_BASE=base is not None, KIND=_STORE_KINDS[dtype], RANK=rank, PIECES=num_pieces, MIX=stats is not None,
            BM=BLOCK_ROWS, BN=BLOCK_COLS, **LAUNCH_OPTIONS,
        )  # fmt: skip
    return out


def dense_delta(a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int, stats: Tensor | None = None) -> Tensor:
    """ΔW (G, m, n) float32 exactly as every Triton pass computes it (the tests' ground truth)."""
    tau = torch.full((a.shape[0], 1, 1), -math.inf, device=a.device)
    return merge(a, b, coefficients, num_pieces, tau, "mask", None, torch.float32, stats)


class FactorGrads:
    """Accumulates dA, dB and the coefficients' gradient of all groups over blocks of rows.

    Each tile writes its partial sums into small buffers; torch reduces them in a fixed order per block, and
    blocks are added in order: the gradients are the same bits on every run. mixk (``stats`` given): each group's
    rows come in one block, the whole group's, whose softmax column sums are reduced first (their own pass).
    """

    def __init__(
        self, a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int, need_coef: bool, stats: Tensor | None = None
    ) -> None:
        self.at, self.b, self.coef = factors(a, b, coefficients)
        self.stats = _stats_operand(stats, self.coef)
        self.num_pieces, self.need_coef, self.mix = num_pieces, need_coef, stats is not None
        groups, rank, n = self.at.shape
        self.column_sums = torch.zeros(groups, rank + num_pieces, n, device=self.at.device)
        self.grad_b = torch.empty_like(self.b)
        self.grad_coef = torch.zeros(self.coef.shape, dtype=torch.float64, device=self.at.device)

    @torch.compiler.disable  # Triton launches: torch.compile runs them as they are
    def add_rows(
        self,
        group: int,
        tau: Tensor,
        mode: str,
        first_row: int,
        grad: Tensor,
        base: Tensor | None,
        merged: Tensor | None,
    ) -> None:
        """Rows first_row.. of group ``group``'s ΔW, whose dW = gyᵀx is ``grad`` (rows, n; contiguous): their
        dB rows, their share of dA and of the coefficients' gradient, and, into ``merged`` ((G, m, n), contiguous)
        if given, their rows of W0 + ΔWˢ. ``base``: the whole (G, m, n) W0 (any strides) or None; ``tau``:
        (G, 1, 1)."""
        _, rank, n = self.at.shape
        m = self.b.shape[1]
        rows = grad.shape[0]
        pieces = self.num_pieces
        tiles_m, tiles_n = triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(n, BLOCK_COLS)
        sums = rank + pieces
        device = self.at.device
        tau = tau.to(torch.float32).contiguous()
        grad = grad.contiguous()
        soft_sums = self.coef
        if self.mix:
            if (first_row, rows) != (0, m):
                raise ValueError(f"mixk's backward takes a group's {m} rows at once, got {rows} from row {first_row}")
            soft_sums, grad_sums = mixk.column_grads(
                self.at[group], self.b[group], self.coef[group], self.stats[group], tau[group], mode, grad
            )
            self.grad_coef[group, pieces] += soft_sums.double().sum()  # α: Σ g·s
            self.grad_coef[group, pieces + 2] += grad_sums.double().sum()  # β: Σ g
        row_parts = torch.empty(tiles_n, rows, sums, device=device)
        col_parts = torch.empty(tiles_m, sums, n, device=device)
        coefs = pieces + self.mix
        coef_parts = torch.empty(tiles_m * tiles_n, coefs, device=device) if self.need_coef else row_parts
        base = None if base is None else base[group]
        base_or_any = grad if base is None else base
        with on_device(grad):
            _backward_rows[(tiles_m, tiles_n)](
                self.at, self.b, self.coef, self.stats, soft_sums, tau, grad, base_or_any,
                grad if merged is None else _store_view(merged[group]), row_parts, col_parts, coef_parts, group,
                first_row, rows, m, n, *(base_or_any.stride()[-2:] if base is not None else (0, 0)),
                MODE=MODE_CODES[mode], HAS_BASE=base is not None, NEED_MERGED=merged is not None,
                KIND=_STORE_KINDS[merged.dtype] if merged is not None else 0, NEED_COEF=self.need_coef, RANK=rank,
                PIECES=pieces, MIX=self.mix, BM=BLOCK_ROWS, BN=BLOCK_COLS, **LAUNCH_OPTIONS,
            )  # fmt: skip
        width = rank // pieces
        row_sums = row_parts.sum(0)  # (rows, r + P)
        b_rows = self.b[group, first_row : first_row + rows]
        totals = row_sums[:, rank:, None].expand(-1, -1, width).reshape(rows, rank)  # Σ_i w_p per column of B_p
        self.grad_b[group, first_row : first_row + rows] = b_rows * totals - row_sums[:, :rank]
        self.column_sums[group] += col_parts.sum(0)
        if self.need_coef:
            parts = coef_parts.double().sum(0)
            self.grad_coef[group, :pieces] += parts[:pieces]
            if self.mix:  # Σ dz·D; γ's gradient is −Σ dz·D / γ²
                self.grad_coef[group, pieces + 1] -= parts[pieces] / self.coef[group, pieces + 1].double().square()

    def result(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """(dA (G, n, r), dB (G, m, r), float32; the coefficients' gradient per group, (G, K) float64, or None)."""
        rank = self.at.shape[1]
        width = rank // self.num_pieces
        groups, _, n = self.column_sums.shape
        totals = self.column_sums[:, rank:, None].expand(-1, -1, width, -1).reshape(groups, rank, n)  # Σ_j w_p
        grad_a = (self.at * totals - self.column_sums[:, :rank]).transpose(-1, -2)
        return grad_a, self.grad_b, self.grad_coef if self.need_coef else None
