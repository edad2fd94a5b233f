"""Fused CPU passes for the piecewise-linear and mixk kernels: ΔW is computed on the fly, row by row, and never
stored. This module is the host side (selection, buffers, threads, the fallback); the numba kernels are in
:mod:`snell.fused_cpu_kernels`.

What the torch path does in a dozen passes over m×n memory (piece-distance GEMMs, sqrt, the sum of pieces,
|ΔW|, the selection's comparisons, the survivor factor, the merge with W0, the bf16 copy) is done here in
passes that each rebuild a row of ΔW from A and B while it is in cache:

1. a sample of ΔW brackets τ; one count-and-band pass counts the entries above the bracket and gathers
   the few inside it; a partition of the band gives the exact k-th largest |ΔW| (ties kept);
2. the merge pass writes W0 + ΔWˢ in the layer's dtype (bf16 rounded to nearest even, as torch does). In the
   reference and mask modes, where S above τ does not depend on τ, the forward does both in one pass
   (:func:`merge_selected`): it merges every entry outside the bracket as it will stay and gathers the band's,
   which are merged again once τ is known;
3. backward, per block of rows of dW = gyᵀx (a BLAS GEMM): one pass rebuilds ΔW and the piece distances,
   writes the merged weight for dx and reduces the per-piece weights w_p = α_p·g·S'/d_p into dB and dA: in
   the pass itself up to 4 columns a piece, through BLAS GEMMs on a block of w_p beyond (:class:`FactorGrads`).

mixk (SNELLA's ΔW = D + α·softmax(D/γ) + β, the softmax over each column's rows) adds one pass before the others,
forward and backward alike: each column's max and sum of the softmax (:func:`mix_stats`, in an order that does
not depend on the thread count), after which every pass builds its tile of ΔW as before and mixes it. Its
backward needs each column's Σ_j g·softmax before any entry's gradient, so it takes the whole matrix as one block
and sums those first (one more pass).

dA's and dB's sums are split by thread or run in BLAS, so their order (not ΔW's, τ's or the survivors') depends
on the thread count. If numba is missing or a kernel fails to compile, :func:`available` says so once (a
warning) and the torch path does the work.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from snell import fused_cpu_kernels as kernels
from snell.fallback import warn_once
from snell.sparsify import keep_count, sample_bracket, sample_size
from snell.spec import keeps_dense

numba = kernels.numba  # None where numba is not installed

# Modes as the kernels see them; DENSE is sparsity 0 (every mode keeps the dense ΔW, as the reference does).
_MODE_CODES = {"reference": 0, "mask": 1, "soft": 2}
DENSE = 3
# Below this many entries the dense ΔW and torch.kthvalue select τ (the sample would hold fewer than 256). From it
# the banded selection was 1.4-4× faster (8 Ki entries 0.12 against 0.16 ms, SmolLM2's 192×576 0.39 against 1.57).
_BAND_MIN_NUMEL = 1 << 13
# From this many entries, pieces wider than 4 columns reduce the backward's weights with BLAS (FactorGrads).
_GEMM_MIN_NUMEL = 1 << 22
# The backward reduces the survivors alone (FactorGrads) where the kept fraction of ΔW is at most this times the
# columns per piece: its cost follows the kept entries, the dense reduction's the width. Measured (one matrix's
# backward, both ways, benchmarks/results/fused_cpu/results.md) even at kept 0.1 for width 8, 0.2 for width 16.
_SPARSE_KEPT_PER_COLUMN = 1 / 64
# numba's default (workqueue) threading layer aborts if two Python threads enter parallel code at once.
_LOCK = threading.Lock()


def _launch_threads() -> None:
    """Start numba's thread pool with torch's thread count left as it was. numba's OpenMP layer sets the process's
    OpenMP thread count to NUMBA_NUM_THREADS when it starts, and torch reads its own from the same runtime: a process
    that ran torch on one thread (torchrun's default, `snell search --jobs 2`) was put on every core, torch and these
    kernels alike, and two such processes on two cores trained 8x slower."""
    threads = torch.get_num_threads()
    try:
        numba.get_num_threads()  # starts the pool
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _compiles() -> bool:
    """Start numba's threads, then compile (or load from numba's cache) every kernel on a tiny problem; False, with
    one warning, if any fails. The bf16 variants are compiled on first use. A compilation is announced once
    (:mod:`snell.compile_notice`)."""
    try:
        from snell.compile_notice import announce_compiles  # it needs numba

        announce_compiles(kernels.__name__)
        _launch_threads()
        # Its own generator: drawn from torch's default one, the check (run once per process, at the first fused
        # layer) shifted the first run's dropout masks against a later run in the same process with the same seed.
        generator = torch.Generator().manual_seed(0)
        a, b = torch.rand(100, 4, generator=generator), torch.rand(90, 4, generator=generator)  # band-sized
        base = torch.zeros(90, 100)
        for coef in (torch.tensor([0.1, -0.1]), torch.tensor([0.1, -0.1, 1.0, 1.0, 0.0])):  # piecewise, mixk
            mix = mix_stats(a, b, coef, 2) if len(coef) > 2 else None
            merged, _ = merge_selected(a, b, coef, 2, "reference", 0.5, base, torch.float32, mix=mix)
            tau, _ = select_tau(a, b, coef, 2, 0.5, mix)  # the count-and-band pass, for the soft mode
            merge(a, b, coef, 2, tau, "reference", 0.5, base, torch.float32, merged, mix)
            dense_delta(a, b, coef, 2, mix)  # the dense ΔW small matrices select τ on
            grads = FactorGrads(a, b, coef, 2, True, mix)
            grads.add_rows(tau, "reference", 0.5, 0, torch.ones(90, 100), base, merged)
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


def _array(t: Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's memory that leaves the tensor's storage resizable. ``Tensor.numpy()`` marks a
    storage non-resizable for good, and FSDP frees a layer's gathered parameters by resizing their storage to 0:
    after one fused pass over W0, A or B its next reshard failed."""
    return np.from_dlpack(t.detach())


