"""The fused CPU kernels against the plain-autograd transcription, with error bounds derived from the maths.

The fused kernels build ΔW in float32 with their own summation order, so their last bits differ from the
torch path's and from float64. Hence:
- selection is checked by its definition on the kernel's OWN ΔW (``fused_cpu.dense_delta``, which every
  fused pass computes bit for bit): count(|ΔW| > τ) < k <= count(|ΔW| >= τ);
- values and gradients are compared with the float64 naive formula evaluated on the kernel's survivors and
  τ, within the rounding-error bound γ_K·M of ``bounds.py``, which holds for any summation order, so for any
  vector width and thread count.
"""

import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from bounds import U32, abs_gradient_scale, gamma, naive_with_bound, snell_kernels, torch_threads

import snell
import snell.dropout
import snell.function
import snell.fused_cpu_path
import snell.io
import snell.spec
from snell import fallback, fused_cpu
from snell import fused_cpu_kernels as kernels
from snell.dispatch import kernel_path
from snell.dropout import FusedSnellDropout
from snell.function import FusedSnell
from snell.spec import SnellSpec

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="numba is not installed")

MODES = ["reference", "mask", "soft"]


def _spec(mode="reference", sparsity=0.9, op="linear", shape=(96, 80), groups=1, **conv):
    return SnellSpec(op, shape, "piecewise_linear", 2, mode, sparsity, groups, **conv)


