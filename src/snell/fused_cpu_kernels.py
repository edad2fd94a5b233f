"""The numba kernels of the fused CPU path (:mod:`snell.fused_cpu` calls them and owns buffers and threads).

Every pass builds ΔW with the same routine (:func:`_delta_tile`, and :func:`_mix_tile` after it for mixk), compiled
without fast-math: each entry is the same sequence of IEEE operations (no reassociation, no FMA contraction),
whatever the vector width (AVX2 or AVX-512) or thread count, so the backward rebuilds the forward's ΔW bit for
bit and the saved τ selects the same survivors. A (r, n) copy of A is the inner loop's operand: a row of ΔW is
then a contiguous loop over inputs that LLVM vectorises. The distances are summed from differences, not as
‖a‖² + ‖b‖² − 2a·b: that would cancel near d = 0, where 1/d_p enters the gradient, and a BLAS GEMM's bits may
change with the tile shape and thread count.

Why numba and not a C++ extension: numba is one wheel with no compiler on the user's machine, the kernels stay
Python-readable next to the torch path they replace, and ``cache=True`` keeps the compiled code on disk, so only
the first process after an install (or a source change) pays the compile (measured in ``benchmarks/README.md``).
A C++/OpenMP extension would need a toolchain at install time or per-platform wheels.
"""

from __future__ import annotations

import functools
import math

import numpy as np

try:
    import numba
    from numba import njit, prange
except ImportError:  # the torch path is used; snell.fused_cpu.available() warns once
    numba = None

