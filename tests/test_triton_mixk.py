"""The Triton kernels on SNELLA's layers under the Triton interpreter: the mixed kernel ΔW = D + α·softmax(D/γ) + β
(softmax over each column's rows) and per-group sparsities, against float64.

Checks as in test_fused_cpu_mixk.py: the kernels' ΔW against float64 within a first-order rounding bound, τ by its
definition on the kernels' OWN ΔW (``fused_triton.dense_delta`` with the same column statistics, which every pass
rebuilds bit for bit), and the layer's output and gradients against float64 autograd on the naive formula evaluated
on the kernels' own survivors, so no entry straddling τ can flip between the two. Matrices of a few 64×64 tiles,
partial ones included, so the column passes walk several row tiles.
"""

import pytest
import torch
import torch.nn.functional as F
from bounds import U32, gamma, snell_kernels
from checks import assert_keeps_top_k, assert_within_bf16_roundings
from naive import naive_kernel

pytest.importorskip("triton")

import snell.sparsify
from snell import fused_triton, fused_triton_mixk
from snell.dispatch import kernel_path
from snell.function import FusedSnell
from snell.spec import SnellSpec, grouped_factors, with_sparsities

pytestmark = pytest.mark.usefixtures("one_thread")

MIX = (1.3, 0.7, 0.01)  # α, γ, β away from their (1, 1, 0) start, so that each one's role shows
MODES = ["reference", "mask", "soft"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    if not fused_triton.interpreted():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it without CUDA)")


def _factors(groups, m, n, r=8, seed=0):
    """A (G, n, r), B (G, m, r) and mixk's coefficients, one (P + 3) row per group, as the layers pass them."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(groups, n, r, generator=gen) * 0.4
    b = torch.rand(groups, m, r, generator=gen) * 0.4
    coef = torch.tensor([0.3, -0.2, *MIX])
    return a, b, torch.stack([coef * torch.tensor([1, 1, 1 + 0.2 * g, 1 - 0.1 * g, 1]) for g in range(groups)])


def _own_delta(a, b, coef):
    """The kernels' ΔW (G, m, n) with their column statistics, and those statistics."""
    stats = fused_triton_mixk.column_stats(a, b, coef, 2)
    return fused_triton.dense_delta(a, b, coef, 2, stats), stats