def _inputs(spec, r=8, tokens=5, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    m, n = spec.matrix_shape
    if spec.op == "conv2d":
        x = torch.randn(2, spec.weight_shape[1], 5, 5, generator=gen)
    else:
        x = torch.randn(tokens, n, generator=gen)
    weight = torch.randn(spec.weight_shape, generator=gen) * 0.05
    bias = torch.randn(m, generator=gen)
    lead = (spec.groups,) if spec.groups > 1 else ()
    a = torch.rand(*lead, n, r, generator=gen) * 0.2
    b = torch.rand(*lead, m // spec.groups, r, generator=gen) * 0.2
    coef = torch.tensor([0.1, -0.1])
    return [t.to(dtype) for t in (x, weight, bias, a, b)] + [coef]


def _own_delta_and_tau(spec, a, b, coef):
    """The kernel's own ΔW (G, m/G, n) and its τ per group, with the exact top-k definition checked."""
    a_g, b_g, coef = snell.spec.grouped_factors(spec, a, b, coef)
    deltas, taus = [], []
    for g in range(spec.groups):
        delta = fused_cpu.dense_delta(a_g[g], b_g[g], coef, 2)
        tau, _ = fused_cpu.select_tau(a_g[g], b_g[g], coef, 2, spec.sparsity) if spec.sparsity else (-math.inf, 0)
        k = snell.sparsify.keep_count(delta.numel(), spec.sparsity)
        magnitude = delta.abs()
        assert (magnitude > tau).sum() < k <= (magnitude >= tau).sum() or spec.sparsity == 0
        deltas.append(delta)
        taus.append(tau)
    return torch.stack(deltas), torch.tensor(taus, dtype=torch.float64).reshape(-1, 1, 1)


def _check_against_naive(spec, inputs):
    """Forward and every gradient within γ_K·M of the float64 naive formula on the kernel's survivors."""
    _, _, _, a, b, coef = inputs
    own, tau = _own_delta_and_tau(spec, a, b, coef)
    # The kernels' survivors; in the soft mode those strictly above τ (S = |ΔW| − τ is 0 at τ itself).
    keep = (own.abs() > tau.float() if spec.mode == "soft" else own.abs() >= tau.float()).double()
    leaves = [t.double().requires_grad_() for t in inputs]
    expected, bound, _ = naive_with_bound(spec, *leaves, keep, tau)
    grad = torch.randn_like(expected)
    expected.backward(grad, inputs=leaves)
    ours = [t.clone().requires_grad_() for t in inputs]
    with snell_kernels("fused"):
        assert kernel_path(spec, torch.device("cpu"), 8, torch.float32) == "fused_cpu"
        out = FusedSnell.apply(*ours, spec)
    m, n = spec.matrix_shape
    # No sum in forward or backward has more terms than x has entries (the dW GEMM's depth) plus m or n
    # (the reductions into A and B); 64 covers the per-entry operations of ΔW, S and the merge.
    depth = inputs[0].numel() + m + n + 64
    assert ((out.double() - expected).abs() <= gamma(depth) * bound.detach()).all()
    out.backward(grad.float())
    # Gradient bounds: the same derivative with every factor replaced by its magnitude (autograd on |·|
    # inputs through the absolute-value computation gives Σ|term| for each gradient entry).
    for mine, theirs, leaf in zip(ours, leaves, inputs, strict=True):
        scale = abs_gradient_scale(spec, inputs, keep, tau, grad, leaf)
        assert ((mine.grad.double() - theirs.grad).abs() <= gamma(depth * 2) * scale).all()


CASES = [
    *[_spec(mode=md) for md in MODES],
    _spec(sparsity=0.0),
    _spec(mode="soft", sparsity=0.5, shape=(99, 80), groups=3),
    _spec(op="conv2d", shape=(8, 3, 3, 3), padding=(1, 1)),
    *[_spec(mode=md, shape=(600, 300)) for md in MODES],  # 180k entries: the sampled bracket and the band
    _spec(shape=(900, 300), groups=3),
]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.op}-{s.mode}-s{s.sparsity}-g{s.groups}-{s.weight_shape}")
def test_fused_forward_and_gradients_match_the_naive_formula_within_rounding_bounds(spec):
    _check_against_naive(spec, _inputs(spec))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rank", [16, 24, 32])
def test_wide_pieces_match_the_naive_formula_within_rounding_bounds(rank, mode):
    spec = _spec(mode=mode, shape=(600, 300))
    _check_against_naive(spec, _inputs(spec, r=rank))


def test_frozen_factors_give_dx_from_the_forwards_merged_weight_bit_for_bit():
    # Only x wants a gradient (A and B frozen, as in a frozen adapter): the backward skips the factor pass but must
    # still rebuild every group's merged weight with that group's own τ, the forward's bit for bit. dx is then the
    # same GEMM on the same matrix as grad_input on the forward's merged weight: equal, not merely close.
    spec = _spec(sparsity=0.5, shape=(99, 80), groups=3)
    x, weight, bias, a, b, coef = _inputs(spec)
    merged, tau = snell.fused_cpu_path.merged_and_tau(spec, a, b, coef, weight, torch.float32)
    assert len(set(tau.flatten().tolist())) == 3  # each group its own τ
    grad = torch.randn(x.shape[0], 99, generator=torch.Generator().manual_seed(2))
    expected = snell.spec.grad_input(spec, x, merged.reshape(spec.matrix_shape), grad)
    dx, _, factors = snell.fused_cpu_path.backward(spec, x, weight, a, b, coef, tau, grad, True, False, False, False)
    assert factors is None and torch.equal(dx, expected)
    leaf = x.clone().requires_grad_()
    with snell_kernels("fused"):
        FusedSnell.apply(leaf, weight, bias, a, b, coef, spec).backward(grad)
    assert torch.equal(leaf.grad, expected)


def test_learnable_coefficients_get_the_naive_gradient():
    spec = _spec(mode="reference", shape=(96, 80))
    _check_against_naive(spec, _inputs(spec))


# Every branch of _delta_tile: widths 4, 8 and 16 in registers, 12 by groups of four through memory, 6 by columns.
RANKS = [8, 12, 16, 24, 32]
# FactorGrads's reductions: every entry in the numba pass, every entry through BLAS, the survivors alone (s > 0)
ROUTES = ["pass", "gemm", "survivors"]


def _force_route(monkeypatch, route):
    monkeypatch.setattr(fused_cpu, "_GEMM_MIN_NUMEL", 0 if route == "gemm" else 1 << 62)
    monkeypatch.setattr(fused_cpu, "_SPARSE_KEPT_PER_COLUMN", 1.0 if route == "survivors" else 0.0)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("rank", [6, 8, 12, 32])  # piece widths 3 and 6 take the generic loop, 4 and 16 their own
def test_matrices_wider_than_a_column_tile_match_the_naive_formula(rank, route, monkeypatch):
    # The kernels walk the columns in tiles: each column past the first tile must read its own a_i and write its own
    # place in ΔW, dW, the merged weight and dA. A layer of in_features > 512 (ViT-B's 768, LLaMA's 4096) is one.
    _force_route(monkeypatch, route)
    spec = _spec(shape=(64, kernels._TILE + 88))
    _check_against_naive(spec, _inputs(spec, r=rank))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("rank", RANKS)
def test_backward_rebuilds_the_forward_merged_weight_bit_for_bit(rank, route, monkeypatch):
    _force_route(monkeypatch, route)
    # The saved τ selects the forward's survivors only if the backward's ΔW is the forward's, bit for bit:
    # the merged weight the backward writes for dx must equal the forward's exactly, in float32 and bf16.
    spec = _spec(shape=(600, 300))
    _, weight, _, a, b, coef = _inputs(spec, r=rank)
    tau, _ = fused_cpu.select_tau(a, b, coef, 2, 0.9)
    for dtype in (torch.float32, torch.bfloat16):
        base = weight.to(dtype)
        forward = fused_cpu.merge(a, b, coef, 2, tau, "reference", 0.9, base, dtype)
        backward = torch.empty_like(forward)
        accumulator = fused_cpu.FactorGrads(a, b, coef, 2, False, sparsity=0.9)
        for start in range(0, 600, 77):
            grad = torch.randn(min(77, 600 - start), 300).to(dtype)
            accumulator.add_rows(tau, "reference", 0.9, start, grad, base, backward)
        assert torch.equal(forward, backward)


def test_bf16_merge_rounds_like_torch():
    spec = _spec(shape=(600, 300))
    _, weight, _, a, b, coef = _inputs(spec)
    weight[0, :4] = torch.tensor([math.inf, -math.inf, math.nan, 1e38])  # specials and overflow to inf
    tau, _ = fused_cpu.select_tau(a, b, coef, 2, 0.9)
    fp32 = fused_cpu.merge(a, b, coef, 2, tau, "mask", 0.9, weight, torch.float32)
    bf16 = fused_cpu.merge(a, b, coef, 2, tau, "mask", 0.9, weight, torch.bfloat16)
    assert torch.equal(bf16.isnan(), fp32.isnan())
    numbers = ~fp32.isnan()
    assert torch.equal(bf16[numbers], fp32.to(torch.bfloat16)[numbers])


@pytest.mark.parametrize("rank", [8, 16, 32])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_same_tau_and_weight_at_any_thread_count(threads, rank):
    spec = _spec(shape=(1000, 300))
    _, weight, _, a, b, coef = _inputs(spec, r=rank)
    with torch_threads(1):
        tau_1, _ = fused_cpu.select_tau(a, b, coef, 2, 0.9)
        merged_1 = fused_cpu.merge(a, b, coef, 2, tau_1, "soft", 0.9, weight, torch.float32)
    with torch_threads(threads):
        tau_n, _ = fused_cpu.select_tau(a, b, coef, 2, 0.9)
        merged_n = fused_cpu.merge(a, b, coef, 2, tau_n, "soft", 0.9, weight, torch.float32)
    assert tau_1 == tau_n and torch.equal(merged_1, merged_n)


@pytest.mark.parametrize("threads", [2, 3])
def test_the_backward_reaches_every_row_at_any_thread_count(threads):
    # The backward hands a block's rows out to the threads: 3 rows over 2 or 3 threads must all be reduced into dB.
    spec = _spec(shape=(3, 40))
    with torch_threads(threads):
        _check_against_naive(spec, _inputs(spec))


def _assert_exact_top_k(a, b, coef, sparsity, tau):
    delta = fused_cpu.dense_delta(a, b, coef, 2).abs()
    k = snell.sparsify.keep_count(delta.numel(), sparsity)
    assert (delta > tau).sum() < k <= (delta >= tau).sum()


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99, 0.9999])
def test_tau_is_the_exact_kth_largest_of_the_kernels_own_delta(sparsity, rank):
    # The count pass and dense_delta build ΔW in different loops: exactness needs the same bits in both.
    _, _, _, a, b, coef = _inputs(_spec(shape=(700, 400)), r=rank, seed=1)
    tau, _ = fused_cpu.select_tau(a, b, coef, 2, sparsity)
    _assert_exact_top_k(a, b, coef, sparsity, tau)


