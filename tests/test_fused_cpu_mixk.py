"""The fused CPU kernels on SNELLA's mixed kernel, ΔW = D + α·softmax(D/γ) + β (softmax over each column's rows).

As for the piecewise-linear kernel (test_fused_cpu.py), the fused ΔW is float32 with its own summation order, so:
- its ΔW is checked against float64 within a first-order rounding bound derived below;
- selection is checked by its definition on the kernels' OWN ΔW (``fused_cpu.dense_delta`` with the same column
  statistics, which every pass rebuilds bit for bit): count(|ΔW| > τ) < k <= count(|ΔW| >= τ);
- the layer's output and gradients are compared with float64 autograd on the naive formula evaluated on the
  kernels' own survivors, so no entry straddling τ can flip between the two.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bounds import U32, gamma, snell_kernels, torch_threads
from naive import naive_kernel

import snell.sparsify
from snell import fused_cpu, fused_cpu_kernels
from snell.dispatch import kernel_path
from snell.function import FusedSnell
from snell.spec import SnellSpec, with_sparsities

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="numba is not installed")

MIX = (1.3, 0.7, 0.01)  # α, γ, β away from their (1, 1, 0) start, so that each one's role shows
MODES = ["reference", "mask", "soft"]


def _factors(m, n, r=8, seed=0, groups=None):
    """A (n, r), B (m, r) and the P + 3 coefficients; with ``groups``, a leading group dimension on each."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if groups is None else (groups,)
    a = torch.rand(*lead, n, r, generator=gen) * 0.4
    b = torch.rand(*lead, m, r, generator=gen) * 0.4
    coef = torch.tensor([0.3, -0.2, *MIX])
    if groups is not None:  # one (α, γ, β) row per group, as the layers pass them
        coef = torch.stack([coef * torch.tensor([1, 1, 1 + 0.2 * g, 1 - 0.1 * g, 1]) for g in range(groups)])
    return a, b, coef


def _own_delta(a, b, coef):
    """The kernels' ΔW with their column statistics, and those statistics."""
    mix = fused_cpu.mix_stats(a, b, coef, 2)
    return fused_cpu.dense_delta(a, b, coef, 2, mix), mix


def test_exp_is_within_two_ulp_of_the_exact_exponential():
    values = np.linspace(-87.0, 0.0, 200_001, dtype=np.float32)
    exact = np.exp(values.astype(np.float64))
    ours = values.copy()
    fused_cpu_kernels._exp_tile(ours, ours.shape[0], np.empty(ours.shape[0], np.uint32))
    # One ulp of a float32 is at most 2^-23 of it, so 2 ulp is 2^-22 relative.
    assert (np.abs(ours - exact) <= 2.0**-22 * exact).all()


@pytest.mark.parametrize("shape", [(96, 80), (600, 300)])
def test_delta_is_the_mixed_kernel_within_its_rounding_bound(shape):
    m, n = shape
    a, b, coef = _factors(m, n)
    ours, _ = _own_delta(a, b, coef)
    a64, b64, c64 = a.double(), b.double(), coef.double()
    alpha, scale, beta = (float(v) for v in c64[2:])
    d = naive_kernel("piecewise_linear", a64, b64, c64[:2], 2)
    d_abs = naive_kernel("piecewise_linear", a64, b64, c64[:2].abs(), 2)
    z = d / scale
    s = torch.softmax(z, dim=-2)
    exact = d + alpha * s + beta
    # First-order bound, entry by entry. D is a sum of P square roots of sums of r/P squares: γ_{r+8}·Σ|c_p|d_p.
    # z = D/γ then carries that error over |γ| plus one rounding, and exp(z − M) (M is one of the column's own z) a
    # relative error of the two z's errors, the subtraction's rounding and 2 ulp (4u) of its own: E per column.
    # S sums m of them (γ_m), s = e/S adds one rounding, α·s one, and the two additions one each.
    error_d = gamma(8 + 8) * d_abs
    error_z = error_d / abs(scale) + U32 * z.abs()
    column = 2 * error_z.amax(-2, keepdim=True) + U32 * (z - z.amax(-2, keepdim=True)).abs() + 4 * U32
    error_s = s * (2 * column.amax(-2, keepdim=True) + gamma(m) + U32)
    bound = error_d + abs(alpha) * error_s + 2 * U32 * (d.abs() + abs(alpha) * s + abs(beta))
    # Twice the first-order bound covers the products of errors, which are smaller by another factor of u·m.
    assert ((ours.double() - exact).abs() <= 2 * bound).all()


