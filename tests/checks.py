"""Correctness checks written once for any device: the test suite runs them on the CPU, ``benchmarks.gpu`` on a GPU.

Pytest-free on purpose (a GPU machine may lack pytest): ``benchmarks.gpu`` loads this file and ``naive.py`` by
path, so a device check and a unit test cannot drift apart. Inputs are drawn on the CPU from fixed seeds and
then moved, so every device checks the same numbers.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from naive import naive_kernel, naive_sparsify
from torch import Tensor, nn

import snell
from snell import dropout, fused_cpu, sparsify
from snell.config import default_coefficients
from snell.dispatch import kernel_path
from snell.dropout import FusedSnellDropout
from snell.function import FusedSnell
from snell.layers import SnellLayer
from snell.spec import SnellSpec, grouped_factors
from snell.torch_path import dense_delta

KERNELS = ("linear", "piecewise_linear", "rbf", "sigmoid", "mixk")
MODES = sparsify.MODES


def make_spec(kernel="piecewise_linear", mode="reference", sparsity=0.6, op="linear", shape=(6, 5), groups=1, **conv):
    return SnellSpec(
        op=op,
        weight_shape=shape,
        kernel=kernel,
        num_pieces=2 if kernel in ("piecewise_linear", "mixk") else 1,
        mode=mode,
        sparsity=sparsity,
        groups=groups,
        **conv,
    )


def spec_id(spec: SnellSpec) -> str:
    return f"{spec.op}-{spec.kernel}-{spec.mode}-s{spec.sparsity}-g{spec.groups}"


CASES = [
    *[make_spec(kernel=k, mode=md) for k in KERNELS for md in MODES],
    make_spec(sparsity=0.0),
    make_spec(kernel="mixk", sparsity=0.0),
    make_spec(kernel="mixk", op="linear", shape=(9, 5), groups=3),
    make_spec(op="linear", shape=(9, 5), groups=3),
    make_spec(op="linear", shape=(4, 9)),
    make_spec(op="linear_t", shape=(5, 6)),
    make_spec(op="conv2d", shape=(4, 3, 3, 3), padding=(1, 1), stride=(2, 2)),
    make_spec(op="conv2d", shape=(4, 1, 3, 3), conv_groups=2, dilation=(2, 2)),
]
"""Every kernel × sparsify mode, sparsity 0, q/k/v groups, a wide matrix, Conv1D and convolutions."""

DROPOUT_CASES = [
    make_spec(),
    make_spec(kernel="rbf", mode="soft"),
    make_spec(op="linear", shape=(9, 5), groups=3),
    make_spec(op="linear_t", shape=(5, 6), mode="mask"),
    make_spec(op="conv2d", shape=(4, 1, 3, 3), conv_groups=2, dilation=(2, 2), padding=(1, 1)),
]
"""Layouts and modes the adapter-dropout path is checked on."""


def make_inputs(spec, r=4, tokens=3, dtype=torch.float64, seed=0, device="cpu") -> list[Tensor]:
    """(x, weight, bias, A, B, coefficients) for ``spec``, drawn on the CPU and moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    m, n = spec.matrix_shape
    if spec.op == "conv2d":
        x = torch.randn(2, spec.weight_shape[1] * spec.conv_groups, 5, 5, generator=gen, dtype=dtype)
    else:
        x = torch.randn(tokens, 2, n, generator=gen, dtype=dtype)
    weight = torch.randn(spec.weight_shape, generator=gen, dtype=dtype)
    bias = torch.randn(m, generator=gen, dtype=dtype)
    lead = (spec.groups,) if spec.groups > 1 else ()
    a = torch.randn(*lead, n, r, generator=gen, dtype=dtype)
    b = torch.randn(*lead, m // spec.groups, r, generator=gen, dtype=dtype)
    coef = torch.tensor(default_coefficients(spec.kernel, spec.num_pieces), dtype=dtype) * 2
    return [t.to(device) for t in (x, weight, bias, a, b, coef)]


def naive_sparse_delta(spec, a, b, coef):
    """ΔWˢ (G, m/G, n) from the naive formulas."""
    m, n = spec.matrix_shape
    delta = naive_kernel(spec.kernel, a, b, coef, spec.num_pieces).reshape(spec.groups, m // spec.groups, n)
    return naive_sparsify(delta, spec.sparsity, spec.mode, dense_at_zero=spec.kernel != "mixk")


def naive_forward(spec, x, weight, bias, a, b, coef):
    """The layer with W0 + ΔWˢ from the naive formulas, differentiated by plain autograd."""
    delta = naive_sparse_delta(spec, a, b, coef).reshape(spec.matrix_shape)
    return base_op(spec, x, weight + to_layout(spec, delta), bias)


def to_layout(spec, matrix):
    return matrix.T if spec.op == "linear_t" else matrix.reshape(spec.weight_shape)


def base_op(spec, x, weight, bias):
    if spec.op == "linear":
        return F.linear(x, weight, bias)
    if spec.op == "linear_t":
        return x @ weight + bias
    return F.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.conv_groups)


U_BF16 = 2.0**-8
"""bfloat16's unit roundoff: 8 significant bits, round to nearest."""

BF16_ROUNDINGS = 4
"""How many bf16 roundings of its terms' magnitudes a result under bf16 autocast may carry. Every result passes
through three: y = x·(W0 + ΔWˢ)ᵀ rounds x, the merged weight and the GEMM's output; dx rounds gy, the weight and
dx; G = gyᵀx, from which dW0 and the factors' and coefficients' gradients follow linearly, rounds gy, x and G. The
fourth covers the rest, all in float32 (2^16 times finer): products of errors, ΔW's own roundings, and the float32
sums and chains (GEMM depths of at most a few thousand: below 2^-12 of the magnitude, a sixteenth of one bf16
rounding)."""


def _assert_close(actual: Tensor, expected: Tensor) -> None:
    """torch's default tolerances in float64. In float32, 1e-4 relative to the largest |expected| entry: the
    fused kernels get distances from a GEMM (‖a‖² + ‖b‖² − 2a·b), the naive formula from differences, and the
    two round differently."""
    if expected.dtype == torch.float64:
        torch.testing.assert_close(actual, expected)
        return
    atol = 1e-4 * float(expected.detach().abs().max()) + 1e-6
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=1e-4, atol=atol)