_TILE = 512  # columns per tile: the tile's distances and ΔW stay in L1

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
    def _grad_scale(value, tau, mode):
        """S' = dΔWˢ/dΔW for one entry (sparsify.gradient_scale): S, or in the soft mode 2S + τ where S > 0."""
        scale = _survivor(value, tau, mode)
        if mode == 2:
            return np.float32(2.0) * scale + tau if scale > _ZERO else _ZERO
        return scale

    _LOG2E = np.float32(1.4426950408889634)
    _LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 in two parts (Cody-Waite)
    _ROUND = np.float32(12582912.0)  # 1.5·2^23: adding and subtracting it rounds a float32 to an integer
    _EXP_FLOOR = np.float32(-87.0)  # 2^k stays a normal float32

    @_jit
    def _exp_tile(values, length, bits):
        """values[:length] ← exp(values[:length]) for arguments <= 0 (a max-subtracted softmax's), written so that
        LLVM vectorises it: libm's expf is a scalar call, 2-4× slower here. exp(x) = 2^k·p(r), k = round(x/ln 2),
        r = x − k·ln 2, p the degree-7 Taylor-type polynomial of Cephes' expf (within 2 ulp of expf). Arguments
        below −87 give exp(−87) ≈ 1.6e-38, a softmax entry that is 0 to float32 precision beside the column's
        largest (1). ``bits``: uint32 scratch of at least ``length``, where 2^k is assembled."""
        power = bits.view(np.float32)
        for t in range(length):
            x = max(values[t], _EXP_FLOOR)
            k = (x * _LOG2E + _ROUND) - _ROUND
            r = (x - k * _LN2_HI) - k * _LN2_LO
            q = np.float32(1.9875691500e-4) * r + np.float32(1.3981999507e-3)
            q = q * r + np.float32(8.3334519073e-3)
            q = q * r + np.float32(4.1665795894e-2)
            q = q * r + np.float32(1.6666665459e-1)
            q = q * r + np.float32(5.0000001201e-1)
            q = (q * r) * r + r + _ONE
            bits[t] = np.uint32(np.int32(k) + np.int32(127)) << np.uint32(23)
            values[t] = q * power[t]

    @_jit
    def _mix_tile(d, length, i0, mix, stats, soft, bits, out):
        """mixk: ΔW = D + α·softmax(D/γ) + β into out[:length] (out may be d) for a tile whose D is d[:length], and
        the softmax entries exp(D·(1/γ) − M_i)·(1/S_i) into soft[:length], with each column's max M and reciprocal
        sum 1/S from :func:`mix_column_stats` (stats[0], stats[1]). The torch path's operations in its order, with
        reciprocals for its two divisions (its exp and sums round differently): a vector division costs ten times
        a multiplication, and these two were a fifth of a mixk pass."""
        alpha, beta = mix[0], mix[2]
        inverse_gamma = _ONE / mix[1]
        col_max, col_inverse_sum = stats[0, i0 : i0 + length], stats[1, i0 : i0 + length]
        for t in range(length):
            soft[t] = d[t] * inverse_gamma - col_max[t]
        _exp_tile(soft, length, bits)
        for t in range(length):
            soft[t] = soft[t] * col_inverse_sum[t]
            out[t] = (d[t] + soft[t] * alpha) + beta

    @_jit(parallel=True)
    def mix_column_stats(at, b, coef, width, gamma, chunk, stats):
        """mixk: each column's max M of D·(1/γ) and the reciprocal 1/S of its sum S of exp(D·(1/γ) − M), over all
        rows, into stats (2, n). Parallel over blocks of ``chunk`` columns, each going down its rows in order, so the
        values (and every ΔW built from them) do not depend on the thread count. A block's D/γ is kept (m × chunk),
        not computed twice."""
        m, n = b.shape[0], stats.shape[1]
        inverse_gamma = _ONE / gamma
        for c in prange((n + chunk - 1) // chunk):
            i0 = c * chunk
            length = min(chunk, n - i0)
            dist = np.empty((coef.shape[0], chunk), np.float32)
            z = np.empty((m, chunk), np.float32)
            bits = np.empty(chunk, np.uint32)
            col_max = np.full(chunk, -np.inf, np.float32)
            for j in range(m):
                zj = z[j]
                _delta_tile(at, b[j], coef, width, i0, length, dist, zj)
                for t in range(length):
                    zj[t] = zj[t] * inverse_gamma
                    col_max[t] = max(col_max[t], zj[t])
            total = np.zeros(chunk, np.float32)
            for j in range(m):
                zj = z[j]
                for t in range(length):
                    zj[t] = zj[t] - col_max[t]
                _exp_tile(zj, length, bits)
                for t in range(length):
                    total[t] += zj[t]
            stats[0, i0 : i0 + length] = col_max[:length]
            for t in range(length):
                stats[1, i0 + t] = _ONE / total[t]

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
    def dense(at, b, coef, width, mix, stats, out):
        """The whole ΔW into out (m, n) float32: the rare fallback of the selection, and the tests' ground truth
        for what the kernels compute. ``mix``: mixk's (α, γ, β), or empty for the piecewise-linear kernel."""
        m, n = out.shape
        for j in prange(m):
            dist = np.empty((coef.shape[0], _TILE), np.float32)
            delta = np.empty(_TILE, np.float32)
            soft = np.empty(_TILE, np.float32)
            bits = np.empty(_TILE, np.uint32)
            for i0 in range(0, n, _TILE):
                length = min(_TILE, n - i0)
                _delta_tile(at, b[j], coef, width, i0, length, dist, delta)
                if mix.shape[0] != 0:
                    _mix_tile(delta, length, i0, mix, stats, soft, bits, delta)
                out[j, i0 : i0 + length] = delta[:length]

    @_jit
    def sample(at, b, coef, width, mix, stats, rows, cols):
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
            if mix.shape[0] != 0:
                soft = math.exp(total * (_ONE / mix[1]) - stats[0, i]) * stats[1, i]
                total = (total + soft * mix[0]) + mix[2]
            out[s] = abs(total)
        return out

    @_jit(parallel=True)
    def count_band(at, b, coef, width, mix, stats, n, lower, upper, chunk_rows, offsets, capacity, band, above, inside):
        """Per chunk of rows: how many |ΔW| > upper (above), how many in (lower, upper] (inside), and those
        values themselves into band[offsets[c]:offsets[c] + capacity[c]] (as many as fit). ``lower`` and
        ``upper`` are float32 (values of the sample), so every comparison stays in float32.

        The counts and the band's flags are vectorised loops; the band (about 1.4 % of the entries) is then
        gathered by words of eight flags, skipping the words without one. A scalar loop over every entry with
        the store behind a branch took twice as long as the whole pass without it (49 against 27 ms at
        11008×4096, r = 8)."""
        m = b.shape[0]
        chunks = offsets.shape[0]
        for c in prange(chunks):
            dist = np.empty((coef.shape[0], _TILE), np.float32)
            delta = np.empty(_TILE, np.float32)
            soft = np.empty(_TILE, np.float32)
            bits = np.empty(_TILE, np.uint32)
            flags = np.zeros(_TILE, np.uint8)
            words = flags.view(np.uint64)  # flags past a short tile's length are stale: the scan stops at length
            count_above = 0
            count_inside = 0
            for j in range(c * chunk_rows, min((c + 1) * chunk_rows, m)):
                for i0 in range(0, n, _TILE):
                    length = min(_TILE, n - i0)
                    _delta_tile(at, b[j], coef, width, i0, length, dist, delta)
                    if mix.shape[0] != 0:
                        _mix_tile(delta, length, i0, mix, stats, soft, bits, delta)
                    tile_above = 0
                    for t in range(length):
                        magnitude = abs(delta[t])
                        delta[t] = magnitude
                        tile_above += np.int32(magnitude > upper)
                        flags[t] = np.uint8(magnitude > lower) & np.uint8(magnitude <= upper)
                    count_above += tile_above
                    for word in range((length + 7) // 8):
                        if words[word] == 0:
                            continue
                        for t in range(8 * word, min(8 * word + 8, length)):
                            if flags[t]:
                                if count_inside < capacity[c]:
                                    band[offsets[c] + count_inside] = delta[t]
                                count_inside += 1
            above[c] = count_above
            inside[c] = count_inside

    @_jit(parallel=True)
    def merge_rows(at, b, coef, width, mix, stats, tau, mode, base, base_shift, has_base, out, out_bf16, chunk_rows):
        """out = W0 + ΔW ⊙ S (or ΔW ⊙ S without W0), float32 arithmetic, stored as float32 or bf16 bits."""
        m, n = out.shape
        for c in prange((m + chunk_rows - 1) // chunk_rows):
            dist = np.empty((coef.shape[0], _TILE), np.float32)
            delta = np.empty(_TILE, np.float32)
            soft = np.empty(_TILE, np.float32)
            exp_bits = np.empty(_TILE, np.uint32)
            bits = np.empty(_TILE, np.uint32)
            values = bits.view(np.float32)
            for j in range(c * chunk_rows, min((c + 1) * chunk_rows, m)):
                for i0 in range(0, n, _TILE):
                    length = min(_TILE, n - i0)
                    _delta_tile(at, b[j], coef, width, i0, length, dist, delta)
                    if mix.shape[0] != 0:
                        _mix_tile(delta, length, i0, mix, stats, soft, exp_bits, delta)
                    if has_base:
                        _load_row(base, j, i0, length, base_shift, bits)
                    else:
                        for t in range(length):
                            values[t] = 0.0
                    for t in range(length):
                        values[t] = values[t] + delta[t] * _survivor(delta[t], tau, mode)
                    _store_row(out, j, i0, length, out_bf16, bits)

    @_jit(parallel=True)
    def merge_band(
        at, b, coef, width, mix, stats, mode, lower, upper, base, base_shift, has_base, out, out_bf16, chunk_rows,
        offsets, capacity, band, positions, above, inside,
    ):  # fmt: skip
        """merge_rows and count_band in one pass, for the modes whose S above τ does not depend on τ (reference,
        mask): τ lies in (lower, upper], so every entry above ``upper`` is merged as kept and every one at or below
        ``lower`` as dropped, as merge_rows would with τ. The entries inside are merged as if τ were ``upper`` and
        gathered, signed, with their flat positions (as count_band gathers |ΔW|), for :func:`merge_band_fix` to
        merge again once their k-th largest magnitude gives τ. The tile's start is merge_rows' and the gather
        count_band's, written out again: as shared helpers they made the passes 4-22 % slower (paired in one
        process)."""
        m, n = out.shape
        for c in prange(offsets.shape[0]):
            dist = np.empty((coef.shape[0], _TILE), np.float32)
            delta = np.empty(_TILE, np.float32)
            soft = np.empty(_TILE, np.float32)
            exp_bits = np.empty(_TILE, np.uint32)
            bits = np.empty(_TILE, np.uint32)
            values = bits.view(np.float32)
            flags = np.zeros(_TILE, np.uint8)
            words = flags.view(np.uint64)  # flags past a short tile's length are stale: the scan stops at length
            count_above = 0
            count_inside = 0
            for j in range(c * chunk_rows, min((c + 1) * chunk_rows, m)):
                for i0 in range(0, n, _TILE):
                    length = min(_TILE, n - i0)
                    _delta_tile(at, b[j], coef, width, i0, length, dist, delta)
                    if mix.shape[0] != 0:
                        _mix_tile(delta, length, i0, mix, stats, soft, exp_bits, delta)
                    if has_base:
                        _load_row(base, j, i0, length, base_shift, bits)
                    else:
                        for t in range(length):
                            values[t] = 0.0
                    tile_above = 0
                    for t in range(length):
                        magnitude = abs(delta[t])
                        tile_above += np.int32(magnitude > upper)
                        flags[t] = np.uint8(magnitude > lower) & np.uint8(magnitude <= upper)
                        values[t] = values[t] + delta[t] * _survivor(delta[t], upper, mode)
                    _store_row(out, j, i0, length, out_bf16, bits)
                    count_above += tile_above
                    for word in range((length + 7) // 8):
                        if words[word] == 0:
                            continue
                        for t in range(8 * word, min(8 * word + 8, length)):
                            if flags[t]:
                                if count_inside < capacity[c]:
                                    band[offsets[c] + count_inside] = delta[t]
                                    positions[offsets[c] + count_inside] = j * n + i0 + t
                                count_inside += 1
            above[c] = count_above
            inside[c] = count_inside

    @_jit(parallel=True)
    def merge_band_fix(band, positions, offsets, inside, tau, mode, base, base_shift, has_base, out, out_bf16):
        """Merges again the entries merge_band gathered, now that τ is known: each with the same float32 operations
        and bf16 rounding as merge_rows, so the whole matrix is what merge_rows writes with τ, bit for bit."""
        n = out.shape[1]
        for c in prange(offsets.shape[0]):
            bits = np.empty(1, np.uint32)
            value = bits.view(np.float32)
            for e in range(offsets[c], offsets[c] + inside[c]):
                j, i = positions[e] // n, positions[e] % n
                if has_base:
                    _load_row(base, j, i, 1, base_shift, bits)
                else:
                    value[0] = 0.0
                value[0] = value[0] + band[e] * _survivor(band[e], tau, mode)
                _store_row(out, j, i, 1, out_bf16, bits)

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
    def mix_column_grads(at, b, coef, width, mix, stats, tau, mode, grad, grad_shift, sums, totals):
        """mixk's backward needs the softmax's column sums c_i = Σ_j gΔ[j,i]·softmax[j,i] before any entry's
        gradient w.r.t. D, with gΔ = dW·S' the gradient w.r.t. ΔW (grad: the whole matrix's dW). Each task adds its
        rows' into sums[task] and their Σ gΔ (β's gradient) into totals[task]; the caller sums over tasks."""
        rows, n = grad.shape
        tasks = sums.shape[0]
        task_rows = (rows + tasks - 1) // tasks
        for task in prange(tasks):
            dist = np.empty((coef.shape[0], _TILE), np.float32)
            delta = np.empty(_TILE, np.float32)
            soft = np.empty(_TILE, np.float32)
            exp_bits = np.empty(_TILE, np.uint32)
            bits = np.empty(_TILE, np.uint32)
            values = bits.view(np.float32)
            total = np.zeros(_TILE, np.float64)  # by position in the tile: a vector add, not a serial chain
            for j in range(task * task_rows, min((task + 1) * task_rows, rows)):
                for i0 in range(0, n, _TILE):
                    length = min(_TILE, n - i0)
                    _delta_tile(at, b[j], coef, width, i0, length, dist, delta)
                    _mix_tile(delta, length, i0, mix, stats, soft, exp_bits, delta)
                    _load_row(grad, j, i0, length, grad_shift, bits)
                    column = sums[task, i0 : i0 + length]
                    for t in range(length):
                        g = values[t] * _grad_scale(delta[t], tau, mode)
                        column[t] += g * soft[t]
                        total[t] += g
            totals[task] = _halving_sum(total)

    @_jit(parallel=True)
    def backward_rows(
        at, b, coef, width, mix, stats, mix_column, tau, mode, j0, grad, grad_shift, base, base_shift, has_base,
        merged, merged_bf16, need_merged, weights, column_sums, a_rows, point_sums, grad_b, coef_rows, need_coef,
    ):  # fmt: skip
        """For rows j0.. of ΔW (grad holds their rows of dW = gyᵀx): the merged weight for dx (if asked) and
        the per-piece weights w_p = α_p·g·S'/d_p (0 where d_p = 0, the zero subgradient; S' = dΔWˢ/dΔW).
        With a weights buffer (P, rows, n) they are written there for :class:`FactorGrads`'s GEMMs. Without
        (an empty one), they are reduced here: dB_p[j] = B_p[j]·Σ_i w_p[j,i] − Σ_i w_p[j,i]·A_p[i] into
        grad_b, and each task adds its rows' Σ_j w_p·B_p[j] and Σ_j w_p into column_sums[task, p] (rows < width
        and row width), reduced over tasks by the caller. coef_rows[j, p] = Σ_i g·S'·d_p when the coefficients
        learn. mixk (``mix`` not empty): g becomes the gradient w.r.t. D first, g + α·(g·s − s·c_i)/γ with the
        softmax s and the column sums c from :func:`mix_column_grads` (mix_column), and coef_rows[j, P] gets
        Σ_i α·(g·s − s·c_i)·D, from which the caller forms γ's gradient.

        With ``point_sums`` (tasks, n, P·(width + 1)) instead (and A's rows, a_rows (n, r)), only the survivors are
        reduced: w_p is 0 wherever S' = 0, so at s = 0.9 nine entries in ten add nothing. Each task adds its
        survivors' w_p·B_p[j] and w_p into point_sums[task, i], by column i, and each row's Σ w_p·A_p[i] and Σ w_p
        are summed survivor by survivor (in column order, by one task: their order does not depend on the thread
        count). The cost of the reduction is then that of the kept entries, not of all m·n, whatever the width.
        The tile's w_p are formed in vectorised loops and its survivors' positions gathered without a branch (a
        branch per entry, or a division per survivor, cost a fifth more at r = 8). Not for mixk, whose gradient
        w.r.t. D is not 0 off the survivors."""
        rows, n = grad.shape
        pieces = coef.shape[0]
        sparse = point_sums.shape[1] != 0
        here = weights.shape[1] == 0 and not sparse
        has_mix = mix.shape[0] != 0
        tasks = point_sums.shape[0] if sparse else column_sums.shape[0]
        task_rows = (rows + tasks - 1) // tasks
        for task in prange(tasks):
            dist = np.empty((pieces, _TILE), np.float32)
            delta = np.empty(_TILE, np.float32)
            bits = np.empty(_TILE, np.uint32)
            values = bits.view(np.float32)
            plain = np.empty(_TILE, np.float32)
            soft = np.empty(_TILE, np.float32)
            exp_bits = np.empty(_TILE, np.uint32)
            # zeroed for every row, so only as large as this call uses: (P, width + 1, _TILE) floats are 70 KB at
            # width 16, and clearing them per row cost a quarter of the pass where BLAS does the reduction
            row_sums = np.empty((pieces, width + 1, _TILE if here else 0), np.float32)
            coef_sums = np.empty((pieces + 1, _TILE if need_coef or has_mix else 0), np.float64)
            row_totals = np.empty((pieces, width + 1), np.float32)  # the sparse reduction's Σ w_p·A_p[i] and Σ w_p
            positions = np.empty(_TILE, np.int64)  # the tile's survivors, for the sparse reduction
            piece_weights = np.empty((pieces, _TILE), np.float32)  # the tile's w_p, unless BLAS reduces them
            for row in range(task * task_rows, min((task + 1) * task_rows, rows)):
                j = j0 + row
                b_row = b[j]
                row_sums[:] = 0.0
                row_totals[:] = 0.0
                # Σ g·d_p (and mixk's Σ dz·D) by position in the tile, in float64: an add into one scalar per entry
                # is a serial chain (no reassociation without fast-math) that cost more than the rest of the pass.
                coef_sums[:] = 0.0
                for i0 in range(0, n, _TILE):
                    length = min(_TILE, n - i0)
                    _delta_tile(at, b_row, coef, width, i0, length, dist, delta)
                    if has_mix:  # D stays in plain (γ's gradient), ΔW goes to delta
                        plain[:length] = delta[:length]
                        _mix_tile(plain, length, i0, mix, stats, soft, exp_bits, delta)
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
                        values[t] = values[t] * _grad_scale(delta[t], tau, mode)
                    if has_mix:
                        alpha, inverse_gamma = mix[0], _ONE / mix[1]
                        sums = mix_column[i0 : i0 + length]
                        acc = coef_sums[pieces]  # 1-D views in the loops, as in _delta_tile
                        for t in range(length):
                            dz = (values[t] * soft[t] - soft[t] * sums[t]) * alpha
                            acc[t] += dz * plain[t]  # γ's gradient; unused when the coefficients are frozen
                            values[t] = dz * inverse_gamma + values[t]
                    for p in range(pieces):
                        cp = coef[p]
                        dp = dist[p, :length]
                        if need_coef:
                            acc = coef_sums[p]
                            for t in range(length):
                                acc[t] += values[t] * dp[t]
                        blas = not (here or sparse)  # w_p go to the weights buffer; else kept for this tile
                        weight = weights[p, row, i0 : i0 + length] if blas else piece_weights[p]
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
                    if sparse:
                        kept = 0
                        for t in range(length):  # the survivors' positions, without a branch
                            positions[kept] = t
                            kept += np.int32(values[t] != _ZERO)
                        for k in range(kept):
                            t = positions[k]
                            a_i = a_rows[i0 + t]
                            sums_i = point_sums[task, i0 + t]
                            for p in range(pieces):
                                weight_p = piece_weights[p, t]
                                f, s0 = p * width, p * (width + 1)
                                for c in range(width):
                                    sums_i[s0 + c] += weight_p * b_row[f + c]
                                    row_totals[p, c] += weight_p * a_i[f + c]
                                sums_i[s0 + width] += weight_p
                                row_totals[p, width] += weight_p
                if has_mix:
                    coef_rows[row, pieces] = _halving_sum(coef_sums[pieces])
                for p in range(pieces):
                    if need_coef:
                        coef_rows[row, p] = _halving_sum(coef_sums[p])
                    if sparse:
                        for c in range(width):
                            grad_b[row, p * width + c] = b_row[p * width + c] * row_totals[p, width] - row_totals[p, c]
                    elif here:
                        total = _halving_sum(row_sums[p, width])
                        for c in range(width):
                            grad_b[row, p * width + c] = b_row[p * width + c] * total - _halving_sum(row_sums[p, c])