@pytest.mark.parametrize("shape", [(96, 80), (700, 400)])  # the dense selection, and the sampled bracket and band
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_tau_is_the_exact_kth_largest_of_the_kernels_own_delta(sparsity, shape):
    a, b, coef = _factors(*shape, seed=1)
    delta, mix = _own_delta(a, b, coef)
    tau, _ = fused_cpu.select_tau(a, b, coef, 2, sparsity, mix)
    magnitude = delta.abs()
    k = snell.sparsify.keep_count(delta.numel(), sparsity)
    assert (magnitude > tau).sum() < k <= (magnitude >= tau).sum()


@pytest.mark.parametrize("mode", MODES)
def test_forward_and_backward_build_the_same_merged_weight_bit_for_bit(mode):
    # The forward's one pass (merge_selected) and the two (select_tau, merge) give the same τ and matrix, and the
    # backward rebuilds that matrix, so the saved τ selects the forward's survivors.
    a, b, coef = _factors(600, 300, seed=2)
    weight = torch.randn(600, 300, generator=torch.Generator().manual_seed(3)) * 0.05
    mix = fused_cpu.mix_stats(a, b, coef, 2)
    tau, _ = fused_cpu.select_tau(a, b, coef, 2, 0.9, mix)
    for dtype in (torch.float32, torch.bfloat16):
        base = weight.to(dtype)
        forward = fused_cpu.merge(a, b, coef, 2, tau, mode, 0.9, base, dtype, mix=mix)
        one_pass, one_pass_tau = fused_cpu.merge_selected(a, b, coef, 2, mode, 0.9, base, dtype, mix=mix)
        backward = torch.empty_like(forward)
        grads = fused_cpu.FactorGrads(a, b, coef, 2, True, fused_cpu.mix_stats(a, b, coef, 2))
        grads.add_rows(tau, mode, 0.9, 0, torch.randn(600, 300).to(dtype), base, backward)
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert one_pass_tau == tau and torch.equal(one_pass.view(bits), forward.view(bits))
        assert torch.equal(forward.view(bits), backward.view(bits))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_same_statistics_tau_and_weight_at_any_thread_count(threads):
    a, b, coef = _factors(1000, 300, seed=4)
    weight = torch.randn(1000, 300, generator=torch.Generator().manual_seed(5))
    results = []
    for count in (1, threads):
        with torch_threads(count):
            mix = fused_cpu.mix_stats(a, b, coef, 2)
            tau, _ = fused_cpu.select_tau(a, b, coef, 2, 0.9, mix)
            results.append(
                (mix.stats, tau, fused_cpu.merge(a, b, coef, 2, tau, "soft", 0.9, weight, torch.float32, mix=mix))
            )
    (stats_1, tau_1, merged_1), (stats_n, tau_n, merged_n) = results
    assert np.array_equal(stats_1, stats_n) and tau_1 == tau_n and torch.equal(merged_1, merged_n)


def test_mixk_takes_the_whole_matrix_in_one_block():
    a, b, coef = _factors(96, 80)
    grads = fused_cpu.FactorGrads(a, b, coef, 2, False, fused_cpu.mix_stats(a, b, coef, 2))
    with pytest.raises(ValueError, match="whole matrix's 96 rows"):
        grads.add_rows(0.0, "reference", 0.5, 0, torch.ones(40, 80), None, None)


def _naive_layer(spec, x, weight, bias, a, b, coef, keep, tau):
    """float64 autograd on the naive mixk formula with the survivors ``keep`` and thresholds ``tau`` (G, 1, 1)."""
    groups, rows, n = spec.grouped_shape
    delta = torch.stack([naive_kernel("mixk", a[g], b[g], coef[g], 2) for g in range(groups)])
    # SNELL's modes: the reference one scales by the detached |ΔW|, the soft one by |ΔW| − τ, differentiated.
    factor = {"mask": 1.0, "reference": delta.abs().detach(), "soft": delta.abs() - tau}[spec.mode]
    return F.linear(x, weight + (delta * factor * keep).reshape(groups * rows, n), bias)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("sparsities", "rows", "n"),
    # per-group sparsities, and columns past the kernels' first tile of 512 (each with its own softmax statistics)
    [((0.9,), 200, 120), ((0.0, 0.6, 0.95), 200, 120), ((0.9,), 48, fused_cpu_kernels._TILE + 88)],
)
def test_layer_output_and_gradients_match_float64_on_the_kernels_own_survivors(sparsities, rows, n, mode):
    _check_layer(sparsities, rows, n, mode)