@pytest.mark.parametrize("n", [1029, 404])  # tiles of 512, 512 and 5 columns; one of 404 (not a multiple of 8)
def test_count_band_counts_and_gathers_exactly_the_entries_of_the_dense_delta(n):
    # The band is gathered by words of eight flags: short tiles leave stale flags past their length.
    _, _, _, a, b, coef = _inputs(_spec(shape=(90, n)), seed=4)
    at, b_np, coef_np = fused_cpu._factors(a, b, coef)
    magnitudes = fused_cpu.dense_delta(a, b, coef, 2).abs().flatten()
    ordered = magnitudes.sort().values
    # float32 scalars, as fused_cpu._bracket passes them (0-d arrays would compile the kernel a second time)
    lower, upper = np.float32(ordered[len(ordered) // 3].item()), np.float32(ordered[len(ordered) // 2].item())
    chunk_rows, chunks, capacity = 8, 12, 4000
    band = np.empty(chunks * capacity, np.float32)
    above, inside = np.empty(chunks, np.int64), np.empty(chunks, np.int64)
    mix = fused_cpu._mix_arrays(None)
    offsets, room = np.arange(chunks) * capacity, np.full(chunks, capacity)
    kernels.count_band(at, b_np, coef_np, 4, *mix, n, lower, upper, chunk_rows, offsets, room, band, above, inside)
    expected = magnitudes[(magnitudes > float(lower)) & (magnitudes <= float(upper))]
    assert above.sum() == (magnitudes > float(upper)).sum() and inside.sum() == len(expected)
    gathered = np.concatenate([band[o : o + i] for o, i in zip(offsets, inside, strict=True)])
    assert torch.equal(torch.from_numpy(np.sort(gathered)), expected.sort().values)


def _bits_of(t):
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def _two_pass_merge(a, b, coef, mode, sparsity, base, dtype, mix=None):
    """select_tau's τ and merge's matrix with it: what merge_selected must reproduce bit for bit."""
    tau, _ = fused_cpu.select_tau(a, b, coef, 2, sparsity, mix)
    return tau, fused_cpu.merge(a, b, coef, 2, tau, mode, sparsity, base, dtype, mix=mix)


def _refuse(*args, **kwargs):
    raise AssertionError("the one-pass route should not have needed this")


@pytest.mark.parametrize("rank", [8, 32])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1029, 404])  # tiles of 512, 512 and 5 columns; one of 404 (not a multiple of 8)
def test_the_one_pass_merge_writes_what_select_tau_and_merge_write(n, mode, sparsity, rank, monkeypatch):
    # merge_selected merges the entries outside the sampled bracket before τ is known and the band's once it is:
    # every entry, in float32 and bf16, with W0 and without, must come out as merge writes it with τ.
    _, weight, _, a, b, coef = _inputs(_spec(shape=(200, n)), r=rank, seed=5)
    cases = [(base, dtype) for dtype in (torch.float32, torch.bfloat16) for base in (weight.to(dtype), None)]
    expected = [_two_pass_merge(a, b, coef, mode, sparsity, base, dtype) for base, dtype in cases]
    if mode != "soft":  # S above τ depends on τ in the soft mode only: the others must take the one pass
        monkeypatch.setattr(fused_cpu, "select_tau", _refuse)
        monkeypatch.setattr(fused_cpu, "merge", _refuse)
    for (base, dtype), (tau, merged) in zip(cases, expected, strict=True):
        ours, our_tau = fused_cpu.merge_selected(a, b, coef, 2, mode, sparsity, base, dtype)
        assert our_tau == tau and torch.equal(_bits_of(ours), _bits_of(merged))


