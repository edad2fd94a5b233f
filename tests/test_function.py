import pytest
import torch
import torch.nn.functional as F
from bounds import gamma, snell_kernels
from checks import CASES, DROPOUT_CASES, KERNELS, MODES, assert_dropout_matches_naive, assert_matches_naive, spec_id
from checks import make_inputs as _inputs
from checks import make_spec as _spec
from naive import naive_kernel, naive_sparsify
from torch.utils._python_dispatch import TorchDispatchMode

import snell
import snell.dropout
import snell.function
import snell.spec
import snell.torch_path
from snell import fused_cpu, kernels, sparsify
from snell.function import FusedSnell, sparse_delta

needs_numba = pytest.mark.skipif(not fused_cpu.available(), reason="numba is not installed")


@pytest.mark.parametrize("spec", CASES, ids=spec_id)
def test_forward_and_gradients_match_plain_autograd_on_the_naive_formula(spec):
    assert_matches_naive(spec, _inputs(spec))


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("spec", CASES, ids=spec_id)
def test_accelerator_path_matches_the_naive_formula_in_fp32_and_bf16(spec, autocast):
    # What benchmarks.gpu checks on a GPU, here with the CPU taking the accelerator's selection and masking.
    with sparsify.device_path_on_cpu():
        assert_matches_naive(spec, _inputs(spec, dtype=torch.float32), autocast)


@pytest.mark.parametrize("shape", [(768, 384), (384, 768), (2304, 384)], ids=["tall", "wide", "qkv"])
def test_large_matrices_match_the_naive_formula(shape):
    # ≥ 2^18 entries per group: the CPU's sampled selection, tall and wide matrices, q/k/v groups.
    spec = _spec(shape=shape, sparsity=0.9, groups=3 if shape[0] == 2304 else 1)
    assert_matches_naive(spec, _inputs(spec, r=4, tokens=3))


GRADCHECK_CASES = [
    *[_spec(kernel=k, mode="mask") for k in KERNELS],
    _spec(sparsity=0.0),
    _spec(op="linear", shape=(9, 5), groups=3, mode="mask"),
    _spec(op="linear_t", shape=(5, 6), mode="mask"),
    _spec(op="conv2d", shape=(4, 3, 3, 3), padding=(1, 1), stride=(2, 2), mode="mask"),
    _spec(op="conv2d", shape=(4, 1, 3, 3), conv_groups=2, dilation=(2, 2), mode="mask", kernel="rbf"),
]


@pytest.mark.parametrize("spec", GRADCHECK_CASES, ids=lambda s: f"{s.op}-{s.kernel}-{s.mode}-g{s.groups}")
def test_gradcheck_float64(spec):
    # Only "mask" (and s = 0) is a true derivative: "reference" detaches |ΔW| and "soft" holds τ constant
    # by design; those two are checked against plain autograd on the naive formula above.
    inputs = [t.requires_grad_() for t in _inputs(spec, seed=3)]
    assert torch.autograd.gradcheck(lambda *args: FusedSnell.apply(*args, spec), inputs, eps=1e-6, atol=1e-5)


def test_adapter_branch_alone_when_weight_is_none():
    spec = _spec()
    x, weight, bias, a, b, coef = _inputs(spec)
    full = FusedSnell.apply(x, weight, bias, a, b, coef, spec)
    branch = FusedSnell.apply(x, None, None, a, b, coef, spec)
    torch.testing.assert_close(branch, full - F.linear(x, weight, bias))


def test_learnable_coefficients_get_their_gradient_when_the_factors_are_frozen():
    # Training only the kernel's coefficients is a valid setup: A and B frozen must not silence the coefficients'
    # gradient, which is the same one (same path, same float64 arithmetic) as when A and B train too.
    spec = _spec()
    x, weight, _, a, b, coef = _inputs(spec)
    grads = []
    for train_factors in (True, False):
        leaves = [t.clone().requires_grad_(train_factors) for t in (a, b)]
        learnable = (coef * 2).requires_grad_()
        FusedSnell.apply(x, weight, None, *leaves, learnable, spec).square().sum().backward()
        assert learnable.grad is not None, f"no coefficient gradient with trained factors={train_factors}"
        grads.append(learnable.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=0)