@pytest.mark.parametrize("shape", [(96, 80), (150, 70)])
def test_delta_is_the_mixed_kernel_within_its_rounding_bound(shape):
    m, n = shape
    a, b, coef = _factors(2, m, n)
    ours, _ = _own_delta(a, b, coef)
    a64, b64, c64 = a.double(), b.double(), coef.double()
    for g in range(2):
        alpha, scale, beta = (float(v) for v in c64[g, 2:])
        d = naive_kernel("piecewise_linear", a64[g], b64[g], c64[g, :2], 2)
        d_abs = naive_kernel("piecewise_linear", a64[g], b64[g], c64[g, :2].abs(), 2)
        z = d / scale
        s = torch.softmax(z, dim=-2)
        exact = d + alpha * s + beta
        # First-order bound, entry by entry, as test_fused_cpu_mixk.py's: D is a sum of P square roots of sums of r/P
        # squares (γ_{r+8}·Σ|c_p|d_p); z = D·(1/γ) carries that error over |γ| plus two roundings (1/γ and the
        # product), and exp(z − M) (M is one of the column's own z) a relative error of the two z's errors, the
        # subtraction's rounding and 2 ulp (4u) of its own: E per column. The sum S is kept online: each of its T
        # row tiles may rescale it by exp(M_old − M_new), which errs by at most another E (M_old − M_new is a
        # difference of two of the column's z), so S errs by (T + 1)·E + γ_{m+T}; s = e·(1/S) adds two roundings,
        # α·s one, and the two additions one each.
        tiles = -(-m // fused_triton.BLOCK_ROWS)
        error_d = gamma(8 + 8) * d_abs
        error_z = error_d / abs(scale) + 2 * U32 * z.abs()
        column = 2 * error_z.amax(-2, keepdim=True) + U32 * (z - z.amax(-2, keepdim=True)).abs() + 4 * U32
        error_s = s * ((tiles + 2) * column.amax(-2, keepdim=True) + gamma(m + tiles) + 2 * U32)
        bound = error_d + abs(alpha) * error_s + 2 * U32 * (d.abs() + abs(alpha) * s + abs(beta))
        # Twice the first-order bound covers the products of errors, which are smaller by another factor of u·m.
        assert ((ours[g].double() - exact).abs() <= 2 * bound).all()


def test_a_column_far_below_zero_keeps_its_softmax():
    # A = 1 and B = 0 make every d_p = ‖1_4‖ = 2, so D = −4 and z = D/γ = −400 in every entry: the softmax is 1/m
    # whatever the shift, but only a running maximum that starts at −inf keeps exp(z − M) = 1. One started at 0
    # underflows every exp to 0, and ΔW to NaN. Exact up to the rounding of 1/S and of the sum: 2 u of its 4.01.
    m, n = 70, 5
    a, b = torch.ones(1, n, 8), torch.zeros(1, m, 8)
    coef = torch.tensor([[-1.0, -1.0, 1.0, 0.01, 0.0]])  # c_1, c_2, α, γ, β
    delta, _ = _own_delta(a, b, coef)
    assert ((delta.double() - (-4 + 1 / m)).abs() <= 2 * U32 * (4 + 1 / m)).all()


def test_the_padding_rows_of_a_partial_tile_leave_the_gradients_finite():
    # Rows 70..127 of the second 64-row tile are padding: they load B = 0, so their z is (2 + 2)/γ = 400 while every
    # real row has D = 0 (its B rows equal A's). Unless exp's argument is clamped, the padding overflows to inf and
    # the column pass's 0·inf is NaN, which reaches every gradient. With s = 1/m in every entry, α's gradient is
    # Σ dW/m, and dW = gyᵀx with gy = 1 makes that Σ x: a float32 sum of its m·n + tokens terms, bounded by γ.
    spec = SnellSpec("linear", (70, 5), "mixk", 2, "mask", 0.0)
    assert spec.dense(0)
    x = torch.linspace(-1, 1, 15).reshape(3, 5)
    leaves = [t.clone().requires_grad_() for t in (x, torch.ones(1, 5, 8), torch.ones(1, 70, 8))]
    coef = torch.tensor([[1.0, 1.0, 1.0, 0.01, 0.0]], requires_grad=True)
    with snell_kernels("triton"):
        assert kernel_path(spec, CPU, 8, torch.float32) == "triton"
        FusedSnell.apply(leaves[0], None, None, *leaves[1:], coef, spec).sum().backward()
    assert all(t.grad.isfinite().all() for t in (*leaves, coef))
    bound = gamma(70 * 5 + 3) * float(x.abs().sum())
    assert abs(float(coef.grad[0, 2]) - float(x.double().sum())) <= bound


def test_tau_is_the_exact_kth_largest_of_the_kernels_own_delta_per_group():
    # One group keeps its dense ΔW (None: τ = −inf), one keeps everything at sparsity 0 (k = m·n: mixk's reference
    # and soft modes still select there), one nothing (+inf), and the others their own k.
    sparsities = [None, 0.0, 0.5, 0.9, 0.99, 1.0]
    a, b, coef = _factors(len(sparsities), 100, 150, seed=1)
    delta, stats = _own_delta(a, b, coef)
    tau = fused_triton.select_tau(a, b, coef, 2, sparsities, stats)
    assert tau.dtype == torch.float32 and tau.shape == (len(sparsities), 1, 1)
    assert tau[0] == -torch.inf and tau[-1] == torch.inf
    for g, sparsity in enumerate(sparsities[1:-1], start=1):
        kept = delta[g : g + 1].abs() >= tau[g]
        assert_keeps_top_k(delta[g : g + 1], kept, snell.sparsify.keep_count(100 * 150, sparsity))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_rebuilds_the_forward_merged_weight_bit_for_bit(dtype, mode):
    # Two groups, one dense (τ = −inf), W0 read transposed through its strides: only if the backward's ΔW is the
    # forward's, bit for bit, does the saved τ keep the forward's survivors.
    a, b, coef = _factors(2, 130, 70, seed=2)
    base = torch.randn(2, 70, 130, generator=torch.Generator().manual_seed(3)).to(dtype).mT
    stats = fused_triton_mixk.column_stats(a, b, coef, 2)
    tau = fused_triton.select_tau(a, b, coef, 2, [None, 0.9], stats)
    forward = fused_triton.merge(a, b, coef, 2, tau, mode, base, dtype, stats)
    backward = torch.empty_like(forward)
    grads = fused_triton.FactorGrads(a, b, coef, 2, True, stats)
    for group in range(2):
        grads.add_rows(group, tau, mode, 0, torch.randn(130, 70).to(dtype), base, backward)
    assert torch.equal(forward, backward)


def test_mixk_takes_a_groups_whole_matrix_in_one_block():
    a, b, coef = _factors(1, 96, 80)
    stats = fused_triton_mixk.column_stats(a, b, coef, 2)
    grads = fused_triton.FactorGrads(a, b, coef, 2, False, stats)
    with pytest.raises(ValueError, match="group's 96 rows at once"):
        grads.add_rows(0, torch.zeros(1, 1, 1), "reference", 0, torch.ones(40, 80), None, None)


def _naive_sparse_delta(spec, a, b, coef, keep, tau):
    """ΔWˢ (G, m/G, n) by the naive formula with the survivors ``keep`` and thresholds ``tau`` (G, 1, 1); a group
    that keeps its dense ΔW keeps it as it is."""
    sparse = []
    for g in range(spec.groups):
        delta = naive_kernel(spec.kernel, a[g], b[g], coef[g] if coef.dim() == 2 else coef, 2)
        # SNELL's modes: the reference one scales by the detached |ΔW|, the soft one by |ΔW| − τ, differentiated.
        factor = {"mask": 1.0, "reference": delta.abs().detach(), "soft": delta.abs() - tau[g]}[spec.mode]
        sparse.append(delta if spec.dense(g) else delta * factor * keep[g])
    return torch.stack(sparse)


def _naive_layer(spec, x, weight, bias, a, b, coef, keep, tau):
    """float64 autograd on the naive formula with the survivors ``keep`` and thresholds ``tau``."""
    return F.linear(x, weight + _naive_sparse_delta(spec, a, b, coef, keep, tau).reshape(spec.matrix_shape), bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel", ["mixk", "piecewise_linear"])
def test_layer_output_and_gradients_match_float64_on_the_kernels_own_survivors(kernel, mode, dtype):
    # Group sparsities 0 (dense, except mixk's reference and soft modes, which select k = m·n), 0.6 and 0.98.
    sparsities, rows, n = (0.0, 0.6, 0.98), 70, 90
    groups = len(sparsities)
    spec = with_sparsities(SnellSpec("linear", (groups * rows, n), kernel, 2, mode, 0.5, groups), list(sparsities))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(7, n, generator=gen)
    weight = torch.randn(groups * rows, n, generator=gen) * 0.05
    bias = torch.randn(groups * rows, generator=gen)
    a, b, coef = _factors(groups, rows, n, seed=7)
    coef = coef if kernel == "mixk" else coef[0, :2]
    inputs = [*(t.to(dtype) for t in (x, weight, bias, a, b)), coef]
    a_g, b_g, coef_g = grouped_factors(spec, *inputs[3:])
    stats = fused_triton_mixk.column_stats(a_g, b_g, coef_g, 2) if kernel == "mixk" else None
    delta = fused_triton.dense_delta(a_g, b_g, coef_g, 2, stats)
    tau = fused_triton.select_tau(
        a_g, b_g, coef_g, 2, [None if spec.dense(g) else s for g, s in enumerate(sparsities)], stats
    )
    keep = (delta.abs() > tau if mode == "soft" else delta.abs() >= tau).double()  # soft: S is 0 at τ itself
    leaves = [t.double().requires_grad_() for t in inputs]
    expected = _naive_layer(spec, *leaves, keep, tau.double())
    grad = torch.randn(expected.shape, generator=gen).to(dtype).double()
    expected.backward(grad)
    ours = [t.clone().requires_grad_() for t in inputs]
    with snell_kernels("triton"):
        assert kernel_path(spec, CPU, 8, dtype, torch.float32) == "triton"
        out = FusedSnell.apply(*ours, spec)
    out.backward(grad.to(dtype))
    assert out.dtype == dtype and all(t.grad.dtype == t.dtype for t in ours)
    pairs = [(out, expected)] + [(t.grad, leaf.grad) for t, leaf in zip(ours, leaves, strict=True)]
    if dtype == torch.bfloat16:  # the inputs are bf16 already: the roundings are those checks.BF16_ROUNDINGS counts
        sparse_delta = lambda a, b, coef: _naive_sparse_delta(spec, a, b, coef, keep, tau.double())  # noqa: E731
        assert_within_bf16_roundings(spec, pairs, leaves, grad, sparse_delta)
        return
    # float32 against float64 with the same survivors: the longest chains of roundings here (the dW GEMM over 7
    # tokens, sums over 70 rows or 90 columns, softmax sums over 70 rows, a few dozen per-entry operations) give
    # errors below 500·u ≈ 3e-5 of the magnitudes summed, which for these inputs stay within a few times the
    # largest entry of each result; 1e-4 of that largest entry leaves room without hiding a wrong term. Each
    # coefficient's gradient is a result of its own, with its own scale.
    pairs = pairs[:6] + [(ours[5].grad[..., c], leaves[5].grad[..., c]) for c in range(coef.shape[-1])]
    for mine, theirs in pairs:
        scale = 1e-4 * float(theirs.detach().abs().max())
        torch.testing.assert_close(mine.double(), theirs.detach(), rtol=1e-4, atol=scale)


def test_the_backward_reuses_the_forwards_column_statistics(monkeypatch):
    # The softmax's column statistics cost a pass over ΔW: the forward keeps its own (2n floats a group), in the
    # selection it saves, for the backward.
    spec = with_sparsities(SnellSpec("linear", (2 * 70, 90), "mixk", 2, "soft", 0.5, 2), [0.0, 0.9])
    a, b, coef = _factors(2, 70, 90, seed=8)
    x = torch.randn(5, 90, generator=torch.Generator().manual_seed(9))
    calls = []
    original = fused_triton_mixk.column_stats
    monkeypatch.setattr(fused_triton_mixk, "column_stats", lambda *args: calls.append(args) or original(*args))
    leaves = [t.clone().requires_grad_() for t in (x, a, b, coef)]
    with snell_kernels("triton"):
        assert kernel_path(spec, CPU, 8, torch.float32) == "triton"
        FusedSnell.apply(leaves[0], None, None, *leaves[1:], spec).square().sum().backward()
    assert len(calls) == 1 and all(t.grad is not None and t.grad.isfinite().all() for t in leaves)