def _band_room(a, b, coef, sparsity, overflowing):
    """Band room per chunk that every chunk (``"every"``) or only some chunks (``"some"``) of a band pass overflow:
    the fewest band entries a chunk holds, counted on the kernel's own float32 ΔW against the pass's bracket."""
    if overflowing == "every":
        return 1
    m, n = b.shape[0], a.shape[0]
    at, b_np, c_np = fused_cpu._factors(a, b, coef)
    k = snell.sparsify.keep_count(m * n, sparsity)
    lower, upper, chunk_rows, _ = fused_cpu._bracket(at, b_np, c_np[:2], at.shape[0] // 2, None, n, k)
    magnitude = fused_cpu.dense_delta(a, b, coef, 2).abs()
    inside = [int(((c > float(lower)) & (c <= float(upper))).sum()) for c in magnitude.split(chunk_rows)]
    assert min(inside) < max(inside), inside
    return min(inside)


@pytest.mark.parametrize("overflowing", ["every", "some"])
def test_the_one_pass_merge_redoes_an_overflowing_band_with_exact_room(overflowing, monkeypatch):
    _, weight, _, a, b, coef = _inputs(_spec(shape=(600, 400)), seed=4)
    tau, merged = _two_pass_merge(a, b, coef, "reference", 0.9, weight, torch.float32)
    room = _band_room(a, b, coef, 0.9, overflowing)
    monkeypatch.setattr(fused_cpu, "_band_capacity", lambda expected: room)
    monkeypatch.setattr(fused_cpu, "select_tau", _refuse)
    monkeypatch.setattr(fused_cpu, "merge", _refuse)
    ours, our_tau = fused_cpu.merge_selected(a, b, coef, 2, "reference", 0.9, weight, torch.float32)
    assert our_tau == tau and torch.equal(_bits_of(ours), _bits_of(merged))


def test_the_one_pass_merge_recovers_from_a_sample_that_misses(monkeypatch):
    _, weight, _, a, b, coef = _inputs(_spec(shape=(600, 400)), seed=3)
    b = b.clone()
    b[0] = 10.0  # row 0's |ΔW| is far from the rest: a sample of row 0 alone brackets the wrong values
    tau, merged = _two_pass_merge(a, b, coef, "mask", 0.9, weight, torch.bfloat16)
    rows, cols = fused_cpu._sample_positions(600, 400)
    monkeypatch.setattr(fused_cpu, "_sample_positions", lambda m, n: (rows * 0, cols))
    monkeypatch.setattr(fused_cpu, "select_tau", _refuse)  # its own pass would miss in the same way
    ours, our_tau = fused_cpu.merge_selected(a, b, coef, 2, "mask", 0.9, weight, torch.bfloat16)
    assert our_tau == tau and torch.equal(_bits_of(ours), _bits_of(merged))
    _assert_exact_top_k(a, b, coef, 0.9, our_tau)


@pytest.mark.parametrize("n", [5, 16, 404, 1024, 3072])
def test_factors_lay_a_transposed_over_an_odd_number_of_cache_lines_per_row(n):
    # At a stride of a multiple of 4 KiB every row of Aᵀ fell into one L1 set (the r = 32 rebuild ran 1.4× slower).
    a = torch.randn(n, 8)
    at, _, _ = fused_cpu._factors(a, torch.randn(3, 8), torch.ones(2))
    lines, rest = divmod(at.shape[1] * at.itemsize, 64)
    assert rest == 0 and lines % 2 == 1 and n <= at.shape[1] < n + 32
    assert at.flags.c_contiguous and np.array_equal(at[:, :n], a.T.numpy())


def test_ties_at_tau_are_all_kept():
    # Rows of B repeated: every |ΔW| value appears 50 times, so τ sits inside a block of ties.
    _, _, _, a, b, coef = _inputs(_spec(shape=(600, 400)), seed=2)
    b = b[:12].repeat(50, 1)
    tau, _ = fused_cpu.select_tau(a, b, coef, 2, 0.9)
    _assert_exact_top_k(a, b, coef, 0.9, tau)


def test_a_sample_that_misses_falls_back_to_the_dense_selection(monkeypatch):
    _, _, _, a, b, coef = _inputs(_spec(shape=(600, 400)), seed=3)
    rows, cols = fused_cpu._sample_positions(600, 400)
    monkeypatch.setattr(fused_cpu, "_sample_positions", lambda m, n: (rows * 0, cols))  # row 0 only: biased
    b = b.clone()
    b[0] = 10.0  # row 0's |ΔW| is far from the rest, so the bracket misses τ
    tau, band = fused_cpu.select_tau(a, b, coef, 2, 0.9)
    assert band == 0
    _assert_exact_top_k(a, b, coef, 0.9, tau)


@pytest.mark.parametrize("overflowing", ["every", "some"])
def test_an_overflowing_band_is_redone_with_exact_room(overflowing, monkeypatch):
    _, _, _, a, b, coef = _inputs(_spec(shape=(600, 400)), seed=4)
    room = _band_room(a, b, coef, 0.9, overflowing)
    monkeypatch.setattr(fused_cpu, "_band_capacity", lambda expected: room)
    tau, band = fused_cpu.select_tau(a, b, coef, 2, 0.9)
    assert band > 1
    _assert_exact_top_k(a, b, coef, 0.9, tau)


def test_dropout_on_the_fused_path_matches_the_naive_formula_within_rounding_bounds():
    # y = x·W0ᵀ + b + (D⊙x)·ΔWˢᵀ, D drawn from its seed in forward and regenerated in backward, against float64 on
    # the kernels' own survivors within the dropout-free check's γ·M: the branch's M is naive_with_bound's with D⊙x
    # for x (D's scale 1/(1 − p) adds one rounding per entry, inside the 64 per-entry operations of the depth).
    spec = _spec(shape=(300, 200))
    inputs = _inputs(spec)
    x, weight, bias, a, b, coef = inputs
    own, tau = _own_delta_and_tau(spec, a, b, coef)
    keep = (own.abs() >= tau.float()).double()
    torch.manual_seed(0)
    kept = snell.dropout.dropout_keep(x, 0.2, snell.dropout._draw_seed())
    assert 0 < int(kept.sum()) < x.numel()
    mask = kept.double() / snell.dropout.keep_probability(0.2)
    w64, bias64, coef64 = weight.double(), bias.double(), coef.double()
    zeros = torch.zeros_like(w64), torch.zeros_like(bias64)

    def layer(x, a, b, absolute=False):
        """The layer with dropout in float64 and, with ``absolute``, its absolute-value computation M."""
        branch, branch_abs, _ = naive_with_bound(spec, x * mask, *zeros, a, b, coef64, keep, tau)
        if absolute:
            return torch.nn.functional.linear(x, w64.abs(), bias64.abs()) + branch_abs
        return torch.nn.functional.linear(x, w64, bias64) + branch

    leaves = [t.double().requires_grad_() for t in (x, a, b)]
    expected = layer(*leaves)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    ours = [t.clone().requires_grad_() for t in (x, a, b)]
    torch.manual_seed(0)
    with snell_kernels("fused"):
        assert kernel_path(spec, torch.device("cpu"), 8, torch.float32) == "fused_cpu"
        out = FusedSnellDropout.apply(ours[0], weight, bias, ours[1], ours[2], coef, spec, 0.2, None)
    out.backward(grad.float())
    depth = x.numel() + sum(spec.matrix_shape) + 64  # as in _check_against_naive
    x_abs = x.double().abs().requires_grad_()
    magnitude = layer(x_abs, a.double(), b.double(), absolute=True)
    assert ((out.double() - expected).abs() <= gamma(depth) * magnitude.detach()).all()
    magnitude.backward(grad.abs())  # dx = gy·W0 + D⊙(gy·ΔWˢ): M's backward sums its terms' magnitudes
    dropped = [x * mask, weight, bias, a, b, coef]  # the factors see D⊙x where the dropout-free check sees x
    scales = [x_abs.grad] + [abs_gradient_scale(spec, dropped, keep, tau, grad, dropped[i]) for i in (3, 4)]
    for mine, theirs, scale in zip(ours, leaves, scales, strict=True):
        assert ((mine.grad.double() - theirs.grad).abs() <= gamma(depth * 2) * scale).all()


def test_bf16_layer_on_the_fused_path_saves_nothing_m_by_n():
    spec = _spec(shape=(600, 300))
    x, weight, bias, a, b, coef = [t.bfloat16() if t.dim() else t for t in _inputs(spec, tokens=16)]
    a, b, x = a.requires_grad_(), b.requires_grad_(), x.requires_grad_()
    weight = torch.nn.Parameter(weight, requires_grad=False)  # W0 is alive anyway: not counted
    saved = []

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = FusedSnell.apply(x, weight, bias, a, b, coef.float(), spec)
    assert out.dtype == torch.bfloat16 and max(saved) < 600 * 300
    out.float().sum().backward()
    assert a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad.float()).all()