@needs_numba
def test_the_default_path_is_chosen_on_the_factors_rank(monkeypatch):
    # By default a 128x128 Linear (2^14 entries) takes the fused CPU path at r = 8 (4 columns a piece) and the torch
    # path at r = 64 (32 a piece): the rule reads r from the factors, not n. Both agree numerically, so only the
    # implementation the forward asks for shows the choice.
    monkeypatch.setenv("SNELL_KERNELS", "auto")
    used = []
    real = snell.function.implementation
    monkeypatch.setattr(snell.function, "implementation", lambda path: used.append(path) or real(path))
    spec = _spec(shape=(128, 128), sparsity=0.9)
    x, weight, _, _, _, coef = _inputs(spec, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    for r, expected in ((8, "fused_cpu"), (64, "torch")):
        used.clear()
        a, b = torch.randn(128, r, generator=gen), torch.randn(128, r, generator=gen)
        FusedSnell.apply(x, weight, None, a, b, coef, spec)
        assert used == [expected], (r, used)


@needs_numba
def test_sparse_delta_of_bf16_factors_is_computed_in_float32():
    # All arithmetic on ΔW is in float32 or wider: the fused CPU path writes ΔW in the dtype it is given, so bf16
    # factors must still give a float32 ΔWˢ. bf16 values are exact in float32 and float64, and the fused d_p sums
    # w squared differences (relative error at most γ_{w+4}) that two roundings combine: |error| <= γ_{w+6}·Σ|α_p|·d_p
    # (as in test_fused_cpu), about 5e-7 relative here, where one bf16 rounding is 2^-9.
    spec = _spec(sparsity=0.0)
    _, _, _, a, b, coef = (t.bfloat16() for t in _inputs(spec, r=4, dtype=torch.float32))
    with snell_kernels("fused"):
        assert snell.function.kernel_path(spec, torch.device("cpu"), 4, torch.bfloat16) == "fused_cpu"
        delta, _ = sparse_delta(spec, a, b, coef)
    assert delta.dtype == torch.float32
    a64, b64, coef64 = a.double().unsqueeze(0), b.double().unsqueeze(0), coef.double()
    expected = naive_kernel("piecewise_linear", a64, b64, coef64, 2)
    bound = gamma(2 + 6) * naive_kernel("piecewise_linear", a64, b64, coef64.abs(), 2)
    assert ((delta.double() - expected).abs() <= bound).all()


def _saved_bytes(fn):
    """Bytes of distinct non-parameter storages autograd keeps for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def _frozen_768x512_layer():
    """(spec, x, frozen Linear, A, B, coefficients) of a ViT-like layer for the saved-bytes tests."""
    layer = torch.nn.Linear(512, 768)
    layer.weight.requires_grad_(False)
    spec = _spec(shape=(768, 512), sparsity=0.9)
    a = torch.nn.Parameter(torch.randn(512, 8) * 0.05)
    b = torch.nn.Parameter(torch.randn(768, 8) * 0.05)
    x = torch.randn(4, 16, 512, requires_grad=True)
    return spec, x, layer, a, b, torch.tensor([0.1, -0.1])


def test_no_m_by_n_tensor_is_saved_for_backward():
    spec, x, layer, a, b, coef = _frozen_768x512_layer()
    out, saved = _saved_bytes(lambda: FusedSnell.apply(x, layer.weight, layer.bias, a, b, coef, spec))
    # x (4·16·512 floats), the coefficients and τ: nothing close to the 768×512 ΔW.
    assert saved <= x.numel() * 4 + 64
    out.sum().backward()
    assert a.grad is not None and b.grad is not None

    def unfused():
        delta = naive_sparsify(naive_kernel("piecewise_linear", a, b, coef, 2)[None], 0.9, "reference")[0]
        return F.linear(x, layer.weight + delta, layer.bias)

    _, unfused_saved = _saved_bytes(unfused)
    assert unfused_saved > 768 * 512 * 4  # a naive autograd layout keeps m×n tensors alive


class _GemmCounter(TorchDispatchMode):
    """Counts matrix products that involve the token dimension (the expensive GEMMs)."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            shapes = [a.shape for a in args if isinstance(a, torch.Tensor)]
            if any(self.tokens in s for s in shapes):
                self.count += 1
        return func(*args, **(kwargs or {}))


def test_one_gemm_in_forward_and_two_in_backward():
    spec = _spec(shape=(96, 80), sparsity=0.9)
    x, weight, bias, a, b, coef = _inputs(spec, r=8, tokens=37, dtype=torch.float32)
    x = x.reshape(74, 80).requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    with _GemmCounter(74) as counter:
        out = FusedSnell.apply(x, weight, bias, a, b, coef, spec)
    assert counter.count == 1
    with _GemmCounter(74) as counter:
        out.sum().backward()
    assert counter.count == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    spec = _spec(shape=(32, 24), sparsity=0.5)
    x, weight, bias, a, b, coef = _inputs(spec, dtype=torch.float32)
    reference = FusedSnell.apply(x, weight, bias, a, b, coef, spec)
    a.requires_grad_()
    out = FusedSnell.apply(x.to(dtype), weight.to(dtype), bias.to(dtype), a, b, coef, spec)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.1)
    out.float().sum().backward()
    assert a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()


