"""Fused CPU passes for the piecewise-linear kernel: ΔW is computed on the fly, row by row, and never stored.

What the torch path does in a dozen passes over m×n memory (piece-distance GEMMs, sqrt, the sum of pieces,
|ΔW|, the selection's comparisons, the survivor factor, the merge with W0, the bf16 copy) is done here in
two passes for τ and one for the merged weight, each rebuilding a row of ΔW from A and B while it is in
cache:

1. a sample of ΔW brackets τ; one count-and-band pass counts the entries above the bracket and gathers
   the few inside it; a partition of the band gives the exact k-th largest |ΔW| (ties kept);
2. the merge pass writes W0 + ΔWˢ in the layer's dtype (bf16 rounded to nearest even, as torch does);
3. backward, per block of rows of dW = gyᵀx (a BLAS GEMM): one pass rebuilds ΔW and the piece distances,
   writes the merged weight for dx and reduces the per-piece weights w_p = α_p·g·S'/d_p into dB and dA: in
   the pass itself up to 4 columns a piece, through BLAS GEMMs on a block of w_p beyond (:class:`FactorGrads`).

Every pass builds ΔW with the same routine (:func:`_delta_tile`), compiled without fast-math: each entry is
the same sequence of IEEE operations (no reassociation, no FMA contraction), whatever the vector width
(AVX2 or AVX-512) or thread count, so the backward rebuilds the forward's ΔW bit for bit and the saved τ
selects the same survivors. A (r, n) copy of A is the inner loop's operand: a row of ΔW is then a
contiguous loop over inputs that LLVM vectorises. The distances are summed from differences, not as
‖a‖² + ‖b‖² − 2a·b: that would cancel near d = 0, where 1/d_p enters the gradient, and a BLAS GEMM's bits
may change with the tile shape and thread count. dA's and dB's sums are split by thread or run in BLAS, so
their order (not ΔW's, τ's or the survivors') depends on the thread count.

Why numba and not a C++ extension: numba is one wheel with no compiler on the user's machine, the kernels
stay Python-readable next to the torch path they replace, and ``cache=True`` keeps the compiled code on
disk, so only the first process after an install (or a source change) pays the compile (measured in
``benchmarks/README.md``). A C++/OpenMP extension would need a toolchain at install time or per-platform
wheels. If numba is missing or a kernel fails to compile, :func:`available` says so once (a warning) and
the torch path does the work.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
import torch
from torch import Tensor

from snell.fallback import warn_once

try:
    import numba
    from numba import njit, prange
except ImportError:  # the torch path is used; available() warns once
    numba = None

# Modes as the kernels see them; DENSE is sparsity 0 (every mode keeps the dense ΔW, as the reference does).
_MODE_CODES = {"reference": 0, "mask": 1, "soft": 2}
DENSE = 3
_TILE = 512  # columns per tile: the tile's distances and ΔW stay in L1
_SAMPLE_SIZE = 1 << 16
_BAND_MIN_NUMEL = 1 << 17  # below this, the dense ΔW and torch.kthvalue select τ
# From this many entries, pieces wider than 4 columns reduce the backward's weights with BLAS (FactorGrads).
_GEMM_MIN_NUMEL = 1 << 22
# numba's default (workqueue) threading layer aborts if two Python threads enter parallel code at once.
_LOCK = threading.Lock()

if numba is not None:
    _jit = functools.partial(njit, nogil=True, fastmath=False, cache=True)

    @_jit
    def _squares(a0, a1, a2, a3, b0, b1, b2, b3, t):
        """Σ_c (a_c[t] − b_c)² over four columns, always in this order. The views passed in must be sliced in
        the caller's loop nest: views returned from a helper kept LLVM from vectorising (12 ms against 8)."""
        d0, d1, d2, d3 = a0[t] - b0, a1[t] - b1, a2[t] - b2, a3[t] - b3
        return d0 * d0 + d1 * d1 + d2 * d2 + d3 * d3

    @_jit
    def _delta_tile(at, b_row, coef, width, i0, length, dist, delta):
        """ΔW[j, i0:i0+length] into delta[:length] and the piece distances into dist[p, :length].

        Every loop runs over contiguous 1-D views, which is what lets LLVM vectorise them (indexing the 2-D
        arrays inside the loops took ten times as long). A piece's squared distance is summed by groups of four
        columns, (((q0 + q1) + q2) + q3) + ..., in registers at widths 4, 8 and 16 (r = 8, 16, 32: 1.3× less
        time than column by column through dist at r = 32), through dist in the same order at other multiples
        of four, column by column otherwise. Views and column offsets are formed here, with the literal width,
        and width 4 has its own loop nest: views returned by a helper, offsets p·width, or the wider branches in
        the same loop over pieces each slowed a loop down by 15 % to 1.5×."""
        pieces = coef.shape[0]
        if width == 4:
            for p in range(pieces):
                dp = dist[p, :length]
                f = p * 4
                a0, a1, a2, a3 = at[f, i0:], at[f + 1, i0:], at[f + 2, i0:], at[f + 3, i0:]
                b0, b1, b2, b3 = b_row[f], b_row[f + 1], b_row[f + 2], b_row[f + 3]
                for t in range(length):
                    d0, d1, d2, d3 = a0[t] - b0, a1[t] - b1, a2[t] - b2, a3[t] - b3
                    dp[t] = math.sqrt(d0 * d0 + d1 * d1 + d2 * d2 + d3 * d3)
        else:
            for p in range(pieces):
                dp = dist[p, :length]
                if width == 8:
                    f = p * 8
                    a0, a1, a2, a3 = at[f, i0:], at[f + 1, i0:], at[f + 2, i0:], at[f + 3, i0:]
                    b0, b1, b2, b3 = b_row[f], b_row[f + 1], b_row[f + 2], b_row[f + 3]
                    a4, a5, a6, a7 = at[f + 4, i0:], at[f + 5, i0:], at[f + 6, i0:], at[f + 7, i0:]
                    b4, b5, b6, b7 = b_row[f + 4], b_row[f + 5], b_row[f + 6], b_row[f + 7]
                    for t in range(length):
                        squares = _squares(a0, a1, a2, a3, b0, b1, b2, b3, t)
                        dp[t] = math.sqrt(squares + _squares(a4, a5, a6, a7, b4, b5, b6, b7, t))
                elif width == 16:
                    f = p * 16
                    a0, a1, a2, a3 = at[f, i0:], at[f + 1, i0:], at[f + 2, i0:], at[f + 3, i0:]
                    b0, b1, b2, b3 = b_row[f], b_row[f + 1], b_row[f + 2], b_row[f + 3]
                    a4, a5, a6, a7 = at[f + 4, i0:], at[f + 5, i0:], at[f + 6, i0:], at[f + 7, i0:]
                    b4, b5, b6, b7 = b_row[f + 4], b_row[f + 5], b_row[f + 6], b_row[f + 7]
                    a8, a9, a10, a11 = at[f + 8, i0:], at[f + 9, i0:], at[f + 10, i0:], at[f + 11, i0:]
                    b8, b9, b10, b11 = b_row[f + 8], b_row[f + 9], b_row[f + 10], b_row[f + 11]
                    a12, a13, a14, a15 = at[f + 12, i0:], at[f + 13, i0:], at[f + 14, i0:], at[f + 15, i0:]
                    b12, b13, b14, b15 = b_row[f + 12], b_row[f + 13], b_row[f + 14], b_row[f + 15]
                    for t in range(length):
                        squares = _squares(a0, a1, a2, a3, b0, b1, b2, b3, t)
                        squares = squares + _squares(a4, a5, a6, a7, b4, b5, b6, b7, t)
                        squares = squares + _squares(a8, a9, a10, a11, b8, b9, b10, b11, t)
                        dp[t] = math.sqrt(squares + _squares(a12, a13, a14, a15, b12, b13, b14, b15, t))
                elif width % 4 == 0:
                    dp[:] = 0.0
                    for f in range(p * width, (p + 1) * width, 4):
                        a0, a1, a2, a3 = at[f, i0:], at[f + 1, i0:], at[f + 2, i0:], at[f + 3, i0:]
                        b0, b1, b2, b3 = b_row[f], b_row[f + 1], b_row[f + 2], b_row[f + 3]
                        for t in range(length):
                            dp[t] += _squares(a0, a1, a2, a3, b0, b1, b2, b3, t)
                    for t in range(length):
                        dp[t] = math.sqrt(dp[t])
                else:
                    dp[:] = 0.0
                    for c in range(p * width, (p + 1) * width):
                        bc = b_row[c]
                        ac = at[c, i0 : i0 + length]
                        for t in range(length):
                            diff = ac[t] - bc
                            dp[t] += diff * diff
                    for t in range(length):
                        dp[t] = math.sqrt(dp[t])
        d0 = dist[0, :length]
        c0 = coef[0]
        for t in range(length):
            delta[t] = c0 * d0[t]
        for p in range(1, pieces):
            dp = dist[p, :length]
            cp = coef[p]
            for t in range(length):
                delta[t] += cp * dp[t]

    _ZERO, _ONE = np.float32(0.0), np.float32(1.0)

    @_jit
    def _survivor(value, tau, mode):
        """S for one entry of ΔW (sparsify.survivor_scale_), in float32 (float64 literals made numba unify S
        to float64, so the merge and gradient loops ran in double precision)."""
        magnitude = abs(value)
        if mode == 3:
            return _ONE
        if mode == 2:
            return max(magnitude - tau, _ZERO)
        if magnitude >= tau:
            return magnitude if mode == 0 else _ONE
        return _ZERO

    @_jit
    def _load_row(src, j, i0, length, shift, bits):
        """Row j, columns i0.., of a float32 (uint32 bits, shift 0) or bf16 (uint16 bits, shift 16) matrix."""
        row = src[j, i0 : i0 + length]  # a 1-D view: indexing the 2-D array in the loop kept it scalar
        for t in range(length):
            bits[t] = np.uint32(row[t]) << shift

    @_jit
    def _store_row(dst, j, i0, length, bf16, bits):
        """float32 bits into row j of a float32 matrix, or rounded to nearest even into a bf16 one."""
        row = dst[j, i0 : i0 + length]  # a 1-D view, as in _load_row
        if bf16:
            for t in range(length):
                u = bits[t]
                nearest = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
                row[t] = np.uint16(0x7FC0) if nan else np.uint16(nearest)
        else:
            for t in range(length):
                row[t] = bits[t]

    @_jit
    def _dense(at, b, coef, width, out):
        """The whole ΔW into out (m, n) float32: the rare fallback of the selection, and the tests' ground truth
        for what the kernels compute."""
        m, n = out.shape
        for j in prange(m):
            dist = np.empty((coef.shape[0], _TILE), np.float32)
            delta = np.empty(_TILE, np.float32)
            for i0 in range(0, n, _TILE):
                length = min(_TILE, n - i0)
                _delta_tile(at, b[j], coef, width, i0, length, dist, delta)
                out[j, i0 : i0 + length] = delta[:length]

    @_jit
    def _sample(at, b, coef, width, rows, cols):
        """|ΔW| at the given positions (the sample that brackets τ), in plain scalar loops: calling
        :func:`_delta_tile` per entry took ~100 ns each, 7 ms per matrix (this takes 0.5 ms), as long as merging
        a whole ViT-B matrix. Only the bracket comes from these values (the count pass checks that τ lies in
        it), so they need not have :func:`_delta_tile`'s bits. Serial: a parallel launch costs more than this
        whenever another process or torch's threads hold a core."""
        out = np.empty(rows.shape[0], np.float32)
        for s in range(rows.shape[0]):
            j, i = rows[s], cols[s]
            total = _ZERO
            for p in range(coef.shape[0]):
                squares = _ZERO
                for column in range(p * width, (p + 1) * width):
                    diff = at[column, i] - b[j, column]
                    squares += diff * diff
                total += coef[p] * np.sqrt(squares)
            out[s] = abs(total)
        return out

    @_jit(parallel=True)
    def _count_band(at, b, coef, width, n, lower, upper, chunk_rows, offsets, capacity, band, above, inside):
        """Per chunk of rows: how many |ΔW| > upper (above), how many in (lower, upper] (inside), and those
        values themselves into band[offsets[c]:offsets[c] + capacity[c]] (as many as fit)."""
        m = b.shape[0]
        chunks = offsets.shape[0]
        for c in prange(chunks):
            dist = np.empty((coef.shape[0], _TILE), np.float32)
            delta = np.empty(_TILE, np.float32)
            count_above = 0
            count_inside = 0
            for j in range(c * chunk_rows, min((c + 1) * chunk_rows, m)):
                for i0 in range(0, n, _TILE):
                    length = min(_TILE, n - i0)
                    _delta_tile(at, b[j], coef, width, i0, length, dist, delta)
                    for t in range(length):
                        magnitude = abs(delta[t])
                        if magnitude > upper:
                            count_above += 1
                        elif magnitude > lower:
                            if count_inside < capacity[c]:
                                band[offsets[c] + count_inside] = magnitude
                            count_inside += 1
            above[c] = count_above
            inside[c] = count_inside

    @_jit(parallel=True)
    def _merge(at, b, coef, width, tau, mode, base, base_shift, has_base, out, out_bf16, chunk_rows):
        """out = W0 + ΔW ⊙ S (or ΔW ⊙ S without W0), float32 arithmetic, stored as float32 or bf16 bits."""
        m, n = out.shape
        for c in prange((m + chunk_rows - 1) // chunk_rows):
            dist = np.empty((coef.shape[0], _TILE), np.float32)
            delta = np.empty(_TILE, np.float32)
            bits = np.empty(_TILE, np.uint32)
            values = bits.view(np.float32)
            for j in range(c * chunk_rows, min((c + 1) * chunk_rows, m)):
                for i0 in range(0, n, _TILE):
                    length = min(_TILE, n - i0)
                    _delta_tile(at, b[j], coef, width, i0, length, dist, delta)
                    if has_base:
                        _load_row(base, j, i0, length, base_shift, bits)
                    else:
                        for t in range(length):
                            values[t] = 0.0
                    for t in range(length):
                        values[t] = values[t] + delta[t] * _survivor(delta[t], tau, mode)
                    _store_row(out, j, i0, length, out_bf16, bits)

    @_jit
    def _halving_sum(values):
        """Σ values (length a power of two) by halving: every step is an element-wise, vectorised add, in
        an order that does not depend on the vector width."""
        half = values.shape[0] // 2
        while half > 0:
            for t in range(half):
                values[t] += values[half + t]
            half //= 2
        return values[0]

    @_jit(parallel=True)
    def _backward_rows(
        at, b, coef, width, tau, mode, j0, grad, grad_shift, base, base_shift, has_base,
        merged, merged_bf16, need_merged, weights, column_sums, grad_b, coef_rows, need_coef,
    ):  # fmt: skip
        """For rows j0.. of ΔW (grad holds their rows of dW = gyᵀx): the merged weight for dx (if asked) and
        the per-piece weights w_p = α_p·g·S'/d_p (0 where d_p = 0, the zero subgradient; S' = dΔWˢ/dΔW).
        With a weights buffer (P, rows, n) they are written there for :class:`FactorGrads`'s GEMMs. Without
        (an empty one), they are reduced here: dB_p[j] = B_p[j]·Σ_i w_p[j,i] − Σ_i w_p[j,i]·A_p[i] into
        grad_b, and each task adds its rows' Σ_j w_p·B_p[j] and Σ_j w_p into column_sums[task, p] (rows < width
        and row width), reduced over tasks by the caller. coef_rows[j, p] = Σ_i g·S'·d_p when the coefficients
        learn."""
        rows, n = grad.shape
        pieces = coef.shape[0]
        here = weights.shape[1] == 0
        tasks = column_sums.shape[0]
        task_rows = (rows + tasks - 1) // tasks
        for task in prange(tasks):
            dist = np.empty((pieces, _TILE), np.float32)
            delta = np.empty(_TILE, np.float32)
            bits = np.empty(_TILE, np.uint32)
            values = bits.view(np.float32)
            scratch = np.empty(_TILE, np.float32)
            row_sums = np.empty((pieces, width + 1, _TILE), np.float32)
            for row in range(task * task_rows, min((task + 1) * task_rows, rows)):
                j = j0 + row
                b_row = b[j]
                row_sums[:] = 0.0
                coef_sums = np.zeros(pieces, np.float64)
                for i0 in range(0, n, _TILE):
                    length = min(_TILE, n - i0)
                    _delta_tile(at, b_row, coef, width, i0, length, dist, delta)
                    if need_merged:
                        if has_base:
                            _load_row(base, j, i0, length, base_shift, bits)
                        else:
                            values[:length] = 0.0
                        for t in range(length):
                            values[t] = values[t] + delta[t] * _survivor(delta[t], tau, mode)
                        _store_row(merged, j, i0, length, merged_bf16, bits)
                    _load_row(grad, row, i0, length, grad_shift, bits)
                    for t in range(length):
                        scale = _survivor(delta[t], tau, mode)
                        if mode == 2:
                            scale = np.float32(2.0) * scale + tau if scale > _ZERO else _ZERO
                        values[t] = values[t] * scale
                    for p in range(pieces):
                        cp = coef[p]
                        dp = dist[p, :length]
                        if need_coef:
                            for t in range(length):
                                coef_sums[p] += values[t] * dp[t]
                        weight = scratch if here else weights[p, row, i0 : i0 + length]
                        for t in range(length):
                            weight[t] = cp * values[t] / dp[t] if dp[t] != _ZERO else _ZERO
                        if not here:
                            continue
                        column = column_sums[task, p, width, i0 : i0 + length]
                        own = row_sums[p, width]
                        for t in range(length):
                            column[t] += weight[t]
                            own[t] += weight[t]
                        for c in range(width):
                            bc = b_row[p * width + c]
                            ac = at[p * width + c, i0 : i0 + length]
                            column = column_sums[task, p, c, i0 : i0 + length]
                            own = row_sums[p, c]
                            for t in range(length):
                                column[t] += weight[t] * bc
                                own[t] += weight[t] * ac[t]
                for p in range(pieces):
                    coef_rows[row, p] = coef_sums[p]
                    if here:
                        total = _halving_sum(row_sums[p, width])
                        for c in range(width):
                            grad_b[row, p * width + c] = b_row[p * width + c] * total - _halving_sum(row_sums[p, c])


@functools.cache
def _compiles() -> bool:
    """Compile (or load from numba's cache) every kernel on a tiny problem; False, with one warning, if any
    fails. The bf16 variants are compiled on first use."""
    try:
        a, b = torch.rand(40, 4), torch.rand(6, 4)
        coef = torch.tensor([0.1, -0.1])
        tau, _ = select_tau(a, b, coef, 2, 0.5)
        base = torch.zeros(6, 40)
        merged = merge(a, b, coef, 2, tau, "reference", 0.5, base, torch.float32)
        FactorGrads(a, b, coef, 2, True).add_rows(tau, "reference", 0.5, 0, torch.ones(6, 40), base, merged)
    except Exception as err:  # any compile or runtime failure means: use the torch path
        warn_once("fused CPU kernels", f"{type(err).__name__}: {err}")
        return False
    return True


@torch.compiler.disable  # a cached compile with a warning: not for dynamo to trace
def available() -> bool:
    """Whether the fused kernels can run here (numba installed and its kernels compile)."""
    if numba is None:
        warn_once("fused CPU kernels", "numba is not installed; `pip install snell[fast]`")
        return False
    return _compiles()


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _bits(t: Tensor) -> tuple[np.ndarray, int]:
    """A float32 or bfloat16 CPU tensor as its raw bits (uint32 / uint16 numpy, no copy) and the shift that
    widens them to float32 bits."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy(), 16
    return t.view(torch.int32).numpy().view(np.uint32), 0


def _factors(a: Tensor, b: Tensor, coefficients: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aᵀ (r, n), B (m, r) and the coefficients as contiguous float32 numpy arrays."""
    at = a.detach().to(torch.float32).T.contiguous().numpy()
    return at, b.detach().to(torch.float32).contiguous().numpy(), coefficients.detach().to(torch.float32).numpy()


def _chunk_rows(m: int) -> int:
    """Rows per parallel task: about four tasks per thread."""
    return max(1, math.ceil(m / (4 * _threads())))


@torch.compiler.disable  # numpy and numba: torch.compile runs it as it is
def dense_delta(a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int) -> Tensor:
    """ΔW (m, n) float32 exactly as every fused pass computes it."""
    at, b_np, coef = _factors(a, b, coefficients)
    out = np.empty((b_np.shape[0], at.shape[1]), np.float32)
    with _LOCK:
        numba.set_num_threads(_threads())
        _dense(at, b_np, coef, at.shape[0] // num_pieces, out)
    return torch.from_numpy(out)


@functools.cache
def _sample_positions(m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed random (row, column) sample positions per shape, sorted by row; read-only once drawn."""
    flat = np.sort(np.random.default_rng(m * 1_000_003 + n).integers(0, m * n, _SAMPLE_SIZE))
    rows, cols = (flat // n).astype(np.int64), (flat % n).astype(np.int64)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def _kth_from_dense(a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int, k: int) -> float:
    delta = dense_delta(a, b, coefficients, num_pieces).abs_().flatten()
    return torch.kthvalue(delta, delta.numel() - k + 1).values.item()


def _band_capacity(expected: float) -> int:
    """Band entries a chunk has room for: twice its expected share plus slack; one that overflows is redone
    with exactly sized room."""
    return int(2.0 * expected) + 4096


def _kth_banded(at: np.ndarray, b: np.ndarray, coef: np.ndarray, width: int, k: int) -> tuple[float, int] | None:
    """(k-th largest |ΔW|, entries in the band) from a sample bracket and one count-and-band pass, or None
    when the answer lies outside the bracket."""
    m, n = b.shape[0], at.shape[1]
    q = 1.0 - k / (m * n)
    margin = 6.0 * math.sqrt(max(q * (1.0 - q), 1.0 / _SAMPLE_SIZE) / _SAMPLE_SIZE) + 2.0 / _SAMPLE_SIZE
    low, high = math.floor((q - margin) * _SAMPLE_SIZE), math.ceil((q + margin) * _SAMPLE_SIZE)
    sample = _sample(at, b, coef, width, *_sample_positions(m, n))
    sample.partition([i for i in (low, high) if 0 <= i < _SAMPLE_SIZE] or [0])
    lower = float(sample[low]) if low >= 0 else -1.0  # |ΔW| >= 0 > -1: everything is above the lower bound
    upper = float(sample[high]) if high < _SAMPLE_SIZE else math.inf
    chunk_rows = _chunk_rows(m)
    chunks = (m + chunk_rows - 1) // chunk_rows
    capacity = np.full(chunks, _band_capacity((high - low) / _SAMPLE_SIZE * chunk_rows * n), np.int64)
    offsets = np.arange(chunks, dtype=np.int64) * capacity
    band = np.empty(chunks * int(capacity[0]), np.float32)
    above, inside = np.empty(chunks, np.int64), np.empty(chunks, np.int64)
    _count_band(at, b, coef, width, n, lower, upper, chunk_rows, offsets, capacity, band, above, inside)
    if (inside > capacity).any():
        capacity = inside.copy()
        offsets = np.concatenate([[0], np.cumsum(inside)[:-1]])
        band = np.empty(int(inside.sum()), np.float32)
        _count_band(at, b, coef, width, n, lower, upper, chunk_rows, offsets, capacity, band, above, inside)
    band = np.concatenate([band[o : o + c] for o, c in zip(offsets, inside, strict=True)])
    position = band.size - (k - int(above.sum()))
    if not 0 <= position < band.size:
        return None
    band.partition(position)
    return float(band[position]), band.size


@torch.compiler.disable  # numpy and numba: torch.compile runs it as it is
def select_tau(a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int, sparsity: float) -> tuple[float, int]:
    """(τ, band size): the exact k-th largest |ΔW| of the fused kernel's own ΔW, k = round((1 − s)·m·n);
    +inf for k = 0. The band size (0 when the dense fallback ran) is for the benchmarks."""
    from snell.sparsify import keep_count

    m, n = b.shape[0], a.shape[0]
    k = keep_count(m * n, sparsity)
    if k == 0:
        return math.inf, 0
    if m * n < _BAND_MIN_NUMEL:
        return _kth_from_dense(a, b, coefficients, num_pieces, k), 0
    at, b_np, coef = _factors(a, b, coefficients)
    with _LOCK:
        numba.set_num_threads(_threads())
        found = _kth_banded(at, b_np, coef, at.shape[0] // num_pieces, k)
    if found is None:  # the sample missed (rare): select on the dense ΔW, m×n float32 for this once
        return _kth_from_dense(a, b, coefficients, num_pieces, k), 0
    return found


def _mode_code(mode: str, sparsity: float) -> int:
    return DENSE if sparsity == 0.0 else _MODE_CODES[mode]


@torch.compiler.disable  # numpy and numba: torch.compile runs it as it is
def merge(
    a: Tensor,
    b: Tensor,
    coefficients: Tensor,
    num_pieces: int,
    tau: float,
    mode: str,
    sparsity: float,
    base: Tensor | None,
    dtype: torch.dtype,
    out: Tensor | None = None,
) -> Tensor:
    """W0 + ΔWˢ (or ΔWˢ alone when base is None) as an (m, n) matrix of ``dtype`` (float32 or bfloat16),
    written into ``out`` if given. ``base`` is the (m, n) W0 in float32 or bfloat16, row-contiguous."""
    at, b_np, coef = _factors(a, b, coefficients)
    m, n = b_np.shape[0], at.shape[1]
    out = torch.empty((m, n), dtype=dtype) if out is None else out
    out_bits, _ = _bits(out)
    base_bits, base_shift = _bits(base) if base is not None else (out_bits[:0], 0)
    with _LOCK:
        numba.set_num_threads(_threads())
        _merge(
            at, b_np, coef, at.shape[0] // num_pieces, np.float32(tau), _mode_code(mode, sparsity),
            base_bits, np.uint32(base_shift), base is not None, out_bits, dtype == torch.bfloat16,
            _chunk_rows(m),
        )  # fmt: skip
    return out


class FactorGrads:
    """Accumulates one matrix's dA (over blocks of rows) and its dB and coefficient gradients (per block).

    dB_p = B_p·(w_p 1) − w_p A_p and dA_p = A_p·(w_pᵀ 1) − w_pᵀ B_p, with the per-piece weights w_p of the kernel
    (:func:`_backward_rows`). By default the numba pass reduces them itself, each task into its own
    (P, width + 1, n) column sums, at 2·width loads and stores per entry and piece. For wider pieces on matrices
    from ``_GEMM_MIN_NUMEL`` entries it writes w_p instead (P × rows × n float32, a buffer reused across blocks)
    and two batched BLAS GEMMs per block reduce them, a column of ones appended to A_p and to B_p giving the row
    and column sums. Measured (benchmarks/results/fused_cpu/results.md): at 4096×4096 and r = 32 the GEMMs made
    a layer's step 1.4× faster on a lightly loaded machine and tied under heavy load; on smaller matrices, and
    at r = 8 everywhere, their extra memory traffic and thread hand-overs lost 5-30 %. The summation order of
    dA and dB depends on the thread count (not ΔW's, τ's or the survivors').
    """

    def __init__(self, a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int, need_coef: bool) -> None:
        self.at, b_np, self.coef = _factors(a, b, coefficients)
        self.b = torch.from_numpy(b_np)
        self.num_pieces, self.need_coef = num_pieces, need_coef
        rank, n = self.at.shape
        self.width = width = rank // num_pieces
        self.here = width <= 4 or self.b.shape[0] * n < _GEMM_MIN_NUMEL
        at = torch.from_numpy(self.at).reshape(num_pieces, width, n)
        b_pieces = self.b.T.reshape(num_pieces, width, -1)
        self.a_ones = torch.cat([at, torch.ones(num_pieces, 1, n)], 1).mT  # [A_p | 1]: (P, n, width + 1)
        self.b_ones = torch.cat([b_pieces, torch.ones(num_pieces, 1, len(self.b))], 1)  # [B_p | 1]ᵀ: (P, width + 1, m)
        # Σ_j w_p·B_p[j] (rows < width) and Σ_j w_p, per task when the numba pass reduces
        self.column_sums = torch.zeros(_threads() if self.here else 1, num_pieces, width + 1, n)
        self.grad_b = torch.empty(self.b.shape, dtype=torch.float32)
        self.grad_coef = np.zeros(num_pieces, np.float64)
        self.buffer = torch.empty(0)  # w_p of the largest block so far; shorter blocks use its start

    @torch.compiler.disable  # numpy and numba: torch.compile runs it as it is
    def add_rows(
        self,
        tau: float,
        mode: str,
        sparsity: float,
        first_row: int,
        grad: Tensor,
        base: Tensor | None,
        merged: Tensor | None,
    ) -> None:
        """The rows first_row.. of ΔW whose dW = gyᵀx is ``grad`` (rows, n; float32 or bf16): their dB rows,
        their share of dA and of the coefficient gradients, and, into ``merged`` (the whole matrix, float32 or
        bf16) if given, their rows of W0 + ΔWˢ for dx. ``base``: the whole (m, n) W0 or None."""
        rows = grad.shape[0]
        shape = (self.num_pieces, 0 if self.here else rows, self.at.shape[1])
        if self.buffer.numel() < math.prod(shape):
            self.buffer = torch.empty(math.prod(shape))
        weights = self.buffer[: math.prod(shape)].view(shape)  # contiguous, as the kernel's loops want it
        block = slice(first_row, first_row + rows)
        coef_rows = np.zeros((rows, self.num_pieces), np.float64)
        grad_bits, grad_shift = _bits(grad)
        merged_bits = _bits(merged)[0] if merged is not None else grad_bits[:0]
        base_bits, base_shift = _bits(base) if base is not None else (grad_bits[:0], 0)
        with _LOCK:
            numba.set_num_threads(_threads())
            _backward_rows(
                self.at, self.b.numpy(), self.coef, self.width, np.float32(tau), _mode_code(mode, sparsity),
                first_row, grad_bits, np.uint32(grad_shift), base_bits, np.uint32(base_shift), base is not None,
                merged_bits, merged is not None and merged.dtype == torch.bfloat16, merged is not None,
                weights.numpy(), self.column_sums.numpy(), self.grad_b[block].numpy(), coef_rows, self.need_coef,
            )  # fmt: skip
        if not self.here:
            products = torch.bmm(weights, self.a_ones)  # w_p A_p and, last, Σ_i w_p: (P, rows, width + 1)
            b_rows = self.b_ones[:, :-1, block].mT
            self.grad_b[block] = (b_rows * products[..., -1:] - products[..., :-1]).transpose(0, 1).reshape(rows, -1)
            self.column_sums[0].baddbmm_(self.b_ones[:, :, block], weights)
        if self.need_coef:
            self.grad_coef += coef_rows.sum(0)

    def result(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """(dA (n, r), dB (m, r), dcoefficients or None), float32 (the coefficients' in float64)."""
        at, sums = torch.from_numpy(self.at), self.column_sums.sum(0)
        totals = sums[:, -1:].expand(-1, self.width, -1).reshape(at.shape)  # Σ_j w_p for each column of A_p
        grad_a = (at * totals - sums[:, :-1].reshape(at.shape)).T
        return grad_a, self.grad_b, torch.from_numpy(self.grad_coef) if self.need_coef else None