def _jvps(fn, primal: Tensor, tangents: Tensor, chunk: int = 128) -> Tensor:
    """fn's forward-mode derivative at ``primal`` along each of ``tangents`` (stacked on dim 0)."""
    with warnings.catch_warnings():  # forward-mode AD loads its decompositions through the deprecated torch.jit
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        along = torch.func.vmap(lambda t: torch.func.jvp(fn, (primal,), (t,))[1])
        return torch.cat([along(part) for part in tangents.split(chunk)])


def _one_hots(count: int, like: Tensor, place) -> Tensor:
    """``count`` tangents shaped like ``like``, the c-th one where ``place(tangent, c)`` puts its ones."""
    tangents = torch.zeros(count, *like.shape, dtype=like.dtype, device=like.device)
    for c in range(count):
        place(tangents[c], c)
    return tangents


def factor_magnitudes(spec, a, b, coef, g_hat, sparse_delta) -> list[Tensor]:
    """Σ|terms| of the gradients of A, B and the coefficients: Σ_ij Ĝ_ij·|∂ΔWˢ_ij/∂θ| for every entry θ.

    ΔWˢ (G, m/G, n) is κ(a_j, b_i) of group g (τ and the reference mode's |ΔW| do not carry a derivative), so
    entry (g, i, j) depends on A through a_j alone: one tangent per column k of A, set in every row, yields every
    ∂ΔWˢ_gij/∂A_gjk at once. The same holds for B's rows, except under mixk, whose softmax over a column's rows
    ties every entry of the column to every b_i: there each (i, k) takes a tangent of its own, shared by the groups.
    """
    groups, rows, n = spec.grouped_shape
    r = a.shape[-1]
    factors = [a, b, coef]

    def along(which: int, tangents: Tensor) -> Tensor:
        """|∂ΔWˢ| along each tangent of factors[which], stacked on dim 0."""

        def delta_of(t: Tensor) -> Tensor:
            return sparse_delta(*(t if f is which else factors[f] for f in range(3)))

        primal = factors[which]
        return _jvps(delta_of, primal, tangents.reshape(-1, *primal.shape)).abs()

    magnitude_a = torch.einsum("kgij,gij->gjk", along(0, _one_hots(r, a.reshape(groups, n, r), _column)), g_hat)
    b_g = b.reshape(groups, rows, r)
    if spec.kernel == "mixk":
        each_row = along(1, _one_hots(rows * r, b_g, lambda t, c: t[:, c // r, c % r].fill_(1)))
        magnitude_b = torch.einsum("cgij,gij->cg", each_row, g_hat).reshape(rows, r, groups).permute(2, 0, 1)
    else:
        magnitude_b = torch.einsum("kgij,gij->gik", along(1, _one_hots(r, b_g, _column)), g_hat)
    each_entry = along(2, _one_hots(coef.numel(), coef.reshape(-1), lambda t, c: t[c].fill_(1)))
    magnitude_c = (each_entry * g_hat).flatten(1).sum(1)
    return [magnitude_a.reshape(a.shape), magnitude_b.reshape(b.shape), magnitude_c.reshape(coef.shape)]


def _column(tangent: Tensor, k: int) -> None:
    tangent[..., k] = 1


def layer_magnitudes(spec, inputs, grad, sparse_delta) -> list[Tensor]:
    """For y and the gradients of (x, W0, bias, A, B, coefficients): the sums of their terms' magnitudes, in float64.

    ``sparse_delta(a, b, coef)`` is ΔWˢ (G, m/G, n). y's is |x|·(|W0| + |ΔWˢ|)ᵀ + |b|, and its backward with |gy|
    gives x's, W0's (Ĝ = |gy|ᵀ|x|) and the bias's; :func:`factor_magnitudes` gives the rest from Ĝ.
    """
    x, weight, bias, a, b, coef = (t.detach().double() for t in inputs)
    m, n = spec.matrix_shape
    absolute = [t.abs().requires_grad_() for t in (x, weight, bias)]
    merged = absolute[1] + to_layout(spec, sparse_delta(a, b, coef).abs().reshape(m, n))
    magnitude = base_op(spec, absolute[0], merged, absolute[2])
    magnitude.backward(grad.detach().double().abs())
    g_hat = absolute[1].grad
    g_hat = (g_hat.T if spec.op == "linear_t" else g_hat.reshape(m, n)).reshape(spec.grouped_shape)
    return [magnitude.detach(), *(t.grad for t in absolute), *factor_magnitudes(spec, a, b, coef, g_hat, sparse_delta)]


def assert_within_bf16_roundings(spec, pairs, inputs, grad, sparse_delta) -> None:
    """Each (actual, expected) of y and the gradients of (x, W0, bias, A, B, coefficients), in that order, within
    ``BF16_ROUNDINGS`` bf16 roundings of its terms' magnitudes (:func:`layer_magnitudes`), entry by entry."""
    magnitudes = layer_magnitudes(spec, inputs, grad, sparse_delta)
    names = ("y", "dx", "dW0", "dbias", "dA", "dB", "dcoefficients")
    for (actual, expected), magnitude, name in zip(pairs, magnitudes, names, strict=True):
        error = (actual.detach().double() - expected.detach().double()).abs()
        bound = BF16_ROUNDINGS * U_BF16 * magnitude
        worst = float((error / bound.clamp_min(1e-300)).max())
        assert (error <= bound).all(), f"{name}: error up to {worst:.2f} of {BF16_ROUNDINGS} bf16 roundings"


def assert_matches_naive(spec, inputs, autocast_dtype: torch.dtype | None = None) -> None:
    """Forward and every input's gradient equal plain autograd on the naive formula.

    With ``autocast_dtype`` (bfloat16) the fused function runs as a SNELL layer does under autocast (x cast to
    that dtype, inside ``torch.autocast``) against the naive formula in the inputs' own precision, within
    ``BF16_ROUNDINGS`` roundings of each result's terms' magnitudes.
    """
    leaves = [t.clone().requires_grad_() for t in inputs]
    expected = naive_forward(spec, *leaves)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=expected.dtype)
    grad = grad.to(expected.device)
    expected.backward(grad)
    ours = [t.clone().requires_grad_() for t in inputs]
    device = inputs[0].device.type
    with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        x = ours[0] if autocast_dtype is None else ours[0].to(autocast_dtype)
        out = FusedSnell.apply(x, *ours[1:], spec)
    out.backward(grad.to(out.dtype))
    pairs = [(out, expected), *((mine.grad, theirs.grad) for mine, theirs in zip(ours, leaves, strict=True))]
    if autocast_dtype is None:
        for actual, wanted in pairs:
            _assert_close(actual, wanted)
        return
    assert_within_bf16_roundings(spec, pairs, inputs, grad, lambda a, b, coef: naive_sparse_delta(spec, a, b, coef))


def assert_dropout_matches_naive(spec, p: float, with_keep: bool, device="cpu") -> None:
    """y = op(x, W0) + b + k ⊙ op(D ⊙ x, ΔWˢ): backward must regenerate exactly the forward's D from its seed."""
    inputs = make_inputs(spec, tokens=4, device=device)
    x = inputs[0]
    keep = torch.tensor([0.0, 2.0, 2.0, 0.0][: x.shape[0]], dtype=x.dtype, device=device)
    keep = keep.reshape(-1, *[1] * (x.dim() - 1)) if with_keep else None
    torch.manual_seed(7)
    mask = torch.ones_like(x)
    if p > 0:
        mask = dropout.dropout_keep(x, p, dropout._draw_seed()) / dropout.keep_probability(p)
    leaves = [t.clone().requires_grad_() for t in inputs]
    x_, weight, bias, a, b, coef = leaves
    branch = naive_forward(spec, x_ * mask, torch.zeros_like(weight), torch.zeros_like(bias), a, b, coef)
    expected = base_op(spec, x_, weight, bias) + (branch if keep is None else keep * branch)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=expected.dtype)
    grad = grad.to(device)
    expected.backward(grad)
    ours = [t.clone().requires_grad_() for t in inputs]
    torch.manual_seed(7)
    out = FusedSnellDropout.apply(*ours, spec, p, keep)
    torch.testing.assert_close(out, expected)
    out.backward(grad)
    for mine, theirs in zip(ours, leaves, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad)


def dense_update(layer):
    """A SNELL layer's ΔW before sparsification, (G, m/G, n), built by the path that ``layer.delta_weight()`` runs
    (the choice :func:`snell.function.sparse_delta` makes), so its bits are the ones τ was selected on.

    The paths build ΔW in different orders: at 11008×4096 the fused CPU kernels' ΔW and the torch path's differ in
    the last bits of most entries, so ties at τ fall differently. Ground truth must come from the path that ran.
    """
    spec, a, b, coefficients = layer.snell_spec, layer.snell_A, layer.snell_B, layer.snell_coefficients
    path = kernel_path(spec, a.device, a.shape[-1], a.dtype)
    with torch.no_grad():
        if path == "torch":
            return dense_delta(spec, a, b, layer.kernel_coefficients())
        a_g, b_g, coefficients = grouped_factors(spec, a, b, coefficients)
        if path == "triton":
            from snell import fused_triton, fused_triton_mixk

            coefficients = layer.kernel_coefficients()  # mixk's: one (P + 3) row per group
            stats = None
            if spec.kernel == "mixk":
                stats = fused_triton_mixk.column_stats(a_g, b_g, coefficients, spec.num_pieces)
            return fused_triton.dense_delta(a_g, b_g, coefficients, spec.num_pieces, stats)
        return torch.stack(
            [fused_cpu.dense_delta(a_g[g], b_g[g], coefficients, spec.num_pieces) for g in range(spec.groups)]
        )


def assert_keeps_top_k(dense, kept, k):
    """``kept`` (bool, shaped like ``dense``, (G, ...)) is exactly the top k |entries| of each matrix plus every
    entry tied with the k-th: the definition of exact top-k with ties kept.

    Why not ``kept.sum() == k``: ΔW's last bits depend on the CPU's vector width and the thread count, and a
    45M-entry fp32 matrix has about one other entry per ulp at τ, so the number of ties at τ (and so of
    survivors beyond k) differs between machines. This check holds for whatever bits ΔW came out with.
    """
    magnitude = dense.detach().abs().flatten(1)
    tau = magnitude.topk(k, dim=1).values[:, -1:]
    kept = kept.flatten(1)
    assert torch.equal(kept, magnitude >= tau)
    assert ((magnitude > tau).sum(1) < k).all() and (kept.sum(1) >= k).all()


def assert_keeps_exactly(delta: Tensor, sparsity: float) -> None:
    """τ of each matrix of ΔW (G, m, n) keeps its top k |entries|, k = round((1 − s)·m·n), and every entry tied
    with the k-th (45M float32 draws tie at τ here and there)."""
    tau = sparsify.threshold(delta, sparsity)
    k = max(1, round((1.0 - sparsity) * delta[0].numel()))  # the rule itself, not sparsify.keep_count: it is tested
    assert_keeps_top_k(delta, delta.abs() >= tau, k)


def assert_selection_is_exact(values: Tensor, k: int, magnitude: bool) -> None:
    """Every selection method in :data:`snell.sparsify.SELECTION_METHODS` that runs on values' device, and the
    one the library picks, returns the k-th largest (|entry|) per row, as topk of the sorted values says."""
    reference = (values.abs() if magnitude else values).float().sort(dim=1, descending=True).values[:, k - 1 : k]
    picked = sparsify.kth_largest_magnitude(values, k) if magnitude else sparsify.kth_largest(values, k)
    assert picked.dtype == values.dtype and torch.equal(picked.float(), reference), "library's selection"
    for name, select in sparsify.SELECTION_METHODS.items():
        if name == "banded" and values.device.type != "cpu":
            continue
        got = select(values, k, magnitude)
        assert got.dtype == values.dtype and torch.equal(got.float(), reference), name


def _triton_factors(groups: int, m: int, n: int, device: str) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(groups, n, 8, generator=gen) * 0.2, torch.rand(groups, m, 8, generator=gen) * 0.2
    return a.to(device), b.to(device), torch.tensor([0.1, -0.1], device=device)


def assert_triton_tau_is_exact(groups: int, m: int, n: int, sparsity: float, device="cpu") -> None:
    """The Triton radix select's τ keeps the top k |entries| of the kernels' own ΔW (``dense_delta``, which every
    Triton pass computes bit for bit) and every entry tied with the k-th, per group."""
    from snell import fused_triton

    a, b, coef = _triton_factors(groups, m, n, device)
    tau = fused_triton.select_tau(a, b, coef, 2, [sparsity] * groups)
    delta = fused_triton.dense_delta(a, b, coef, 2)
    assert tau.dtype == torch.float32 and tau.device == delta.device
    assert_keeps_top_k(delta, delta.abs() >= tau, sparsify.keep_count(m * n, sparsity))


def assert_triton_backward_merges_as_forward(m: int, n: int, dtype: torch.dtype, device="cpu", rows=37) -> None:
    """The merged weight the Triton backward writes for dx, ``rows`` at a time, is the forward's bit for bit (two
    groups, W0 read transposed through its strides): only then does the saved τ keep the forward's survivors."""
    from snell import fused_triton

    a, b, coef = _triton_factors(2, m, n, device)
    base = torch.randn(2, n, m, generator=torch.Generator().manual_seed(1)).to(device, dtype).mT
    tau = fused_triton.select_tau(a, b, coef, 2, [0.9, 0.9])
    forward = fused_triton.merge(a, b, coef, 2, tau, "reference", base, dtype)
    backward = torch.empty_like(forward)
    grads = fused_triton.FactorGrads(a, b, coef, 2, False)
    for group in range(2):
        for start in range(0, m, rows):
            grad = torch.ones(min(rows, m - start), n, device=device, dtype=dtype)
            grads.add_rows(group, tau, "reference", start, grad, base, backward)
    assert torch.equal(forward, backward), f"{int((forward != backward).sum())} entries differ"


def tiny_vit(seed=0, depth=12, device="cpu") -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, depth=depth)
    return model.to(device)


