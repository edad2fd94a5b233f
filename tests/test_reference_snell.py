"""Checks that benchmarks/reference_snell.py really has the reference code's behaviour and costs."""

from __future__ import annotations

import copy
import importlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

# benchmarks/ is not an installed package: make the repo root importable wherever pytest runs from.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
rs = importlib.import_module("benchmarks.reference_snell")


def _factors(n: int, m: int, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(rs.PIECES, n, r // rs.PIECES, generator=generator)
    B = torch.randn(rs.PIECES, m, r // rs.PIECES, generator=generator)
    return A, B


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts piecewise-linear kernel evaluations (checkpointing must run it again in backward)."""
    calls = [0]
    original = rs.piecewise_linear_kernel

    def counting(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return original(A, B)

    monkeypatch.setattr(rs, "piecewise_linear_kernel", counting)
    yield calls


def test_branch_shapes_init_and_parameter_count() -> None:
    layer = rs.ReferenceSnellLinear(nn.Linear(48, 96), r=8, splits=3)
    assert len(layer.branches) == 3
    for branch in layer.branches:
        assert branch.A.shape == (2, 48, 4)
        assert branch.B.shape == (2, 32, 4)
        assert sum(p.numel() for p in branch.parameters()) == 8 * (48 + 32)
        # kaiming_uniform_(a=√5) on (P, rows, r/P): bound 1/√(rows·r/P).
        assert branch.A.abs().max() <= 1 / math.sqrt(48 * 4)
        assert branch.B.abs().max() <= 1 / math.sqrt(32 * 4)
    assert not layer.base.weight.requires_grad
    assert layer(torch.randn(5, 48)).shape == (5, 96)
    with pytest.raises(ValueError):
        rs.ReferenceSnellLinear(nn.Linear(48, 96), r=7)
    with pytest.raises(ValueError):
        rs.ReferenceSnellLinear(nn.Linear(48, 96), kernel="rbf")


def test_cdist_kernel_equals_direct_loop() -> None:
    A, B = _factors(n=3, m=4, r=4)
    expected = torch.zeros(4, 3)
    for j in range(4):
        for i in range(3):
            for p, alpha in enumerate(rs.ALPHAS):
                expected[j, i] += alpha * torch.sqrt(((A[p, i] - B[p, j]) ** 2).sum())
    torch.testing.assert_close(rs.kernel_delta(A, B), expected)


def test_linear_kernel_is_lora_merge_and_split_pieces_layout() -> None:
    generator = torch.Generator().manual_seed(1)
    A2, B2 = torch.randn(5, 6, generator=generator), torch.randn(7, 6, generator=generator)
    A, B = rs.split_pieces(A2), rs.split_pieces(B2)
    assert A.shape == (2, 5, 3)
    torch.testing.assert_close(A[1], A2[:, 3:])
    torch.testing.assert_close(rs.kernel_delta(A, B, "linear"), B2 @ A2.T)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9, 0.99])
def test_kept_fraction_matches_quantile(sparsity: float) -> None:
    A, B = _factors(n=64, m=48, r=8)
    dense = rs.kernel_delta(A, B)
    sparse = rs.reference_delta(A, B, sparsity)
    total = dense.numel()
    kept = int((sparse != 0).sum())
    # torch.quantile interpolates between sorted entries k and k + 1, so either may be the boundary; entries
    # tied with it (ΔW's last bits vary with the CPU) are kept too, so count against the definition itself.
    tau = torch.quantile(dense.abs().flatten(), sparsity)
    assert kept == int((dense.abs() >= tau).sum())
    k = math.floor(sparsity * (total - 1))
    assert kept >= total - k - 1
    survivors = sparse != 0
    torch.testing.assert_close(sparse[survivors], (dense * dense.abs())[survivors])
    assert dense[survivors].abs().min() >= dense[~survivors].abs().max()


def test_the_kernel_uses_the_reference_alphas_and_refuses_an_unknown_kernel() -> None:
    """α = (+0.1, −0.1), written out: A's row at the origin, B's at distance 3 in piece 0 and 4 in piece 1."""
    A = torch.zeros(2, 1, 2, dtype=torch.float64)
    B = torch.tensor([[[3.0, 0.0]], [[0.0, 4.0]]], dtype=torch.float64)
    torch.testing.assert_close(rs.kernel_delta(A, B), torch.tensor([[0.1 * 3 - 0.1 * 4]], dtype=torch.float64))
    with pytest.raises(ValueError):
        rs.kernel_delta(A, B, "rbf")


def test_an_entry_equal_to_tau_is_kept() -> None:
    """|ΔW| = 1, 2, 3 at s = 0.5: torch.quantile lands exactly on 2, which is kept (|ΔW| ≥ τ) as ΔW·|ΔW|."""
    out = rs.sparsify(torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64), 0.5)
    assert torch.equal(out, torch.tensor([[0.0, -4.0, 9.0]], dtype=torch.float64))


def test_both_factors_are_kaiming_uniform_not_zero() -> None:
    """kaiming_uniform_(a=√5) on (P, rows, r/P) draws from U(±1/√(rows·r/P)): 256 or more seeded draws reach past
    half the bound, and their standard deviation is bound/√3 to within 25 % (its standard error is about 3 %)."""
    torch.manual_seed(0)
    branch = rs.ReferenceSnellLinear(nn.Linear(48, 32), r=8).branches[0]
    for factor, rows in ((branch.A, 48), (branch.B, 32)):
        bound = 1 / math.sqrt(rows * 4)
        values = factor.detach()
        assert 0.5 * bound < values.abs().max() <= bound
        assert abs(float(values.std()) - bound / math.sqrt(3)) < 0.25 * bound / math.sqrt(3)


def test_the_branch_drops_its_input_then_its_output_in_training_only() -> None:
    """y = W0·x + b + DropPath(ΔWˢ·Dropout(x)): with p = 1 either way the training output is the base layer's."""
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    for dropout, drop_path in ((1.0, 0.0), (0.0, 1.0)):
        layer = rs.ReferenceSnellLinear(nn.Linear(6, 4), r=4, sparsity=0.5, dropout=dropout, drop_path=drop_path)
        with torch.no_grad():
            assert torch.equal(layer.train()(x), layer.base(x))
            assert not torch.allclose(layer.eval()(x), layer.base(x))


def test_the_branches_compute_their_kernel_in_order_and_in_the_layers_dtype() -> None:
    """Dense (s = 0) float64 layers: the output is the base output plus each branch's x·ΔWᵢᵀ, the i-th branch
    giving the i-th slice of the outputs, with the layer's own kernel. Only rounding differs (1e-10)."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64)
    for kernel, splits in (("linear", 1), ("piecewise_linear", 3)):
        base = nn.Linear(6, 6).double()
        layer = rs.ReferenceSnellLinear(
            base, r=4, sparsity=0.0, dropout=0.0, drop_path=0.0, kernel=kernel, splits=splits
        )
        assert all(b.A.dtype == b.B.dtype == torch.float64 for b in layer.branches)
        with torch.no_grad():
            deltas = [rs.kernel_delta(b.A, b.B, kernel) for b in layer.branches]
            expected = base(x) + torch.cat([x @ delta.T for delta in deltas], dim=-1)
            torch.testing.assert_close(layer.eval()(x), expected, rtol=1e-10, atol=1e-10)
        other = "piecewise_linear" if kernel == "linear" else "linear"  # differs here: the wrong kernel shows
        assert (rs.kernel_delta(layer.branches[0].A, layer.branches[0].B, other) - deltas[0]).abs().max() > 1e-6


def test_zero_sparsity_is_dense_kernel_without_magnitude_factor() -> None:
    A, B = _factors(n=10, m=12, r=4)
    for kernel in rs.KERNELS:
        torch.testing.assert_close(rs.reference_delta(A, B, 0.0, kernel), rs.kernel_delta(A, B, kernel))


def test_gradient_scaled_by_detached_magnitude_and_zero_for_dropped() -> None:
    delta = torch.randn(8, 8, requires_grad=True)
    rs.sparsify(delta, 0.75).sum().backward()
    kept = delta.detach().abs() >= torch.quantile(delta.detach().abs().flatten(), 0.75)
    torch.testing.assert_close(delta.grad, torch.where(kept, delta.detach().abs(), 0.0))


def test_quantile_limits_are_kept() -> None:
    with pytest.raises(RuntimeError, match="float or double"):
        rs.sparsify(torch.randn(4, 4).half(), 0.5)
    with pytest.raises(RuntimeError, match="quantile\\(\\) input tensor is too large"):
        rs.sparsify(torch.zeros(2**12 + 1, 2**12), 0.5)
    assert rs.sparsify(torch.ones(2**12, 2**12), 0.5).shape == (2**12, 2**12)  # 2^24 itself is allowed


def test_no_nan_gradient_where_factor_rows_coincide() -> None:
    A, B = _factors(n=40, m=30, r=8)  # large enough for cdist's matmul path
    B[:, 5] = A[:, 11]
    A.requires_grad_(True)
    B.requires_grad_(True)
    rs.reference_delta(A, B, 0.5).sum().backward()
    assert A.grad.isfinite().all()
    assert B.grad.isfinite().all()


def test_branch_is_checkpointed(kernel_calls: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    quantile_calls = [0]
    original_quantile = torch.quantile

    def counting_quantile(*args: object, **kwargs: object) -> torch.Tensor:
        quantile_calls[0] += 1
        return original_quantile(*args, **kwargs)

    monkeypatch.setattr(torch, "quantile", counting_quantile)
    torch.manual_seed(0)
    layer = rs.ReferenceSnellLinear(nn.Linear(24, 16), sparsity=0.7, dropout=0.0, drop_path=0.0)
    x = torch.randn(3, 24)
    out = layer(x)
    assert (kernel_calls[0], quantile_calls[0]) == (1, 1)
    out.square().sum().backward()
    assert (kernel_calls[0], quantile_calls[0]) == (2, 2)

    # Same gradients as running the branch without checkpointing.
    branch = layer.branches[0]
    A, B = branch.A.detach().requires_grad_(True), branch.B.detach().requires_grad_(True)
    expected = layer.base(x) + x @ rs.reference_delta(A, B, 0.7).T
    expected.square().sum().backward()
    torch.testing.assert_close(branch.A.grad, A.grad)
    torch.testing.assert_close(branch.B.grad, B.grad)


def test_vit_training_step(kernel_calls: list[int]) -> None:
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32).eval()
    # No DropPath here: with batch 2 it may drop a whole branch and leave a legitimately zero gradient.
    model = rs.inject_reference_snell(copy.deepcopy(base), drop_path=0.0)
    adapters = [m for m in model.modules() if isinstance(m, rs.ReferenceSnellLinear)]
    assert len(adapters) == 4 * 12
    assert sum(len(m.branches) for m in adapters) == 6 * 12

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        name
        for name, _ in model.named_parameters()
        if name.endswith((".A", ".B")) or name.startswith("head.") or name == "cls_token"
    }
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}

    images = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        before = model(images)
    # ΔW is not zero at init in the reference, so the injected model already differs from the base.
    assert not torch.allclose(before, base(images))

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    kernel_calls[0] = 0
    loss = nn.functional.cross_entropy(model(images), torch.tensor([1, 2]))
    assert kernel_calls[0] == 72
    loss.backward()
    assert kernel_calls[0] == 2 * 72

    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    optimizer.step()

    model.eval()
    with torch.no_grad():
        after = model(images)
    assert not torch.allclose(after, before)
    assert not torch.allclose(after, base(images))
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_proj_has_no_input_dropout_and_options_reach_branches() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
    rs.inject_reference_snell(model, r=4, sparsity=0.5, dropout=0.2, drop_path=0.0, kernel="linear")
    block = model.blocks[0]
    assert block.attn.proj.branches[0].dropout.p == 0.0
    for layer in (block.attn.qkv, block.mlp.fc1, block.mlp.fc2):
        for branch in layer.branches:
            assert branch.dropout.p == 0.2
            assert branch.drop_path.drop_prob == 0.0
            assert (branch.sparsity, branch.kernel, branch.A.shape[-1]) == (0.5, "linear", 2)


@pytest.mark.parametrize(
    ("name", "expected_adapter_params"),
    [
        # per block: q, k, v (768→768 each), proj 768→768, fc1 768→3072, fc2 3072→768
        ("vit_base_patch16_224", 12 * 8 * (4 * (768 + 768) + 2 * (768 + 3072))),
        # per block of width d: q, k, v, proj 2d each, fc1 and fc2 5d each → 18·r·d; depths (2, 2, 6, 2)
        ("swin_tiny_patch4_window7_224", 18 * 8 * (2 * 96 + 2 * 192 + 6 * 384 + 2 * 768)),
    ],
)
def test_parameter_counts_on_full_size_models(name: str, expected_adapter_params: int) -> None:
    with torch.device("meta"):  # no memory, no compute: only the counts matter here
        model = rs.inject_reference_snell(timm.create_model(name, pretrained=False, num_classes=10))
    adapter = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".A", ".B")))
    assert adapter == expected_adapter_params
    head = sum(p.numel() for p in model.get_classifier().parameters())
    cls = model.cls_token.numel() if getattr(model, "cls_token", None) is not None else 0
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapter + head + cls