def test_no_host_synchronisation_off_the_cpu():
    # On the meta device every data-dependent host read (.item(), nonzero, boolean indexing) raises,
    # so a full forward and backward there proves accelerators never wait for the threshold.
    spec = _spec(shape=(768, 512), sparsity=0.9)
    x = torch.empty(4, 512, device="meta", requires_grad=True)
    a = torch.empty(512, 8, device="meta", requires_grad=True)
    b = torch.empty(768, 8, device="meta", requires_grad=True)
    weight = torch.empty(768, 512, device="meta")
    out = FusedSnell.apply(x, weight, None, a, b, torch.empty(2, device="meta"), spec)
    out.sum().backward()
    assert out.shape == (4, 768) and a.grad.shape == (512, 8) and b.grad.shape == (768, 8)


@pytest.mark.parametrize("mode", MODES)
def test_matrices_spanning_several_row_blocks_match_the_naive_formula(mode, monkeypatch):
    # 900×700 with three q/k/v groups and 2^16-entry blocks: each group's 300 rows span several blocks.
    monkeypatch.setattr(snell.spec, "BLOCK_ENTRIES", 1 << 16)
    spec = _spec(op="linear", shape=(900, 700), groups=3, mode=mode, sparsity=0.9)
    assert_matches_naive(spec, _inputs(spec, r=4, tokens=5))


@pytest.mark.parametrize("kernel", KERNELS)
def test_backward_recomputes_exactly_the_forward_delta(kernel, monkeypatch):
    # The saved τ only selects the forward's survivors if backward's ΔW (block by block, piece distances
    # kept) is bit-identical to forward's (written in place into one buffer).
    monkeypatch.setattr(snell.spec, "BLOCK_ENTRIES", 1 << 10)  # 12 rows: 4 blocks per group
    spec = _spec(kernel=kernel, shape=(96, 80), groups=2)
    _, _, _, a, b, coef = _inputs(spec, r=8, dtype=torch.float32)
    a_g, b_g, coef = snell.spec.grouped_factors(spec, a, b, coef)
    recomputed = torch.empty(spec.grouped_shape)
    for g, rows in snell.spec.row_blocks(spec):
        pieces = kernels.piece_distances(a_g[g], b_g[g, rows], spec.num_pieces) if spec.num_pieces > 1 else None
        recomputed[g, rows] = kernels.kernel_delta(kernel, a_g[g], b_g[g, rows], coef, spec.num_pieces, pieces)
    assert torch.equal(snell.torch_path.dense_delta(spec, a, b, coef), recomputed)


@pytest.mark.parametrize("p, with_keep", [(0.3, True), (0.3, False), (0.0, True)], ids=["both", "dropout", "droppath"])
@pytest.mark.parametrize("spec", DROPOUT_CASES, ids=lambda s: f"{s.op}-{s.kernel}-{s.mode}-g{s.groups}")
def test_dropout_path_matches_the_naive_formula_with_the_same_mask(spec, p, with_keep):
    assert_dropout_matches_naive(spec, p, with_keep)


@pytest.mark.parametrize("p", [0.1, 0.25, 0.9])
def test_dropout_keeps_each_entry_with_probability_one_minus_p_and_depends_only_on_its_seed(p):
    x = torch.randn(64, 1000)
    keep = snell.dropout.dropout_keep(x, p, seed=3)
    assert keep.dtype == torch.bool and keep.shape == x.shape
    assert abs(snell.dropout.keep_probability(p) - (1 - p)) <= 2**-17
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / x.numel()) ** 0.5
    assert torch.equal(keep, snell.dropout.dropout_keep(x, p, seed=3))
    assert not torch.equal(keep, snell.dropout.dropout_keep(x, p, seed=4))
    # No structure along rows or columns: every column and every row keeps about the same fraction.
    assert keep.float().mean(0).std() < 0.1 and keep.float().mean(1).std() < 0.1