@pytest.mark.parametrize("kernel", ["piecewise_linear", "mixk"])
def test_fused_passes_leave_the_layers_tensors_resizable(kernel):
    # FSDP frees a layer's gathered parameters by resizing their storage to 0; Tensor.numpy() marks a storage
    # non-resizable for good, and a 2-process --fsdp run failed at its first reshard once small layers ran fused.
    spec = SnellSpec("linear", (600, 300), kernel, 2, "reference", 0.9)
    x, weight, _, a, b, coef = _inputs(spec)
    coef = torch.tensor([[0.1, -0.1, 1.0, 1.0, 0.0]]) if kernel == "mixk" else coef
    leaves = [t.clone().requires_grad_() for t in (x, a, b, coef)]
    with snell_kernels("fused"):
        assert kernel_path(spec, torch.device("cpu"), 8, torch.float32) == "fused_cpu"
        FusedSnell.apply(leaves[0], weight, None, *leaves[1:], spec).sum().backward()
    assert all(t.untyped_storage().resizable() for t in (weight, *leaves))
    snell.io.tensors_digest({"a": leaves[1], "weight": weight})  # the trained tensors' fingerprint, after training
    assert weight.untyped_storage().resizable() and leaves[1].untyped_storage().resizable()


def test_kernel_path_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    big, vit, small = _spec(shape=(4096, 4096)), _spec(shape=(768, 768)), _spec(shape=(192, 576))
    assert kernel_path(big, cpu, 8, torch.float32, torch.bfloat16) == "fused_cpu"  # LLaMA-2-7B's projections
    assert kernel_path(vit, cpu, 8, torch.float32) == "fused_cpu"  # ViT-B's smallest matrix, measured faster
    assert kernel_path(_spec(shape=(2304, 768), groups=3), cpu, 8, torch.float32) == "fused_cpu"  # ViT-B's q/k/v
    assert kernel_path(big, cpu, 16, torch.float32) == "fused_cpu"
    assert kernel_path(big, cpu, 32, torch.float32) == "fused_cpu"  # 16 columns a piece
    assert kernel_path(big, cpu, 64, torch.float32) == "torch"  # wider: not measured
    assert kernel_path(vit, cpu, 16, torch.float32) == "fused_cpu"
    assert kernel_path(vit, cpu, 32, torch.float32) == "fused_cpu"
    assert kernel_path(_spec(shape=(576, 576)), cpu, 32, torch.bfloat16) == "fused_cpu"  # SmolLM2's q/o: 1.21x
    assert kernel_path(small, cpu, 32, torch.float32) == "fused_cpu"  # SmolLM2's k/v: 1.53x
    assert kernel_path(_spec(shape=(128, 128)), cpu, 8, torch.float32) == "fused_cpu"  # 16 Ki entries: 1.13-1.32x
    assert kernel_path(_spec(shape=(127, 128)), cpu, 8, torch.float32) == "torch"  # fewer: not measured
    assert kernel_path(big, cpu, 8, torch.float64) == "torch"
    assert kernel_path(big, cpu, 8, torch.float16) == "torch"
    assert kernel_path(big, torch.device("meta"), 8, torch.float32) == "torch"
    assert kernel_path(_spec(op="linear_t", shape=(4096, 4096)), cpu, 8, torch.float32) == "torch"
    monkeypatch.setenv("SNELL_KERNELS", "fused")
    assert kernel_path(_spec(shape=(127, 128)), cpu, 8, torch.float32) == "fused_cpu"
    assert kernel_path(big, cpu, 32, torch.float32) == "fused_cpu"
    monkeypatch.setenv("SNELL_KERNELS", "torch")
    assert kernel_path(big, cpu, 8, torch.float32) == "torch"
    monkeypatch.setenv("SNELL_KERNELS", "numba")
    with pytest.raises(ValueError, match="SNELL_KERNELS"):
        kernel_path(big, cpu, 8, torch.float32)