@pytest.mark.parametrize("threads", [2, 3])
def test_the_backward_reaches_every_row_at_any_thread_count(threads):
    # The column sums of the softmax backward are split over the threads by rows: 3 rows over 2 or 3 threads.
    with torch_threads(threads):
        _check_layer((0.5,), 3, 40, "reference")


def _check_layer(sparsities, rows, n, mode):
    """The fused mixk layer's output and gradients against float64 autograd on the kernels' own survivors."""
    groups = len(sparsities)
    spec = with_sparsities(SnellSpec("linear", (groups * rows, n), "mixk", 2, mode, 0.5, groups), list(sparsities))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(7, n, generator=gen)
    weight = torch.randn(groups * rows, n, generator=gen) * 0.05
    bias = torch.randn(groups * rows, generator=gen)
    a, b, coef = _factors(rows, n, groups=groups, seed=7)
    keeps, taus = [], []
    for g in range(groups):
        delta, mix = _own_delta(a[g], b[g], coef[g])
        tau, _ = fused_cpu.select_tau(a[g], b[g], coef[g], 2, sparsities[g], mix)
        keeps.append(delta.abs() > tau if mode == "soft" else delta.abs() >= tau)  # soft: S is 0 at τ itself
        taus.append(tau)
    keep, tau = torch.stack(keeps).double(), torch.tensor(taus, dtype=torch.float64).reshape(-1, 1, 1)
    inputs = [x, weight, bias, a, b, coef]
    leaves = [t.double().requires_grad_() for t in inputs]
    expected = _naive_layer(spec, *leaves, keep, tau)
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected.backward(grad)
    ours = [t.clone().requires_grad_() for t in inputs]
    with snell_kernels("fused"):
        assert kernel_path(spec, torch.device("cpu"), 8, torch.float32) == "fused_cpu"
        out = FusedSnell.apply(*ours, spec)
    out.backward(grad.float())
    # float32 against float64 with the same survivors: the longest chains of roundings here (the dW GEMM over 7
    # tokens, sums over 200 rows or 600 columns, softmax sums over 200 rows, a few dozen per-entry operations) give
    # errors below 500·u ≈ 3e-5 of the magnitudes summed, which for these inputs stay within a few times the
    # largest entry of each result; 1e-4 of that largest entry leaves room without hiding a wrong term.
    for mine, theirs in [(out, expected)] + [(t.grad, leaf.grad) for t, leaf in zip(ours, leaves, strict=True)]:
        tolerance = 1e-4 * float(theirs.detach().abs().max())
        torch.testing.assert_close(mine.double(), theirs.detach(), rtol=1e-4, atol=tolerance)


def test_mixk_and_per_group_sparsities_run_fused_on_the_cpu_and_on_the_torch_path_on_cuda_by_default():
    spec = SnellSpec("linear", (1024, 1024), "mixk", 2, "reference", 0.9)
    with snell_kernels("auto"):
        assert kernel_path(spec, torch.device("cpu"), 8, torch.float32) == "fused_cpu"
        assert kernel_path(spec, torch.device("cuda"), 8, torch.float32) == "torch"
    uneven = with_sparsities(SnellSpec("linear", (1024, 1024), "piecewise_linear", 2, "reference", 0.9, 2), [0.5, 0.9])
    with snell_kernels("auto"):
        assert kernel_path(uneven, torch.device("cpu"), 8, torch.float32) == "fused_cpu"


def test_the_backward_reuses_the_forwards_column_statistics(monkeypatch):
    # The softmax's column statistics cost a pass over ΔW: the forward keeps its own (2n floats) for the backward.
    spec = SnellSpec("linear", (300, 200), "mixk", 2, "reference", 0.9)
    a, b, coef = _factors(300, 200, seed=8)
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(9))
    calls = []
    original = fused_cpu.mix_stats
    monkeypatch.setattr(fused_cpu, "mix_stats", lambda *args: calls.append(args) or original(*args))
    leaves = [t.clone().requires_grad_() for t in (x, a, b, coef)]
    with snell_kernels("fused"):
        assert kernel_path(spec, torch.device("cpu"), 8, torch.float32) == "fused_cpu"
        FusedSnell.apply(leaves[0], None, None, *leaves[1:], spec).square().sum().backward()
    assert len(calls) == 1 and all(t.grad is not None and t.grad.isfinite().all() for t in leaves)
