import contextlib
import math

import pytest
import torch
from checks import assert_keeps_exactly, assert_selection_is_exact
from naive import naive_sparsify, reference_code_delta

import snell
from snell import sparsify
from snell.kernels import kernel_delta


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.99, 0.995])
def test_each_matrix_keeps_exactly_round_1_minus_s_times_n(sparsity):
    torch.manual_seed(0)
    delta = torch.randn(3, 64, 48)
    for path in (contextlib.nullcontext, sparsify.device_path_on_cpu):
        with path():
            assert_keeps_exactly(delta, sparsity)


@pytest.mark.parametrize("magnitude", [True, False], ids=["magnitude", "signed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [1000, 300_000])
def test_every_selection_method_is_exact(n, dtype, magnitude):
    torch.manual_seed(5)
    values = torch.randn(2, n).to(dtype)
    for k in (1, round(0.1 * n), n // 2, n // 2 + 1, round(0.9 * n), n):
        assert_selection_is_exact(values, k, magnitude)


def test_selection_method_reads_the_table_and_the_device_path_follows_cuda():
    assert sparsify.selection_method("cpu", 1000) == "kthvalue"
    assert sparsify.selection_method("cpu", 1 << 20) == "banded"
    assert sparsify.selection_method("mps", 1 << 20) == "kthvalue"  # unlisted devices
    cuda = sparsify.selection_method("cuda", 1 << 20)
    assert cuda != "banded"  # accelerators never take a host-side method
    with sparsify.device_path_on_cpu():
        assert sparsify.selection_method("cpu", 1 << 20) == cuda
        assert sparsify.selection_method("meta", 1 << 20) == "kthvalue"
    assert sparsify.selection_method("cpu", 1 << 20) == "banded"
    for rows in sparsify.SELECTION_TABLE.values():
        assert all(name in sparsify.SELECTION_METHODS for _, name in rows)
        assert [bound for bound, _ in rows] == sorted(bound for bound, _ in rows)


@pytest.mark.parametrize("keep_fraction", [0.005, 0.1, 0.5, 0.63, 0.9, 1.0])
def test_sampled_selection_is_exact_on_large_matrices(keep_fraction):
    torch.manual_seed(1)
    values = torch.randn(2, 600_000).abs()
    k = round(keep_fraction * values.shape[1])
    got = sparsify.kth_largest(values, k)
    expected = values.topk(k, dim=1).values[:, -1:]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sampled_selection_is_exact_in_every_float_dtype(dtype):
    # numpy has no bfloat16: it is selected as float32, which holds it exactly, and τ comes back in bfloat16.
    torch.manual_seed(2)
    values = torch.randn(2, 300_000).abs().to(dtype)
    for k in (3_000, 30_000, 270_000):
        got = sparsify.kth_largest(values, k)
        assert got.dtype == dtype
        assert torch.equal(got, values.topk(k, dim=1).values[:, -1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("keep_fraction", [0.005, 0.1, 0.63, 1.0])
def test_magnitude_selection_on_signed_values_is_exact(dtype, keep_fraction):
    # ΔW's τ is selected on ΔW itself, with two-sided comparisons instead of an |ΔW| copy.
    torch.manual_seed(4)
    values = torch.randn(2, 300_000).to(dtype)
    values[0, :5000] = -values[0, :5000].abs()  # signs uneven around the answer
    k = round(keep_fraction * values.shape[1])
    got = sparsify.kth_largest_magnitude(values, k)
    assert got.dtype == dtype
    assert torch.equal(got, values.abs().topk(k, dim=1).values[:, -1:])


def test_magnitude_selection_falls_back_when_the_sample_misses():
    values = torch.zeros(1, 600_000)
    values[0, :50] = -1.0
    values[0, 50:100] = 1.0
    assert sparsify.kth_largest_magnitude(values, 100).item() == 1.0
    assert sparsify.kth_largest_magnitude(values, 1000).item() == 0.0


def test_sampled_selection_leaves_its_input_untouched_and_accepts_strided_rows():
    torch.manual_seed(3)
    values = torch.randn(400_000, 2).abs().mT  # rows with stride 2
    before = values.clone()
    got = sparsify.kth_largest(values, 40_000)
    assert torch.equal(values, before)
    assert torch.equal(got, values.topk(40_000, dim=1).values[:, -1:])


def test_selection_with_many_ties_is_still_the_kth_largest():
    values = torch.randint(0, 5, (1, 400_000)).float()
    for k in (1, 1000, 200_000, 399_999):
        assert torch.equal(sparsify.kth_largest(values, k), values.topk(k, dim=1).values[:, -1:])


def test_selection_falls_back_when_the_sample_misses():
    values = torch.zeros(1, 600_000)
    values[0, :100] = 1.0  # the sample almost surely sees only zeros: the bracket (0, 0] holds no entry
    assert sparsify.kth_largest(values, 1000).item() == 0.0
    assert sparsify.kth_largest(values, 100).item() == 1.0


def test_the_fallback_after_a_missed_sample_takes_the_kth_of_distinct_values():
    """The tests above miss with ties at the k-th value, where an off-by-one in the fallback cannot show. Here every
    sampled position holds one of the largest values (all distinct), so the bracket lies far above the k-th largest,
    the fallback decides, and exactly k entries reach τ."""
    n, k = 600_000, 1000
    values = torch.arange(1, n + 1, dtype=torch.float32).view(1, n) / n
    sampled = torch.from_numpy(sparsify._sample_positions(n).copy()).unique()
    values[0, sampled] = 2.0 + torch.arange(len(sampled), dtype=torch.float32) / n
    assert sparsify.selection_method("cpu", n) == "banded" and sparsify._kth_largest_banded(values[0], k, False) is None
    for select, signed in ((sparsify.kth_largest, values), (sparsify.kth_largest_magnitude, -values)):
        tau = select(signed, k)
        assert torch.equal(tau, values.topk(k, dim=1).values[:, -1:]) and int((signed.abs() >= tau).sum()) == k


def test_a_layer_at_sparsity_one_keeps_nothing():
    """k = 0 (sparsity 1, which SNELLA's allocator may reach): no entry of the layer's update survives."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 24))
    snell.get_snell_model(model, snell.SnellConfig(r=8, target_modules=["0"], layer_sparsity={"0": [1.0]}))
    assert model[0].delta_weight().count_nonzero() == 0


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_a_small_layer_at_a_high_sparsity_keeps_its_largest_entry_and_trains(fused, monkeypatch):
    """round((1 − s)·N) is 0 for a 4×4 matrix at s = 0.97: the layer kept nothing and its factors never got a gradient.
    The reference's threshold, strictly above an interpolated quantile, keeps the largest entry; so does snell."""
    if fused:
        pytest.importorskip("numba")
        monkeypatch.setattr("snell.dispatch._FUSED_FROM", ((1, 1),))
    assert sparsify.keep_count(16, 0.97) == 1 and sparsify.keep_count(16, 1.0) == 0
    # round, not floor or ceil: 30.72 → 31, 4.2 → 4 (no .5 ties, where Python's round goes to even)
    assert sparsify.keep_count(3072, 0.99) == 31 and sparsify.keep_count(21, 0.8) == 4
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    snell.get_snell_model(model, snell.SnellConfig(r=2, sparsity=0.97, target_modules=["0"]))
    delta = model[0].delta_weight()
    assert delta.count_nonzero() == 1
    layer = model[0]
    dense = kernel_delta("piecewise_linear", layer.A.detach(), layer.B.detach(), layer.kernel_coefficients(), 2)
    assert delta.abs().argmax() == dense.abs().argmax()
    model(torch.randn(3, 4)).square().sum().backward()
    assert model[0].A.grad.abs().sum() > 0 and model[0].B.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_scale_keeps_every_entry_at_or_above_its_matrix_tau(dtype):
    # Per-matrix τ taken from the entries themselves, so entries equal to τ (ties included) must survive.
    values = torch.randint(0, 7, (3, 40, 30)).to(dtype) / 4
    tau = torch.tensor([0.5, 0.75, 1.25], dtype=dtype).view(3, 1, 1)
    expected = torch.where(values >= tau, values, 0.0)
    assert torch.equal(sparsify.survivor_scale_(values.clone(), tau, "reference"), expected)
    assert torch.equal(sparsify.survivor_scale_(values[1].clone(), tau[1], "reference"), expected[1])
    # a τ of another dtype takes the general path, with the same result
    assert torch.equal(sparsify.survivor_scale_(values.clone(), tau.to(torch.float16), "reference"), expected)


def test_keep_nothing_and_out_of_range_k():
    values = torch.rand(1, 10)
    assert sparsify.kth_largest(values, 0).eq(math.inf).all()  # +inf: nothing survives
    with pytest.raises(ValueError, match=r"k must be in \[0, 10\], got 11"):
        sparsify.kth_largest(values, 11)


def test_llama_mlp_sized_matrix_works():
    # 11008 × 4096 = 45M entries, above the 2^24 that torch.quantile accepted in the reference's torch.
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(1, 11008, 4096, generator=gen)
    assert sparsify.threshold(delta, 0.9).shape == (1, 1, 1)
    assert_keeps_exactly(delta, 0.9)


@pytest.mark.parametrize("mode", sparsify.MODES)
def test_modes_match_their_formulas_and_gradients(mode):
    torch.manual_seed(2)
    delta = torch.randn(1, 20, 30, dtype=torch.float64)
    tau = sparsify.threshold(delta, 0.8)
    leaf = delta.clone().requires_grad_()
    expected = naive_sparsify(leaf, 0.8, mode)
    torch.testing.assert_close(sparsify.apply(delta, tau, mode), expected.detach())
    grad = torch.randn_like(delta)
    expected.backward(grad)
    torch.testing.assert_close(sparsify.backward(delta, tau, mode, grad), leaf.grad)
    dropped = delta.abs() < tau
    assert (sparsify.apply(delta, tau, mode)[dropped] == 0).all()


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9, 0.99])
def test_reference_mode_equals_the_reference_code_up_to_one_boundary_element(sparsity):
    # float64: our GEMM-form distances and the reference's cdist round differently, and in float32 that
    # difference (~1e-7 relative) could move a second entry across τ on some CPU. In float64 (~1e-16) two
    # entries would have to lie that close, which 1920 random values do not; the one boundary element left
    # is torch.quantile's interpolation, which keeps one entry more or fewer than round((1 − s)·N).
    torch.manual_seed(3)
    n, m, r, pieces = 48, 40, 8, 2
    a = torch.empty(pieces, n, r // pieces, dtype=torch.float64).uniform_(-0.3, 0.3)
    b = torch.empty(pieces, m, r // pieces, dtype=torch.float64).uniform_(-0.3, 0.3)
    expected = reference_code_delta(a, b, sparsity)
    # Our layout: A is (n, r) with piece p in columns [p·r/P, (p+1)·r/P).
    ours_a = torch.cat(list(a), dim=-1)
    ours_b = torch.cat(list(b), dim=-1)
    delta = kernel_delta(
        "piecewise_linear", ours_a, ours_b, torch.tensor([0.1, -0.1], dtype=torch.float64), num_pieces=2
    )
    delta = delta[None]
    ours = sparsify.apply(delta, sparsify.threshold(delta, sparsity), "reference")[0]
    differing = ~torch.isclose(ours, expected, rtol=1e-12, atol=0)
    assert int(differing.sum()) <= 1