def test_the_compile_check_runs_every_kernel(monkeypatch):
    # available() promises that a kernel that fails to compile sends the layers to the torch path, so the check must
    # run every kernel a pass can call: the public ones of fused_cpu_kernels.
    names = [name for name, value in vars(kernels).items() if not name.startswith("_") and hasattr(value, "signatures")]
    ran = set()
    for name in names:
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, _kernel=kernel, _name=name: ran.add(_name) or _kernel(*args))
    monkeypatch.setattr(fused_cpu, "_compiles", fused_cpu._compiles.__wrapped__)
    assert fused_cpu._compiles() and "merge_band" in names and ran == set(names)


def test_a_compilation_of_this_module_is_announced_once_and_other_compilations_are_not(caplog):
    # numba sends "numba:compile" only when it compiles; a function loaded from its cache sends nothing (a cold
    # cache in a fresh process printed the line, a warm one did not: checked by hand, NUMBA_CACHE_DIR empty or not).
    from numba import njit
    from numba.core import event

    from snell.compile_notice import CompileNotice

    def plus_one(x):
        return x + 1

    def twice(x):
        return 2 * x

    twice.__module__ = "another.package"
    notice = CompileNotice(__name__)
    with event.install_listener("numba:compile", notice), caplog.at_level("WARNING", logger="snell"):
        njit(twice)(1)
        assert not caplog.records
        njit(plus_one)(1)
        njit(plus_one)(1.0)
        njit(plus_one)(1j)
    assert [record.getMessage()[:46] for record in caplog.records] == ["snell: compiling the fused CPU kernels with nu"]


def test_the_compile_check_announces_compilations_of_the_kernels_once_per_process(monkeypatch):
    import snell.compile_notice

    announced = []
    monkeypatch.setattr(snell.compile_notice, "announce_compiles", announced.append)
    assert fused_cpu._compiles.__wrapped__() and announced == [kernels.__name__]
    monkeypatch.undo()
    first = snell.compile_notice.announce_compiles("a.module")
    assert snell.compile_notice.announce_compiles("a.module") is first  # registered once, not once per call


def test_starting_the_kernels_keeps_torchs_thread_count():
    # numba's OpenMP pool starts once per process and set the process's OpenMP thread count to its own, which torch
    # reads: a fresh process with a pool of two, one torch thread, then the check that starts the pool.
    code = "import torch; torch.set_num_threads(1); from snell import fused_cpu; assert fused_cpu.available(); "
    code += "print(torch.get_num_threads(), fused_cpu._threads())"
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.split() == ["1", "1"], done.stderr[-2000:]


def test_the_compile_check_leaves_torchs_random_state_alone():
    # It runs at the first fused layer of a process: drawing from the default generator there made a run's dropout
    # masks depend on whether an earlier run in the same process had already triggered it.
    state = torch.get_rng_state()
    assert fused_cpu._compiles.__wrapped__()
    assert torch.equal(torch.get_rng_state(), state)