def check_merge_unmerge_disable_and_unload(device="cpu", depth=12) -> None:
    """Merging, unmerging, disabling and unloading keep a model's outputs what they should be."""
    model = tiny_vit(depth=depth, device=device)
    x = torch.randn(2, 3, 32, 32).to(device)
    base_out = model.eval()(x)
    snell.get_snell_model(model, snell.SnellConfig(sparsity=0.7))
    with torch.no_grad():
        for _, layer in snell.snell_layers(model):
            layer.B.mul_(20)  # a visible update
    adapted = model(x)
    assert (adapted - base_out).abs().max() > 1e-3
    with snell.disable_adapters(model):
        torch.testing.assert_close(model(x), base_out)
    snell.merge_adapters(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)
    try:
        with snell.disable_adapters(model):
            raise AssertionError("disabling merged adapters must raise")
    except ValueError as err:
        assert "unmerge" in str(err)
    snell.unmerge_adapters(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)
    merged = snell.merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, SnellLayer) for m in merged.modules())
    assert type(merged.blocks[0].attn.qkv) is nn.Linear
    torch.testing.assert_close(merged(x), adapted, rtol=1e-4, atol=1e-5)
    assert set(merged.state_dict()) == set(tiny_vit(depth=depth).state_dict())
    restored = snell.unload(model)
    torch.testing.assert_close(restored(x), base_out, rtol=1e-5, atol=1e-6)