def _bits(t: Tensor) -> tuple[np.ndarray, int]:
    """A float32 or bfloat16 CPU tensor as its raw bits (uint32 / uint16 numpy, no copy) and the shift that
    widens them to float32 bits."""
    if t.dtype == torch.bfloat16:
        return _array(t.view(torch.uint16)), 16
    return _array(t.view(torch.int32)).view(np.uint32), 0


def _padded_stride(n: int) -> int:
    """Aᵀ's row stride in floats: an odd number of 64-byte lines. A tile reads the r rows of Aᵀ at the same column
    offset, and at a stride of a multiple of 4 KiB (n a multiple of 1024: LLaMA's 4096, ViT's 3072) all of them
    fall into one set of the 12-way L1 cache: a piece's 16 rows at r = 32 evicted each other, and rebuilding ΔW
    took 1.4× as long (63 against 44 ms at 11008×4096, benchmarks/results/fused_cpu/results.md). At an odd number
    of lines, consecutive rows fall into different sets."""
    return 16 * (-(-n // 16) | 1)


def _factors(a: Tensor, b: Tensor, coefficients: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aᵀ (r, :func:`_padded_stride` (n); its first n columns are Aᵀ), B (m, r) and the coefficients as contiguous
    float32 numpy arrays. The kernels take n from B's partner arrays, never from Aᵀ's shape."""
    n, r = a.shape
    at = np.zeros((r, _padded_stride(n)), np.float32)
    at[:, :n] = _array(a.to(torch.float32).T)
    return at, _array(b.to(torch.float32).contiguous()), _array(coefficients.to(torch.float32))


@dataclass(frozen=True)
class Mix:
    """What every fused pass needs to build a mixk ΔW = D + α·softmax(D/γ) + β: (α, γ, β), and each column's max M
    of D/γ and the reciprocal 1/S of its sum of exp(D/γ − M) (``stats``, (2, n)), from :func:`mix_stats`. The
    passes take the matrix's P + 3 coefficients and this; the piecewise-linear kernel's take P coefficients and
    None."""

    params: np.ndarray
    stats: np.ndarray


_NO_MIX = Mix(np.empty(0, np.float32), np.empty((2, 0), np.float32))
_STATS_COLUMNS = 64  # columns per task of _mix_stats: a block's D/γ over all rows stays m × 64 floats


def _mix_arrays(mix: Mix | None) -> tuple[np.ndarray, np.ndarray]:
    mix = mix or _NO_MIX
    return mix.params, mix.stats


@torch.compiler.disable  # numpy and numba: torch.compile runs it as it is
def mix_stats(a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int) -> Mix:
    """mixk's column statistics for one matrix (coefficients: its P + 3), computed so that they do not depend on
    the thread count: every pass that is given them rebuilds the same ΔW, bit for bit."""
    at, b_np, coef = _factors(a, b, coefficients)
    stats = np.empty((2, a.shape[0]), np.float32)
    with _LOCK:
        numba.set_num_threads(_threads())
        kernels.mix_column_stats(
            at, b_np, coef[:num_pieces], at.shape[0] // num_pieces, coef[num_pieces + 1], _STATS_COLUMNS, stats
        )
    return mix_from_stats(coefficients, num_pieces, stats)


def mix_from_stats(coefficients: Tensor, num_pieces: int, stats: np.ndarray) -> Mix:
    """The :class:`Mix` of a matrix whose column statistics :func:`mix_stats` gave earlier for the same factors:
    the forward's, kept for the backward instead of another pass over ΔW."""
    params = _array(coefficients.to(torch.float32))[num_pieces:]
    return Mix(np.ascontiguousarray(params), np.ascontiguousarray(stats, np.float32))


def _chunk_rows(m: int) -> int:
    """Rows per parallel task: about four tasks per thread."""
    return max(1, math.ceil(m / (4 * _threads())))


@torch.compiler.disable  # numpy and numba: torch.compile runs it as it is
def dense_delta(a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int, mix: Mix | None = None) -> Tensor:
    """ΔW (m, n) float32 exactly as every fused pass computes it (mixk: give its :class:`Mix`)."""
    at, b_np, coef = _factors(a, b, coefficients)
    out = np.empty((b_np.shape[0], a.shape[0]), np.float32)
    with _LOCK:
        numba.set_num_threads(_threads())
        kernels.dense(at, b_np, coef[:num_pieces], at.shape[0] // num_pieces, *_mix_arrays(mix), out)
    return torch.from_numpy(out)


@functools.cache
def _sample_positions(m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed random (row, column) sample positions per shape, sorted by row; read-only once drawn."""
    flat = np.sort(np.random.default_rng(m * 1_000_003 + n).integers(0, m * n, sample_size(m * n)))
    rows, cols = (flat // n).astype(np.int64), (flat % n).astype(np.int64)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def _kth_from_dense(a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int, k: int, mix: Mix | None) -> float:
    delta = dense_delta(a, b, coefficients, num_pieces, mix).abs_().flatten()
    return torch.kthvalue(delta, delta.numel() - k + 1).values.item()


def _band_capacity(expected: float) -> int:
    """Band entries a chunk has room for: twice its expected share plus slack; one that overflows is redone
    with exactly sized room."""
    return int(2.0 * expected) + 4096


def _bracket(
    at: np.ndarray, b: np.ndarray, coef: np.ndarray, width: int, mix: Mix | None, n: int, k: int
) -> tuple[np.float32, np.float32, int, np.ndarray]:
    """(lower, upper, rows per chunk, band room per chunk) for a band pass over the (b.shape[0], n) ΔW: the sampled
    bracket (lower, upper] of its k-th largest |ΔW|, as float32 values of the sample (the kernels compare in
    float32)."""
    m = b.shape[0]
    rows, cols = _sample_positions(m, n)
    size = len(rows)
    low, high = sample_bracket(1.0 - k / (m * n), size)
    sample = kernels.sample(at, b, coef, width, *_mix_arrays(mix), rows, cols)
    sample.partition([i for i in (low, high) if 0 <= i < size] or [0])
    # |ΔW| >= 0 > -1, so everything is above a lower bound of -1
    lower = sample[low] if low >= 0 else np.float32(-1.0)
    upper = sample[high] if high < size else np.float32(np.inf)
    chunk_rows = _chunk_rows(m)
    chunks = (m + chunk_rows - 1) // chunk_rows
    return lower, upper, chunk_rows, np.full(chunks, _band_capacity((high - low) / size * chunk_rows * n), np.int64)


def _offsets(capacity: np.ndarray) -> np.ndarray:
    """Where each chunk's share of the band starts: the chunks' room laid end to end."""
    return np.concatenate([[0], np.cumsum(capacity)[:-1]]).astype(np.int64)


def _kth_in_band(band: np.ndarray, offsets: np.ndarray, inside: np.ndarray, above: np.ndarray, k: int) -> float | None:
    """The k-th largest |ΔW| from a band pass's gathered entries (magnitudes or signed values) and counts, or None
    when it lies outside the bracket."""
    magnitudes = np.abs(np.concatenate([band[o : o + c] for o, c in zip(offsets, inside, strict=True)]))
    position = magnitudes.size - (k - int(above.sum()))
    if not 0 <= position < magnitudes.size:
        return None
    magnitudes.partition(position)
    return float(magnitudes[position])


def _kth_banded(
    at: np.ndarray, b: np.ndarray, coef: np.ndarray, width: int, mix: Mix | None, n: int, k: int
) -> tuple[float, int] | None:
    """(k-th largest |ΔW|, entries in the band) of the (b.shape[0], n) ΔW from a sample bracket and one
    count-and-band pass, or None when the answer lies outside the bracket."""
    lower, upper, chunk_rows, capacity = _bracket(at, b, coef, width, mix, n, k)

    def count(offsets: np.ndarray, room: np.ndarray, above: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray]:
        band = np.empty(int(room.sum()), np.float32)
        bounds = (n, lower, upper, chunk_rows, offsets, room)
        kernels.count_band(at, b, coef, width, *_mix_arrays(mix), *bounds, band, above, inside)
        return (band,)

    offsets, above, inside, (band,) = _band_pass(capacity, count)
    tau = _kth_in_band(band, offsets, inside, above, k)
    return None if tau is None else (tau, int(inside.sum()))


def _band_pass(
    capacity: np.ndarray, run: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, ...]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """(offsets, above, inside, what ``run`` gathered) of a band pass, ``run(offsets, room, above, inside)``, which
    allocates its band for ``room`` per chunk and fills the counts. A chunk whose band overflowed its room is run
    again with exactly the room each chunk needs (the counts do not change, so once is enough)."""
    above, inside = np.empty(len(capacity), np.int64), np.empty(len(capacity), np.int64)
    offsets = _offsets(capacity)
    gathered = run(offsets, capacity, above, inside)
    if (inside > capacity).any():
        capacity = inside.copy()
        offsets = _offsets(capacity)
        gathered = run(offsets, capacity, above, inside)
    return offsets, above, inside, gathered


@torch.compiler.disable  # numpy and numba: torch.compile runs it as it is
def select_tau(
    a: Tensor, b: Tensor, coefficients: Tensor, num_pieces: int, sparsity: float, mix: Mix | None = None
) -> tuple[float, int]:
    """(τ, band size): the exact k-th largest |ΔW| of the fused kernel's own ΔW, k = keep_count(m·n, s);
    +inf for k = 0. The band size (0 when the dense fallback ran) is for the benchmarks."""
    m, n = b.shape[0], a.shape[0]
    k = keep_count(m * n, sparsity)
    if k == 0:
        return math.inf, 0
    if m * n < _BAND_MIN_NUMEL:
        return _kth_from_dense(a, b, coefficients, num_pieces, k, mix), 0
    at, b_np, coef = _factors(a, b, coefficients)
    with _LOCK:
        numba.set_num_threads(_threads())
        found = _kth_banded(at, b_np, coef[:num_pieces], at.shape[0] // num_pieces, mix, n, k)
    if found is None:  # the sample missed (rare): select on the dense ΔW, m×n float32 for this once
        return _kth_from_dense(a, b, coefficients, num_pieces, k, mix), 0
    return found


def _mode_code(mode: str, sparsity: float, mix: Mix | None) -> int:
    """The kernels' mode: DENSE where the matrix keeps its dense ΔW (:func:`snell.spec.keeps_dense`)."""
    kernel = "mixk" if mix is not None else "piecewise_linear"  # the two kernels the fused passes build
    return DENSE if keeps_dense(kernel, mode, sparsity) else _MODE_CODES[mode]


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
    mix: Mix | None = None,
) -> Tensor:
    """W0 + ΔWˢ (or ΔWˢ alone when base is None) as an (m, n) matrix of ``dtype`` (float32 or bfloat16),
    written into ``out`` if given. ``base`` is the (m, n) W0 in float32 or bfloat16, row-contiguous."""
    at, b_np, coef = _factors(a, b, coefficients)
    m, n = b_np.shape[0], a.shape[0]
    out, targets = _merge_targets(m, n, base, dtype, out)
    with _LOCK:
        numba.set_num_threads(_threads())
        kernels.merge_rows(
            at, b_np, coef[:num_pieces], at.shape[0] // num_pieces, *_mix_arrays(mix), np.float32(tau),
            _mode_code(mode, sparsity, mix), *targets, _chunk_rows(m),
        )  # fmt: skip
    return out


def _merge_targets(
    m: int, n: int, base: Tensor | None, dtype: torch.dtype, out: Tensor | None
) -> tuple[Tensor, tuple[np.ndarray, np.uint32, bool, np.ndarray, bool]]:
    """The (m, n) merged matrix (``out``, or a new one) and what a merging kernel takes for W0 and it: W0's bits and
    their shift, whether there is a W0, the matrix's bits and whether they are bf16."""
    out = torch.empty((m, n), dtype=dtype) if out is None else out
    out_bits, _ = _bits(out)
    base_bits, base_shift = _bits(base) if base is not None else (out_bits[:0], 0)
    return out, (base_bits, np.uint32(base_shift), base is not None, out_bits, dtype == torch.bfloat16)


@torch.compiler.disable  # numpy and numba: torch.compile runs it as it is
def merge_selected(
    a: Tensor,
    b: Tensor,
    coefficients: Tensor,
    num_pieces: int,
    mode: str,
    sparsity: float,
    base: Tensor | None,
    dtype: torch.dtype,
    out: Tensor | None = None,
    mix: Mix | None = None,
) -> tuple[Tensor, float]:
    """(:func:`merge`'s W0 + ΔWˢ, :func:`select_tau`'s τ), bit for bit the same, from one pass over ΔW where S above
    τ does not depend on τ (the reference and mask modes, on matrices where τ is banded): the pass merges every
    entry outside the sampled bracket as it will stay and gathers those inside, whose k-th largest magnitude is τ;
    only they are merged again. The forward then rebuilds ΔW once instead of twice. A chunk whose band overflows its
    room is redone with exact room, as in select_tau; a sample that misses τ (rare) selects on the dense ΔW and
    merges in a second pass; the soft mode and small matrices take select_tau and merge."""
    m, n = b.shape[0], a.shape[0]
    k = keep_count(m * n, sparsity)
    code = _mode_code(mode, sparsity, mix)
    if code in (_MODE_CODES["reference"], _MODE_CODES["mask"]) and k > 0 and m * n >= _BAND_MIN_NUMEL:
        out, targets = _merge_targets(m, n, base, dtype, out)
        at, b_np, coef = _factors(a, b, coefficients)
        width = at.shape[0] // num_pieces
        with _LOCK:
            numba.set_num_threads(_threads())
            lower, upper, chunk_rows, capacity = _bracket(at, b_np, coef[:num_pieces], width, mix, n, k)

            def merge_and_gather(
                offsets: np.ndarray, room: np.ndarray, above: np.ndarray, inside: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
                band, positions = np.empty(int(room.sum()), np.float32), np.empty(int(room.sum()), np.int64)
                kernels.merge_band(
                    at, b_np, coef[:num_pieces], width, *_mix_arrays(mix), code, lower, upper, *targets, chunk_rows,
                    offsets, room, band, positions, above, inside,
                )  # fmt: skip
                return band, positions

            offsets, above, inside, (band, positions) = _band_pass(capacity, merge_and_gather)
            tau = _kth_in_band(band, offsets, inside, above, k)
            if tau is not None:
                kernels.merge_band_fix(band, positions, offsets, inside, np.float32(tau), code, *targets)
                return out, tau
        # the sample missed τ (rare): select on the dense ΔW, as select_tau would after its own pass missed too
        tau = _kth_from_dense(a, b, coefficients, num_pieces, k, mix)
    else:
        tau, _ = select_tau(a, b, coefficients, num_pieces, sparsity, mix)
    return merge(a, b, coefficients, num_pieces, tau, mode, sparsity, base, dtype, out, mix), tau


class FactorGrads:
    """Accumulates one matrix's dA (over blocks of rows) and its dB and coefficient gradients (per block).

    dB_p = B_p·(w_p 1) − w_p A_p and dA_p = A_p·(w_pᵀ 1) − w_pᵀ B_p, with the per-piece weights w_p of the kernel
    (:func:`fused_cpu_kernels.backward_rows`), reduced one of three ways:

    - survivors alone: w_p is 0 wherever S' = 0, off the survivors. Where few entries are kept for the width (kept
      fraction <= width·``_SPARSE_KEPT_PER_COLUMN``: r = 16 and 32 at s = 0.9, r = 8 from s = 0.94) the numba pass
      adds each survivor into its column's sums and its row's, so the reduction costs what the kept entries do,
      whatever the width;
    - every entry, in the numba pass: each task into its own (P, width + 1, n) column sums, at 2·width loads and
      stores per entry and piece (s = 0, mixk, whose gradient w.r.t. D is not 0 off the survivors, and r = 8);
    - through BLAS, for wider pieces on matrices from ``_GEMM_MIN_NUMEL`` entries where the survivors are not few:
      the pass writes w_p (P × rows × n float32, a buffer reused across blocks) and two batched GEMMs per block
      reduce them, a column of ones appended to A_p and to B_p giving the row and column sums. At 4096×4096 and
      r = 32 they made a layer's step 1.4× faster than the dense pass; on smaller matrices, and at r = 8, their
      extra memory traffic and thread hand-overs lost 5-30 % (benchmarks/results/fused_cpu/results.md).

    The summation order of dA depends on the thread count (not ΔW's, τ's or the survivors'); dB's too through BLAS.
    mixk (``mix`` given, and the matrix's P + 3 coefficients): its softmax couples the rows of a column, so the
    rows come in one block, the whole matrix, and a first pass sums the softmax's backward over each column.
    ``sparsity``: the matrix's s, which chooses the reduction.
    """

    def __init__(
        self,
        a: Tensor,
        b: Tensor,
        coefficients: Tensor,
        num_pieces: int,
        need_coef: bool,
        mix: Mix | None = None,
        sparsity: float = 0.0,
    ) -> None:
        self.at, b_np, coef = _factors(a, b, coefficients)
        self.coef, self.mix = coef[:num_pieces], mix
        self.mix_grads = np.zeros(3, np.float64)  # Σ over columns of the softmax sums (α), Σ dz·D (γ), Σ gΔ (β)
        self.b = torch.from_numpy(b_np)
        self.num_pieces, self.need_coef = num_pieces, need_coef
        n, rank = a.shape
        self.n = n
        self.width = width = rank // num_pieces
        self.sparse = mix is None and sparsity > 0.0 and 1.0 - sparsity <= width * _SPARSE_KEPT_PER_COLUMN
        self.here = not self.sparse and (width <= 4 or self.b.shape[0] * n < _GEMM_MIN_NUMEL)
        at = torch.from_numpy(self.at[:, :n]).reshape(num_pieces, width, n)
        b_pieces = self.b.T.reshape(num_pieces, width, -1)
        self.a_ones = torch.cat([at, torch.ones(num_pieces, 1, n)], 1).mT  # [A_p | 1]: (P, n, width + 1)
        self.b_ones = torch.cat([b_pieces, torch.ones(num_pieces, 1, len(self.b))], 1)  # [B_p | 1]ᵀ: (P, width + 1, m)
        # Σ_j w_p·B_p[j] (rows < width) and Σ_j w_p: per task and by column (sparse, (n, P·(width + 1))) or by piece
        # (P, width + 1, n) when the numba pass reduces, once for BLAS
        tasks = _threads() if self.here or self.sparse else 1
        self.column_sums = torch.zeros(0 if self.sparse else tasks, num_pieces, width + 1, n)
        self.point_sums = torch.zeros(tasks, n if self.sparse else 0, num_pieces * (width + 1))
        self.a_rows = np.ascontiguousarray(self.at[:, : n if self.sparse else 0].T)  # A (n, r) for the survivors
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
        rows, n = grad.shape
        if self.mix is not None and (first_row, rows) != (0, len(self.b)):
            raise ValueError(f"mixk's backward takes the whole matrix's {len(self.b)} rows at once, got {first_row}..")
        shape = (self.num_pieces, 0 if self.here or self.sparse else rows, n)
        if self.buffer.numel() < math.prod(shape):
            self.buffer = torch.empty(math.prod(shape))
        weights = self.buffer[: math.prod(shape)].view(shape)  # contiguous, as the kernel's loops want it
        block = slice(first_row, first_row + rows)
        coef_rows = np.zeros((rows, self.num_pieces + (self.mix is not None)), np.float64)
        grad_bits, grad_shift = _bits(grad)
        merged_bits = _bits(merged)[0] if merged is not None else grad_bits[:0]
        base_bits, base_shift = _bits(base) if base is not None else (grad_bits[:0], 0)
        mix_params, stats = _mix_arrays(self.mix)
        tau, mode_code = np.float32(tau), _mode_code(mode, sparsity, self.mix)
        mix_column = np.zeros(n if self.mix is not None else 0, np.float32)
        with _LOCK:
            numba.set_num_threads(_threads())
            if self.mix is not None:
                sums, totals = np.zeros((_threads(), n), np.float32), np.zeros(_threads(), np.float64)
                kernels.mix_column_grads(
                    self.at, self.b.numpy(), self.coef, self.width, mix_params, stats, tau, mode_code,
                    grad_bits, np.uint32(grad_shift), sums, totals,
                )  # fmt: skip
                mix_column = sums.sum(0)
                self.mix_grads[0] += mix_column.sum(dtype=np.float64)
                self.mix_grads[2] += totals.sum()
            kernels.backward_rows(
                self.at, self.b.numpy(), self.coef, self.width, mix_params, stats, mix_column, tau, mode_code,
                first_row, grad_bits, np.uint32(grad_shift), base_bits, np.uint32(base_shift), base is not None,
                merged_bits, merged is not None and merged.dtype == torch.bfloat16, merged is not None,
                weights.numpy(), self.column_sums.numpy(), self.a_rows, self.point_sums.numpy(),
                self.grad_b[block].numpy(), coef_rows, self.need_coef,
            )  # fmt: skip
        if not (self.here or self.sparse):
            products = torch.bmm(weights, self.a_ones)  # w_p A_p and, last, Σ_i w_p: (P, rows, width + 1)
            b_rows = self.b_ones[:, :-1, block].mT
            self.grad_b[block] = (b_rows * products[..., -1:] - products[..., :-1]).transpose(0, 1).reshape(rows, -1)
            self.column_sums[0].baddbmm_(self.b_ones[:, :, block], weights)
        if self.need_coef:
            sums = coef_rows.sum(0)
            self.grad_coef += sums[: self.num_pieces]
            self.mix_grads[1] += sums[self.num_pieces :].sum()

    def result(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """(dA (n, r), dB (m, r), dcoefficients or None), float32 (the coefficients' in float64; mixk's P + 3)."""
        at = torch.from_numpy(self.at[:, : self.n])
        if self.sparse:  # by column (n, P·(width + 1)) to by piece (P, width + 1, n)
            sums = self.point_sums.sum(0).reshape(-1, self.num_pieces, self.width + 1).permute(1, 2, 0)
        else:
            sums = self.column_sums.sum(0)
        totals = sums[:, -1:].expand(-1, self.width, -1).reshape(at.shape)  # Σ_j w_p for each column of A_p
        grad_a = (at * totals - sums[:, :-1].reshape(at.shape)).T
        if not self.need_coef:
            return grad_a, self.grad_b, None
        grad_coef = self.grad_coef
        if self.mix is not None:
            gamma = float(self.mix.params[1])
            mix = [self.mix_grads[0], -self.mix_grads[1] / (gamma * gamma), self.mix_grads[2]]
            grad_coef = np.concatenate([grad_coef, mix])
        return grad_a, self.grad_b, torch.from_numpy(grad_coef)
