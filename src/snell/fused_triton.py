"""Fused Triton kernels for the piecewise-linear kernel: ΔW is rebuilt tile by tile from A and B, never stored.

Passes, each a launch over (row tiles, column tiles, groups) that rebuilds its tiles of ΔW with
:func:`_delta_tile`:

1. τ by radix select on the float32 bits of |ΔW| (non-negative floats order like their bit patterns): four
   passes of 8 bits. A pass histograms the next digit of the entries whose higher digits equal the prefix
   found so far (``tl.histogram``, then one integer ``tl.atomic_add`` of the 256 counts per program: exact,
   whatever the order the programs run in); torch ops on the device pick the digit and the count still to
   skip. Prefix and count stay device tensors the next pass reads, so nothing waits for the host. After the
   fourth pass the prefix is the bit pattern of the k-th largest |ΔW| itself: exact, ties all kept.
2. The merge pass writes W0 + ΔWˢ (or ΔWˢ alone) in the layer's dtype.
3. Backward, per block of rows of dW = gyᵀx (a cuBLAS GEMM by the caller): one pass rebuilds ΔW, writes the
   block of the merged weight for dx and reduces w_p = α_p·g·S'/d_p over each tile into per-tile partial sums
   (rows for dB, columns for dA, the tile's total for dα); torch sums the partials in a fixed order. No float
   atomics: the gradients are deterministic.

Every entry of ΔW is the same sequence of IEEE operations on A[i] and B[j] alone (element-wise, a static loop
over the columns, ``sqrt_rn``, launched with ``enable_fp_fusion=False`` so no multiply-add is contracted), so
all passes see the same ΔW bit for bit, whatever the tile shape or launch. bf16 results are rounded to nearest
even with integer ops (the interpreter's own cast truncates), so they match torch's conversion everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import Tensor

from snell.fallback import warn_once

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path is used; available() warns once
    triton = None

_MODE_CODES = {"reference": 0, "mask": 1, "soft": 2}
DENSE = 3  # sparsity 0: every mode keeps the dense ΔW (S = 1)
BLOCK_ROWS, BLOCK_COLS = 64, 64  # a tile of ΔW per program
_BINS = 256  # one 8-bit digit per radix pass
_SHIFTS = (24, 16, 8, 0)  # most significant digit first; |ΔW|'s sign bit is 0, so the top digit is < 128
_STORE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

if triton is not None:

    @triton.jit
    def _piece_distance(at_ptr, b_ptr, rows, cols, row_ok, col_ok, n, piece, RANK: tl.constexpr, WIDTH: tl.constexpr):
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
    def _delta_tile(at_ptr, b_ptr, coef_ptr, rows, cols, row_ok, col_ok, n, RANK: tl.constexpr, PIECES: tl.constexpr):
        """ΔW for the tile: Σ_p α_p·d_p, left to right, every entry from A[i] and B[j] alone."""
        width: tl.constexpr = RANK // PIECES
        delta = tl.load(coef_ptr) * _piece_distance(at_ptr, b_ptr, rows, cols, row_ok, col_ok, n, 0, RANK, width)
        for p in tl.static_range(1, PIECES):
            distance = _piece_distance(at_ptr, b_ptr, rows, cols, row_ok, col_ok, n, p, RANK, width)
            delta = delta + tl.load(coef_ptr + p) * distance
        return delta

    @triton.jit
    def _survivor(delta, tau, MODE: tl.constexpr):
        """S with ΔWˢ = ΔW·S (sparsify.survivor_scale_)."""
        magnitude = tl.abs(delta)
        if MODE == 0:
            return tl.where(magnitude >= tau, magnitude, 0.0)
        elif MODE == 1:
            return tl.where(magnitude >= tau, 1.0, 0.0)
        elif MODE == 2:
            return tl.maximum(magnitude - tau, 0.0)
        else:
            return tl.full(delta.shape, 1.0, tl.float32)

    @triton.jit
    def _merged_value(delta, tau, base_ptrs, mask, MODE: tl.constexpr, HAS_BASE: tl.constexpr):
        """W0 + ΔW·S (or ΔW·S), float32: the forward's merge and the backward's weight for dx share it."""
        sparse = delta * _survivor(delta, tau, MODE)
        if HAS_BASE:
            return tl.load(base_ptrs, mask=mask, other=0.0).to(tl.float32) + sparse
        else:
            return sparse

    @triton.jit
    def _store(ptrs, value, mask, KIND: tl.constexpr):
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

    @triton.jit(do_not_specialize=["m", "n"])  # one compile for every shape
    def _radix_pass(
        at_ptr, b_ptr, coef_ptr, prefix_ptr, hist_ptr, m, n,
        SHIFT: tl.constexpr, RANK: tl.constexpr, PIECES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        """Histogram of digit (|ΔW| bits >> SHIFT) & 255 over the entries whose higher digits match the prefix."""
        group = tl.program_id(2)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        row_ok, col_ok = rows < m, cols < n
        at_ptr += group * RANK * n
        b_ptr += group * m * RANK
        delta = _delta_tile(at_ptr, b_ptr, coef_ptr, rows, cols, row_ok, col_ok, n, RANK, PIECES)
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
        at_ptr, b_ptr, coef_ptr, tau_ptr, base_ptr, out_ptr, m, n, base_sg, base_sm, base_sn,
        MODE: tl.constexpr, HAS_BASE: tl.constexpr, KIND: tl.constexpr, RANK: tl.constexpr, PIECES: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        """out (G, m, n) contiguous = W0 + ΔWˢ, W0 read through its strides (a Conv1D's is transposed)."""
        group = tl.program_id(2)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        row_ok, col_ok = rows < m, cols < n
        mask = row_ok[:, None] & col_ok[None, :]
        delta = _delta_tile(
            at_ptr + group * RANK * n, b_ptr + group * m * RANK, coef_ptr, rows, cols, row_ok, col_ok, n, RANK, PIECES
        )
        base_ptrs = base_ptr + group * base_sg + rows[:, None] * base_sm + cols[None, :] * base_sn
        value = _merged_value(delta, tl.load(tau_ptr + group), base_ptrs, mask, MODE, HAS_BASE)
        _store(out_ptr + group * m * n + rows[:, None] * n + cols[None, :], value, mask, KIND)

    @triton.jit(
        do_not_specialize=["group", "first_row", "rows_in_block", "m", "n", "base_sm", "base_sn"]
    )  # one compile for every shape
    def _backward_rows(
        at_ptr, b_ptr, coef_ptr, tau_ptr, grad_ptr, base_ptr, merged_ptr, row_part_ptr, col_part_ptr, coef_part_ptr,
        group, first_row, rows_in_block, m, n, base_sm, base_sn,
        MODE: tl.constexpr, HAS_BASE: tl.constexpr, NEED_MERGED: tl.constexpr, KIND: tl.constexpr,
        NEED_COEF: tl.constexpr, RANK: tl.constexpr, PIECES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        """One tile of rows first_row.. of one group's ΔW, whose dW rows are ``grad`` (rows_in_block, n).

        Writes the tile's merged weight (if asked) and, with w_p = α_p·g·S'/d_p (0 where d_p = 0): per row
        Σ_i w_p·A_p[i, c] and Σ_i w_p into row_part[tile column, row, c | r + p]; per column Σ_j w_p·B_p[j, c]
        and Σ_j w_p into col_part[tile row, c | r + p, column]; Σ g·S'·d_p into coef_part[tile row, tile column, p].
        """
        tile_m, tile_n = tl.program_id(0), tl.program_id(1)
        local = tile_m * BM + tl.arange(0, BM)
        rows = first_row + local
        cols = tile_n * BN + tl.arange(0, BN)
        row_ok, col_ok = local < rows_in_block, cols < n
        mask = row_ok[:, None] & col_ok[None, :]
        width: tl.constexpr = RANK // PIECES
        sums: tl.constexpr = RANK + PIECES
        at_ptr += group * RANK * n
        b_ptr += group * m * RANK
        tau = tl.load(tau_ptr + group)
        delta = _delta_tile(at_ptr, b_ptr, coef_ptr, rows, cols, row_ok, col_ok, n, RANK, PIECES)
        if NEED_MERGED:
            base_ptrs = base_ptr + rows[:, None] * base_sm + cols[None, :] * base_sn
            value = _merged_value(delta, tau, base_ptrs, mask, MODE, HAS_BASE)
            _store(merged_ptr + rows[:, None] * n + cols[None, :], value, mask, KIND)
        scale = _survivor(delta, tau, MODE)
        if MODE == 2:
            scale = tl.where(scale > 0.0, 2.0 * scale + tau, 0.0)
        g = tl.load(grad_ptr + local[:, None] * n + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.where(mask, g * scale, 0.0)
        for p in tl.static_range(PIECES):
            distance = _piece_distance(at_ptr, b_ptr, rows, cols, row_ok, col_ok, n, p, RANK, width)
            if NEED_COEF:
                tl.store(coef_part_ptr + (tile_m * tl.num_programs(1) + tile_n) * PIECES + p, tl.sum(g * distance))
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


# No FMA contraction: every pass must build ΔW with the same roundings (the interpreter ignores the option).
_LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def interpreted() -> bool:
    """Whether the kernels were decorated under the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return triton is not None and type(_delta_tile).__name__ == "InterpretedFunction"


@functools.cache
def _runs_on(device: torch.device) -> bool:
    """Compile and run every kernel once on a tiny problem; False, with one warning, if any fails."""
    try:
        a, b = torch.rand(70, 4, device=device), torch.rand(6, 4, device=device)
        coef = torch.tensor([0.1, -0.1], device=device)
        tau = select_tau(a[None], b[None], coef, 2, 0.5)
        merge(a[None], b[None], coef, 2, tau, "reference", 0.5, None, torch.float32)
        grads = FactorGrads(a[None], b[None], coef, 2, True)
        grads.add_rows(0, tau, "reference", 0.5, 0, torch.ones(6, 70, device=device), None, None)
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


def _factors(a: Tensor, b: Tensor, coefficients: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Aᵀ (G, r, n), B (G, m, r) and the coefficients, contiguous float32: the kernels' operands."""
    at = a.detach().to(torch.float32).transpose(-1, -2).contiguous()
    return at, b.detach().to(torch.float32).contiguous(), coefficients.detach().to(torch.float32).contiguous()


def _grid(groups: int, m: int, n: int) -> tuple[int, int, int]:
    return triton.cdiv(m, BLOCK_ROWS), triton.cdiv(n, BLOCK_COLS), groups


def mode_code(mode: str, sparsity: float) -> int:
    return DENSE if sparsity == 0.0 else _MODE_CODES[mode]


@torch.compiler.disable  # Triton launches: torch.compile runs them as they are
def select_tau(a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int, sparsity: float) -> Tensor:
    """τ (G, 1, 1) float32 on the factors' device: per group the exact k-th largest |ΔW| of the kernels' own
    ΔW, k = round((1 − s)·m·n) (+inf for k = 0, -inf at sparsity 0). a: (G, n, r), b: (G, m, r). No host read."""
    from snell.sparsify import keep_count

    at, b, coef = _factors(a, b, coefficients)
    groups, rank, n = at.shape
    m = b.shape[1]
    k = keep_count(m * n, sparsity)
    if sparsity == 0.0 or k == 0:
        return torch.full((groups, 1, 1), -math.inf if sparsity == 0.0 else math.inf, device=at.device)
    prefix = torch.zeros(groups, dtype=torch.int32, device=at.device)
    remaining = torch.full((groups,), k, dtype=torch.int64, device=at.device)
    for shift in _SHIFTS:
        hist = torch.zeros(groups, _BINS, dtype=torch.int32, device=at.device)
        with _on_device(at):
            _radix_pass[_grid(groups, m, n)](
                at, b, coef, prefix, hist, m, n, SHIFT=shift, RANK=rank, PIECES=num_pieces,
                BM=BLOCK_ROWS, BN=BLOCK_COLS, **_LAUNCH_OPTIONS,
            )  # fmt: skip
        at_or_above = hist.flip(-1).cumsum(-1).flip(-1)  # entries with this digit or a larger one
        digit = (at_or_above >= remaining[:, None]).sum(-1, keepdim=True) - 1  # the k-th largest's digit
        remaining = remaining - (at_or_above.gather(-1, digit) - hist.gather(-1, digit).long()).squeeze(-1)
        prefix = prefix | (digit.squeeze(-1).to(torch.int32) << shift)
    return prefix.view(torch.float32).reshape(groups, 1, 1)


def _store_view(out: Tensor) -> Tensor:
    """What the kernels store into: bf16 as its int16 bits (rounded by :func:`_store`), others as they are."""
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
    sparsity: float,
    base: Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """W0 + ΔWˢ (or ΔWˢ alone when ``base`` is None) as (G, m, n) in ``dtype``; base (G, m, n), any strides."""
    at, b, coef = _factors(a, b, coefficients)
    groups, rank, n = at.shape
    m = b.shape[1]
    out = torch.empty((groups, m, n), dtype=dtype, device=at.device)
    base, *strides = _base_strides(base)
    with _on_device(at):
        _merge[_grid(groups, m, n)](
            at, b, coef, tau.to(torch.float32).contiguous(), out if base is None else base, _store_view(out), m, n,
            *strides, MODE=mode_code(mode, sparsity), HAS_BASE=base is not None, KIND=_STORE_KINDS[dtype],
            RANK=rank, PIECES=num_pieces, BM=BLOCK_ROWS, BN=BLOCK_COLS, **_LAUNCH_OPTIONS,
        )  # fmt: skip
    return out


def dense_delta(a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int) -> Tensor:
    """ΔW (G, m, n) float32 exactly as every Triton pass computes it (the tests' ground truth)."""
    return merge(
        a, b, coefficients, num_pieces, torch.zeros(a.shape[0], device=a.device), "mask", 0.0, None, torch.float32
    )


class FactorGrads:
    """Accumulates dA, dB and the coefficients' gradient of all groups over blocks of rows.

    Each tile writes its partial sums into small buffers; torch reduces them in a fixed order per block, and
    blocks are added in order: the gradients are the same bits on every run.
    """

    def __init__(self, a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int, need_coef: bool) -> None:
        self.at, self.b, self.coef = _factors(a, b, coefficients)
        self.num_pieces, self.need_coef = num_pieces, need_coef
        groups, rank, n = self.at.shape
        self.column_sums = torch.zeros(groups, rank + num_pieces, n, device=self.at.device)
        self.grad_b = torch.empty_like(self.b)
        self.grad_coef = torch.zeros(num_pieces, dtype=torch.float64, device=self.at.device)

    @torch.compiler.disable  # Triton launches: torch.compile runs them as they are
    def add_rows(
        self,
        group: int,
        tau: Tensor,
        mode: str,
        sparsity: float,
        first_row: int,
        grad: Tensor,
        base: Tensor | None,
        merged: Tensor | None,
    ) -> None:
        """Rows first_row.. of group ``group``'s ΔW, whose dW = gyᵀx is ``grad`` (rows, n; contiguous): their
        dB rows, their share of dA and dα, and, into ``merged`` ((G, m, n), contiguous) if given, their rows of
        W0 + ΔWˢ. ``base``: the whole (G, m, n) W0 (any strides) or None; ``tau``: (G, 1, 1)."""
        _, rank, n = self.at.shape
        m = self.b.shape[1]
        rows = grad.shape[0]
        tiles_m, tiles_n = triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(n, BLOCK_COLS)
        sums = rank + self.num_pieces
        device = self.at.device
        row_parts = torch.empty(tiles_n, rows, sums, device=device)
        col_parts = torch.empty(tiles_m, sums, n, device=device)
        coef_parts = torch.empty(tiles_m * tiles_n, self.num_pieces, device=device) if self.need_coef else row_parts
        base = None if base is None else base[group]
        base_or_any = grad if base is None else base
        with _on_device(grad):
            _backward_rows[(tiles_m, tiles_n)](
                self.at, self.b, self.coef, tau.to(torch.float32).contiguous(), grad.contiguous(), base_or_any,
                grad if merged is None else _store_view(merged[group]), row_parts, col_parts, coef_parts, group,
                first_row, rows, m, n, *(base_or_any.stride()[-2:] if base is not None else (0, 0)),
                MODE=mode_code(mode, sparsity), HAS_BASE=base is not None, NEED_MERGED=merged is not None,
                KIND=_STORE_KINDS[merged.dtype] if merged is not None else 0, NEED_COEF=self.need_coef, RANK=rank,
                PIECES=self.num_pieces, BM=BLOCK_ROWS, BN=BLOCK_COLS, **_LAUNCH_OPTIONS,
            )  # fmt: skip
        width = rank // self.num_pieces
        row_sums = row_parts.sum(0)  # (rows, r + P)
        b_rows = self.b[group, first_row : first_row + rows]
        totals = row_sums[:, rank:, None].expand(-1, -1, width).reshape(rows, rank)  # Σ_i w_p per column of B_p
        self.grad_b[group, first_row : first_row + rows] = b_rows * totals - row_sums[:, :rank]
        self.column_sums[group] += col_parts.sum(0)
        if self.need_coef:
            self.grad_coef += coef_parts.double().sum(0)

    def result(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """(dA (G, n, r), dB (G, m, r), dcoefficients float64 or None), float32."""
        rank = self.at.shape[1]
        width = rank // self.num_pieces
        groups, _, n = self.column_sums.shape
        totals = self.column_sums[:, rank:, None].expand(-1, -1, width, -1).reshape(groups, rank, n)  # Σ_j w_p
        grad_a = (self.at * totals - self.column_sums[:, :rank]).transpose(-1, -2)
        return grad_a, self.grad_b, self.grad_coef if self.need_coef else None