def check_save_load(folder: Path, device="cpu", depth=12) -> None:
    """An adapter saved and loaded into a fresh model (other random factors) gives identical outputs."""
    model = tiny_vit(seed=0, depth=depth, device=device)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    snell.get_snell_model(model, snell.SnellConfig(r=8, sparsity=0.8, modules_to_save=["head"]))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    model.eval()
    x = torch.randn(2, 3, 32, 32).to(device)
    expected = model(x)
    out = snell.save_adapter(model, folder / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = tiny_vit(seed=123, depth=depth, device=device)
    fresh.load_state_dict(base_state)
    torch.manual_seed(999)
    snell.load_adapter(fresh, folder / "adapter")
    torch.testing.assert_close(fresh.eval()(x), expected)
    adapter_bytes = (folder / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 0.2 * sum(v.numel() * 4 for v in base_state.values())


def check_dropout_is_reproducible(device="cpu", depth=2) -> None:
    """With adapter dropout and drop-path, a training step is a function of the seed: the same seed gives the
    same output and gradients, another seed another output; evaluation is deterministic."""
    model = tiny_vit(depth=depth, device=device)
    snell.get_snell_model(model, snell.SnellConfig(sparsity=0.5, dropout=0.1, drop_path=0.1))
    x = torch.randn(4, 3, 32, 32).to(device)
    layer = model.blocks[0].mlp.fc2

    def step(seed: int) -> tuple[Tensor, Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = model.train()(x)
        out.square().sum().backward()
        return out.detach(), layer.B.grad.clone()

    first, again, other = step(0), step(0), step(1)
    assert torch.equal(first[0], again[0])
    # close, not equal: on a GPU the attention backward adds with atomics, in any order; another mask would
    # change the gradient far beyond this tolerance
    torch.testing.assert_close(first[1], again[1])
    assert not torch.allclose(first[0], other[0])
    assert first[1].abs().sum() > 0
    model.eval()
    torch.testing.assert_close(model(x), model(x))


class QkvBlock(nn.Module):
    """A fused q/k/v projection (three adapter groups) and a plain linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(10, 24)
        self.fc = nn.Linear(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.qkv(x)))


def check_snella_under_fp16_autocast(device="cpu", depth=2) -> None:
    """SNELLA's loop as `snell train --method snella --fp16` runs it: mixk layers under float16 autocast with a
    GradScaler, the allocator fed after every step (unscaled gradients) and re-allocating from its scores. On a GPU
    the averages live on the device and the counts on the host."""
    from snell.allocator import AllocatorConfig, SparsityAllocator, budget

    model = tiny_vit(depth=depth, device=device)
    snell.get_snell_model(model, snell.SnellConfig(r=8, kernel="mixk", sparsity=0.01, modules_to_save=["head"]))
    allocator = SparsityAllocator(model, AllocatorConfig(target_sparsity=0.7, total_steps=2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scaler = torch.amp.GradScaler(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 5, (8,), generator=generator).to(device)
    for _ in range(4):
        with torch.autocast(device, dtype=torch.float16):
            loss = F.cross_entropy(model.train()(x), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        allocator.accumulate()
        optimizer.zero_grad(set_to_none=True)
        assert torch.isfinite(loss), loss
    scores = allocator.scores()
    assert scores.device.type == "cpu" and bool(torch.isfinite(scores).all()) and bool((scores > 0).any())
    volume, _ = budget(allocator.config, allocator.initial_volume, allocator.target_volume, 1)
    sparsity = allocator.update(1)
    assert sparsity is not None
    values = [s for groups in sparsity.values() for s in groups]
    assert min(values) < max(values)  # the layers competed: their shares follow their scores
    kept = allocator.kept_ratio() * float(allocator.sizes.sum())
    assert volume - len(values) <= kept <= volume  # each unit's count is floored: at most one entry lost per unit