def test_dropout_path_saves_no_dropped_out_input():
    spec, x, layer, a, b, coef = _frozen_768x512_layer()
    keep = torch.ones(4, 1, 1)
    _, saved = _saved_bytes(
        lambda: snell.dropout.FusedSnellDropout.apply(x, layer.weight, layer.bias, a, b, coef, spec, 0.1, keep)
    )
    # x, τ, the coefficients and k: neither the mask nor the dropped-out x (each as large as x).
    assert saved <= x.numel() * 4 + 128


@pytest.mark.parametrize("mode", MODES)
def test_accelerator_path_compiles_into_one_graph_forward_and_backward(mode):
    # The accelerator path (no numpy, no host reads) must not break torch.compile's graph: fullgraph=True
    # raises at the first break, and dynamo traces FusedSnell's backward along with its forward.
    spec = _spec(mode=mode, shape=(96, 80), groups=2, sparsity=0.9)
    inputs = _inputs(spec, r=8, tokens=5, dtype=torch.float32)

    def layer(x, weight, bias, a, b, coef):
        return FusedSnell.apply(x, weight, bias, a, b, coef, spec)

    with sparsify.device_path_on_cpu():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(layer)(*inputs)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = compiled(*leaves)
        out.square().sum().backward()
        eager = [t.clone().requires_grad_() for t in inputs]
        expected = layer(*eager)
        expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for mine, theirs in zip(leaves, eager, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_an_in_place_edit_of_the_output_trains_as_an_out_of_place_one(dropout):
    """A 3-D input through a biased layer: F.linear returns a view, which autograd refused to edit in place after a
    custom Function (Longformer scales its query so). Both Functions, without and with adapter dropout, return a
    plain tensor; the same seed draws the same dropout mask, so the two gradients are the same arithmetic."""
    layer = torch.nn.Linear(8, 6)
    snell.get_snell_model(torch.nn.Sequential(layer), snell.SnellConfig(r=2, dropout=dropout, target_modules=["0"]))
    layer.train()
    x = torch.randn(2, 5, 8)
    grads = []
    for in_place in (False, True):
        torch.manual_seed(0)
        out = layer(x)
        out = out.div_(2) if in_place else out / 2
        out.pow(2).sum().backward()
        grads.append(layer.A.grad)
        layer.A.grad = None
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("kernels", ["torch", "fused"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_second_derivative_is_refused_not_wrong(kernels, dropout, monkeypatch):
    """A gradient penalty differentiates the factors' gradients again. The backward builds no autograd graph: the
    fused path's second derivative came out 38 % off (its merged weight a constant), the torch path's as an unrelated
    error about out= arguments."""
    if kernels == "fused":
        pytest.importorskip("numba")
    monkeypatch.setenv("SNELL_KERNELS", kernels)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 16))
    snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.5, dropout=dropout, target_modules=["0"]))
    model.train()
    (grad_a,) = torch.autograd.grad(model(torch.randn(3, 24)).square().sum(), model[0].A, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad_a.square().sum().backward()


@pytest.mark.parametrize("kernels", ["torch", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dx_is_computed_with_the_weight_the_forward_multiplied_by(kernels, dtype, monkeypatch):
    """With x = I the forward's output is the merged weight itself, and with dy = I the input's gradient is the
    weight the backward multiplied by: the two must be the same tensor, bit for bit. On the torch path a half-precision
    backward rounded ΔW·S and W0 + ΔW·S apart (3 % of the bf16 weights one unit off)."""
    if kernels == "fused":
        pytest.importorskip("numba")
        if dtype == torch.float16:
            pytest.skip("the fused CPU path takes float32 and bfloat16")
    monkeypatch.setenv("SNELL_KERNELS", kernels)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 80, bias=False).to(dtype))
    snell.get_snell_model(model, snell.SnellConfig(r=8, sparsity=0.9, target_modules=["0"]))
    with torch.no_grad():
        model[0].snell_B.normal_()  # ΔW of the weights' own size
        model[0].snell_A.normal_()
    x = torch.eye(96, dtype=dtype, requires_grad=True)
    y = model(x)
    y.backward(torch.eye(96, 80, dtype=dtype))
    assert torch.equal(x.grad[:80], y.detach().T)