def test_without_numba_the_torch_path_runs_with_one_warning(monkeypatch):
    monkeypatch.setattr(fused_cpu, "numba", None)
    monkeypatch.setattr(fallback, "_said", set())
    spec = _spec(shape=(4096, 4096))  # a size the fused path takes
    with pytest.warns(UserWarning, match="numba is not installed"):
        assert kernel_path(spec, torch.device("cpu"), 8, torch.float32) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_path(spec, torch.device("cpu"), 8, torch.float32) == "torch"


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("mode", MODES)
def test_fused_backward_over_several_row_blocks_and_groups(mode, rank, route, monkeypatch):
    monkeypatch.setattr(snell.fused_cpu_path, "BLOCK_ENTRIES", 1 << 14)  # 54 rows: 6 blocks per group
    _force_route(monkeypatch, route)
    spec = _spec(mode=mode, shape=(900, 300), groups=3)
    _check_against_naive(spec, _inputs(spec, r=rank))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_bf16_tokens_match_the_torch_path_within_one_bf16_rounding(weight_dtype):
    # Under autocast x is bf16 while W0 may stay float32. Both paths round the same float32 W0 + ΔWˢ to bf16
    # (up to ΔW's last bits, which can move a value across a bf16 rounding boundary: one bf16 ulp, 2^-8
    # relative) and both run the same bf16 GEMM, whose output is rounded once more: |Δy| <= 2^-7·(|x|·|W|ᵀ)
    # + 2^-8·|y|.
    spec = _spec(shape=(600, 300))
    x, weight, _, a, b, coef = _inputs(spec, tokens=16)
    x, weight = x.bfloat16(), weight.to(weight_dtype)
    outs = {}
    for choice in ("fused", "torch"):
        with snell_kernels(choice):
            outs[choice] = FusedSnell.apply(x, weight, None, a, b, coef, spec)
    assert outs["fused"].dtype == outs["torch"].dtype == torch.bfloat16
    merged = weight.float() + snell.function.sparse_delta(spec, a, b, coef, "torch")[0].reshape(600, 300)
    bound = 2**-7 * (x.float().abs() @ merged.abs().T) + 2**-8 * outs["torch"].float().abs()
    assert ((outs["fused"].float() - outs["torch"].float()).abs() <= bound).all()


def _exact_distances(a, b, width):
    """‖a_p − b_p‖ per piece in float64 from explicit differences: exactly 0 where the pieces are equal."""
    return [torch.cdist(b[:, p * width : (p + 1) * width], a[:, p * width : (p + 1) * width],
                        compute_mode="donot_use_mm_for_euclid_dist") for p in range(2)]  # fmt: skip


def _factor_grads(choice, spec, inputs, grad):
    leaves = [t.clone().requires_grad_() for t in inputs]
    with snell_kernels(choice):
        FusedSnell.apply(*leaves, spec).backward(grad)
    return leaves[3].grad.double(), leaves[4].grad.double()


