import pytest
import torch
from naive import naive_kernel

from snell.config import default_coefficients
from snell.kernels import kernel_backward, kernel_delta

KERNELS = ["linear", "piecewise_linear", "rbf", "sigmoid", "mixk"]


def _factors(groups=(), n=7, m=5, r=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(*groups, n, r, generator=gen, dtype=torch.float64)
    b = torch.randn(*groups, m, r, generator=gen, dtype=torch.float64)
    return a, b


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("groups", [(), (3,)])
def test_kernel_matches_the_formula(kernel, groups):
    a, b = _factors(groups)
    coef = torch.tensor(default_coefficients(kernel, 2), dtype=torch.float64)
    expected = naive_kernel(kernel, a, b, coef, num_pieces=2)
    got = kernel_delta(kernel, a, b, coef, num_pieces=2)
    assert got.shape == (*groups, 5, 7)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kernel", ["rbf", "sigmoid"])
def test_rbf_and_sigmoid_keep_float32_precision_near_zero_where_their_default_coefficients_start(kernel):
    """exp(x) − 1 and σ(t) − 1/2 at |x|, |t| ≪ 1 (factors as initialised): computed as such in float32 they cancel
    to a relative error of about 2^-24 / |t| (1e-3 here); the float32 dot products and distances alone err by a
    few ulps times r, so 1e-5 on the median separates the two by two orders of magnitude either way."""
    from snell.layers import init_factors

    a, b = torch.empty(256, 8), torch.empty(192, 8)
    torch.manual_seed(0)
    init_factors(a, b, num_pieces=1)
    coef = torch.tensor(default_coefficients(kernel, 1))
    got = kernel_delta(kernel, a, b, coef, num_pieces=1)
    exact = kernel_delta(kernel, a.double(), b.double(), coef.double(), num_pieces=1)
    relative = ((got.double() - exact).abs() / exact.abs()).median()
    assert relative < 1e-5
    assert got.unique().numel() > 0.99 * got.numel()  # distinct values, so the top-k has no spurious ties


def test_piecewise_linear_uses_contiguous_column_blocks():
    a, b = _factors(r=4)
    coef = torch.tensor([0.1, -0.1], dtype=torch.float64)
    got = kernel_delta("piecewise_linear", a, b, coef, num_pieces=2)
    j, i = 3, 6
    expected = 0.1 * (a[i, :2] - b[j, :2]).norm() - 0.1 * (a[i, 2:] - b[j, 2:]).norm()
    torch.testing.assert_close(got[j, i], expected)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("groups", [(), (3,)])
def test_hand_written_backward_matches_autograd(kernel, groups):
    a, b = _factors(groups, seed=1)
    coef = torch.tensor(default_coefficients(kernel, 2), dtype=torch.float64) * 1.3
    grad = torch.randn(*groups, 5, 7, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (a, b, coef)]
    naive_kernel(kernel, *leaves, num_pieces=2).backward(grad)
    ga, gb, gc = kernel_backward(kernel, a, b, coef, grad, num_pieces=2, need_coefficients=True)
    torch.testing.assert_close(ga, leaves[0].grad)
    torch.testing.assert_close(gb, leaves[1].grad)
    torch.testing.assert_close(gc, leaves[2].grad)


@pytest.mark.parametrize("kernel", ["piecewise_linear", "rbf", "mixk"])
def test_gradients_are_finite_where_a_row_equals_b_row(kernel):
    a, b = _factors(n=4, m=4, r=4)
    b[2] = a[1]  # ‖a_1 − b_2‖ = 0: the distance has no derivative there
    b[0] = a[0]
    coef = torch.tensor(default_coefficients(kernel, 2), dtype=torch.float64)
    grad = torch.ones(4, 4, dtype=torch.float64)
    ga, gb, gc = kernel_backward(kernel, a, b, coef, grad, num_pieces=2, need_coefficients=True)
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all() and torch.isfinite(gc).all()
    for dtype in (torch.float32, torch.bfloat16):
        ga, gb, _ = kernel_backward(kernel, a.to(dtype), b.to(dtype), coef.to(dtype), grad.to(dtype), num_pieces=2)
        assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


def test_kernelized_update_has_rank_far_above_r():
    torch.manual_seed(0)
    n = m = 256
    r = 8
    a = torch.empty(n, r, dtype=torch.float64).uniform_(-1, 1) / (n * r / 2) ** 0.5
    b = torch.empty(m, r, dtype=torch.float64).uniform_(-1, 1) / (m * r / 2) ** 0.5
    linear = kernel_delta("linear", a, b, torch.tensor([1.0], dtype=torch.float64))
    piecewise = kernel_delta("piecewise_linear", a, b, torch.tensor([0.1, -0.1], dtype=torch.float64), num_pieces=2)
    assert torch.linalg.matrix_rank(linear) == r
    assert torch.linalg.matrix_rank(piecewise) > 8 * r