def _sparsity_no_rounding_can_move(delta, error, around):
    """The sparsity nearest ``around`` whose top-k boundary no rounding within ``error`` (float64, per entry) can
    cross: every kept entry's exact |ΔW| minus its error exceeds every dropped entry's plus its error. Two paths whose
    ΔW are each within ``error`` of ``delta`` then keep the same survivors, on any machine and summation order."""
    magnitudes, order = delta.abs().flatten().sort(descending=True)
    spread = error.flatten()[order]
    lowest_kept = (magnitudes - spread).cummin(0).values
    highest_dropped = (magnitudes + spread).flip(0).cummax(0).values.flip(0)
    total = magnitudes.numel()
    target = round((1 - around) * total)
    separated = [k for k in range(target // 2, 2 * target) if lowest_kept[k - 1] > highest_dropped[k]]
    assert separated, "no top-k boundary near the requested sparsity is wider than the rounding errors"
    k = min(separated, key=lambda k: abs(k - target))
    sparsity = 1 - k / total
    assert snell.sparsify.keep_count(total, sparsity) == k
    return sparsity


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("rank", [16, 32])
def test_wide_pieces_match_the_torch_path_within_both_paths_rounding_bounds(rank, route, monkeypatch):
    _force_route(monkeypatch, route)
    # Both paths select the same survivors here (asserted), so each is within its rounding bound of the exact
    # float64 gradient and they are within the sum of the two bounds of each other. The fused path's is γ·M
    # (bounds.py). The torch path's distances come from d² = ‖a‖² + ‖b‖² − 2a·b (a GEMM of 2w + 2 terms, whose
    # magnitudes sum to T = Σ_c (|a_c| + |b_c|)²), so to first order its d_p carries the relative error
    # e_p = γ_{2w+2}·T_p / (2 d_p²) + u, its ΔW the absolute error Σ_p |α_p|·d_p·(e_p + γ_2), and in the
    # reference mode the survivor factor |ΔW| that error relative to |ΔW|: each weight w_p = α_p·g·|ΔW|/d_p is off
    # by at most the sum ρ of those relative errors (+ γ_3), and dA_p[i] = Σ_j w_p·(a_i − b_j) by
    # Σ_j |w_p|·ρ·(|a_i| + |b_j|) on top of γ·M.
    inputs = _inputs(_spec(shape=(600, 300)), r=rank)
    x, _, _, a, b, coef = inputs
    width, m, n = rank // 2, 600, 300
    a64, b64, coef64 = a.double(), b.double(), coef.double()
    dists = _exact_distances(a64, b64, width)
    delta = sum(c * d for c, d in zip(coef64, dists, strict=True))
    relative = []
    for p in range(2):
        cols = slice(p * width, (p + 1) * width)
        total = (a64[:, cols].abs().unsqueeze(0) + b64[:, cols].abs().unsqueeze(1)).square().sum(-1)
        relative.append(gamma(2 * width + 2) * total / (2 * dists[p].square()) + U32)
    delta_error = sum(c.abs() * d * (e + gamma(2)) for c, d, e in zip(coef64, dists, relative, strict=True))
    # The fused path's d_p sums w squared differences (relative error at most γ_{w+4}); two roundings combine them.
    fused_error = sum(c.abs() * d * gamma(width + 6) for c, d in zip(coef64, dists, strict=True))
    spec = _spec(shape=(600, 300), sparsity=_sparsity_no_rounding_can_move(delta, delta_error + fused_error, 0.9))
    own, tau = _own_delta_and_tau(spec, a, b, coef)
    keep = (own.abs() >= tau.float()).double()
    assert max(float((e * keep).max()) for e in relative) < 1e-3  # first order holds
    torch_delta, _ = snell.function.sparse_delta(spec, a, b, coef, "torch")
    assert torch.equal(torch_delta != 0, keep.bool())  # as the choice of sparsity guarantees
    grad = torch.randn(x.shape[0], 600, generator=torch.Generator().manual_seed(5))
    fused, reference = _factor_grads("fused", spec, inputs, grad), _factor_grads("torch", spec, inputs, grad)
    g_abs = (grad.double().T @ x.double()).abs()
    survivor_error = torch.where(keep.bool()[0], delta_error / delta.abs(), 0)
    depth = x.numel() + m + n + 64
    for index, (mine, theirs) in enumerate(zip(fused, reference, strict=True)):
        bound = 2 * gamma(depth * 2) * abs_gradient_scale(spec, inputs, keep, tau, grad.double(), inputs[3 + index])
        extra = torch.zeros_like(bound)
        for p in range(2):
            cols = slice(p * width, (p + 1) * width)
            weights = coef64[p].abs() * g_abs * delta.abs() * keep[0] / dists[p]
            weights = weights * (relative[p] + survivor_error + gamma(3))
            if index == 0:  # dA
                extra[:, cols] = a64[:, cols].abs() * weights.sum(0, keepdim=True).T + weights.T @ b64[:, cols].abs()
            else:
                extra[:, cols] = b64[:, cols].abs() * weights.sum(1, keepdim=True) + weights @ a64[:, cols].abs()
        assert ((mine - theirs).abs() <= bound + extra).all()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("rank", [8, 16, 32])
def test_equal_pieces_get_the_zero_subgradient(rank, sparsity, route, monkeypatch):
    _force_route(monkeypatch, route)
    # ‖a_p − b_p‖ has no derivative at a_p = b_p: the kernels take 0 there (never NaN or Inf). Expected: the
    # exact float64 gradients with that subgradient, dA_p[i] = Σ_j w_p[j,i]·(a_i − b_j) with w_p = α_p·g·S'/d_p
    # and 0 where d_p = 0, within the γ·M bound of the naive-formula tests.
    spec = _spec(sparsity=sparsity, shape=(200, 120))
    inputs = _inputs(spec, r=rank)
    x, _, _, a, b, coef = inputs
    width = rank // 2
    b[5, :width] = a[7, :width]  # piece 0 equal at (5, 7)
    b[9] = a[11]  # both pieces equal at (9, 11): ΔW = 0 there
    own, tau = _own_delta_and_tau(spec, a, b, coef)
    assert own[0, 9, 11] == 0
    keep = (own.abs() >= tau.float()).double()
    grad = torch.randn(x.shape[0], 200, generator=torch.Generator().manual_seed(6))
    mine = _factor_grads("fused", spec, inputs, grad)
    assert all(torch.isfinite(t).all() for t in mine)
    a64, b64, coef64 = a.double(), b.double(), coef.double()
    dists = _exact_distances(a64, b64, width)
    assert dists[0][5, 7] == 0 and dists[0][9, 11] == dists[1][9, 11] == 0
    delta = sum(c * d for c, d in zip(coef64, dists, strict=True))
    slope = torch.ones_like(delta) if sparsity == 0 else delta.abs() * keep[0]
    q = (grad.double().T @ x.double()) * slope
    expected = torch.empty_like(a64), torch.empty_like(b64)
    for p in range(2):
        cols = slice(p * width, (p + 1) * width)
        w = torch.where(dists[p] > 0, coef64[p] * q / dists[p].clamp_min(1e-300), 0)
        expected[0][:, cols] = a64[:, cols] * w.sum(0).unsqueeze(-1) - w.T @ b64[:, cols]
        expected[1][:, cols] = b64[:, cols] * w.sum(1).unsqueeze(-1) - w @ a64[:, cols]
    depth = x.numel() + 200 + 120 + 64
    for index in range(2):
        scale = abs_gradient_scale(spec, inputs, keep, tau, grad.double(), inputs[3 + index])
        assert ((mine[index] - expected[index]).abs() <= gamma(depth * 2) * scale).all()


def test_injection_loads_the_fused_kernels_only_where_a_layer_takes_them(monkeypatch):
    # Loaded at injection, their one-time cost (numba's code and threads, ~60 MB) stays out of the first step.
    calls = []
    monkeypatch.setattr(fused_cpu, "available", lambda: calls.append(True) or True)
    config = snell.SnellConfig(r=8, target_modules=["0"])
    snell.get_snell_model(torch.nn.Sequential(torch.nn.Linear(1024, 1024)), config)
    assert calls == [True]
    snell.get_snell_model(torch.nn.Sequential(torch.nn.Linear(16, 16)), config)  # the torch path's size
    assert calls == [True]
