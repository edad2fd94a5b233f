"""The Triton kernels under the Triton interpreter (on the CPU), against the float64 naive formula.

How the interpreter is switched on: triton decides at decoration time whether ``@triton.jit`` makes a compiled
or an interpreted function (``triton.knobs.runtime.interpret``, read from TRITON_INTERPRET when the decorator
runs), and triton.language's own helpers (``tl.sum``, ``tl.zeros``) are decorated when triton itself is first
imported, which torch._dynamo or any earlier test module may do. So setting the variable here, or reloading
``snell.fused_triton``, would be too late: conftest.py sets it before any test module is imported, on machines
without CUDA. The module fixture checks the outcome (``fused_triton.interpreted()``, and the same for ``tl.sum``)
and skips with the reason if triton was imported before conftest.py ran (e.g. by a plugin).

Checks as in test_fused_cpu.py: τ by its definition on the kernels' own ΔW (``fused_triton.dense_delta``),
values and gradients within the rounding bounds of ``bounds.py``; matrices of a few 64×64 tiles, partial ones
included, so every mask and every cross-tile reduction is exercised.
"""

import math
import os
import subprocess
import sys
import warnings

import checks
import pytest
import torch
from bounds import abs_gradient_scale, gamma, naive_with_bound, snell_kernels

pytest.importorskip("triton")

import snell.sparsify
import snell.triton_path
from snell import fallback, fused_triton
from snell.dispatch import kernel_path
from snell.dropout import FusedSnellDropout
from snell.function import FusedSnell
from snell.spec import SnellSpec, grouped_factors, with_sparsities

pytestmark = pytest.mark.usefixtures("one_thread", "interpreter")

MODES = ["reference", "mask", "soft"]
CPU = torch.device("cpu")
BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significand bits)


@pytest.fixture(scope="module")
def interpreter():
    """Skips unless the kernels and triton.language itself were decorated under the interpreter (conftest.py)."""
    import triton.language as tl

    if not (fused_triton.interpreted() and type(tl.sum).__name__ == "InterpretedFunction"):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it without CUDA)")


def _spec(mode="reference", sparsity=0.9, op="linear", shape=(96, 80), groups=1, **conv):
    return SnellSpec(op, shape, "piecewise_linear", 2, mode, sparsity, groups, **conv)


def _inputs(spec, dtype=torch.float32, r=8, tokens=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m, n = spec.matrix_shape
    x = (
        torch.randn(2, spec.weight_shape[1], 5, 5, generator=gen)
        if spec.op == "conv2d"
        else torch.randn(tokens, n, generator=gen)
    )
    weight = torch.randn(spec.weight_shape, generator=gen) * 0.05
    bias = torch.randn(m, generator=gen)
    lead = (spec.groups,) if spec.groups > 1 else ()
    a = torch.rand(*lead, n, r, generator=gen) * 0.2
    b = torch.rand(*lead, m // spec.groups, r, generator=gen) * 0.2
    return [t.to(dtype) for t in (x, weight, bias, a, b)] + [torch.tensor([0.1, -0.1])]


def _assert_exact_top_k(delta, sparsity, tau):
    """τ keeps the top k |ΔW| of each group and every entry tied with the k-th."""
    checks.assert_keeps_top_k(delta, delta.abs() >= tau, snell.sparsify.keep_count(delta[0].numel(), sparsity))


def _own_delta_and_tau(spec, a, b, coef):
    """The kernels' own ΔW (G, m/G, n) and the τ the forward selects, checked against the definition."""
    a_g, b_g, coef = grouped_factors(spec, a, b, coef)
    delta = fused_triton.dense_delta(a_g, b_g, coef, 2)
    _, tau = snell.triton_path.merged_and_tau(spec, a, b, coef, None, torch.float32)
    assert tau.dtype == torch.float32 and tau.shape == (spec.groups, 1, 1)
    if spec.sparsity == 0:
        assert (tau == -math.inf).all()
    else:
        _assert_exact_top_k(delta, spec.sparsity, tau)
    return delta, tau.double()


def _check_against_naive(spec, inputs, trainable=(True,) * 6, layer=FusedSnell.apply):
    """Forward and every gradient within (1 + γ_K)·(1 + u_bf16)^R − 1 times M of the float64 naive formula.

    γ_K·M is the float32 bound of bounds.py. In bf16 (R = 3) every value reaches the result through at most
    three bf16 roundings, each relative to a quantity bounded by M times the factors before it: the forward
    rounds the merged weight, the GEMM's output and possibly that output again after adding the bias; dx the
    merged weight and the GEMM's output; dA, dB the dW GEMM's output and the cast to the factors' dtype; dW0 and
    the bias' gradient one GEMM or sum output. The upstream gradient is drawn in bf16, so its cast is exact.
    """
    _, _, _, a, b, coef = inputs
    own, tau = _own_delta_and_tau(spec, a, b, coef)
    # The kernels' survivors; in the soft mode those strictly above τ (S = |ΔW| − τ is 0 at τ itself).
    keep = (own.abs() > tau.float() if spec.mode == "soft" else own.abs() >= tau.float()).double()
    leaves = [t.double().requires_grad_(wanted) for t, wanted in zip(inputs, trainable, strict=True)]
    expected, bound, _ = naive_with_bound(spec, *leaves, keep, tau)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(inputs[0].dtype).double()
    expected.backward(grad, inputs=[t for t in leaves if t.requires_grad])
    ours = [t.clone().requires_grad_(wanted) for t, wanted in zip(inputs, trainable, strict=True)]
    with snell_kernels("triton"):
        assert kernel_path(spec, CPU, 8, *{t.dtype for t in inputs}) == "triton"
        out = layer(*ours, spec)
    m, n = spec.matrix_shape
    # No sum has more terms than x has entries (the dW GEMM's depth) plus m or n (the per-tile and cross-tile
    # reductions into A and B); 64 covers the per-entry operations of ΔW, S and the merge.
    depth = inputs[0].numel() + m + n + 64
    roundings = 3 if inputs[0].dtype == torch.bfloat16 else 0
    assert ((out.double() - expected).abs() <= ((1 + gamma(depth)) * (1 + BF16_UNIT) ** roundings - 1) * bound).all()
    out.backward(grad.to(out.dtype))
    # Gradient bounds: the same derivative with every factor replaced by its magnitude (bounds.py).
    relative = (1 + gamma(depth * 2)) * (1 + BF16_UNIT) ** roundings - 1
    for mine, theirs, leaf, wanted in zip(ours, leaves, inputs, trainable, strict=True):
        if not wanted:
            assert mine.grad is None
            continue
        scale = abs_gradient_scale(spec, inputs, keep, tau, grad, leaf)
        assert mine.grad.dtype == leaf.dtype
        assert ((mine.grad.double() - theirs.grad).abs() <= relative * scale).all()


CASES = [
    *[_spec(mode=md) for md in MODES],
    _spec(sparsity=0.0),
    _spec(mode="soft", sparsity=0.5, shape=(99, 80), groups=3),
    _spec(op="conv2d", shape=(8, 3, 3, 3), padding=(1, 1)),
    _spec(op="linear_t", shape=(80, 130), mode="mask"),  # transformers' Conv1D: W0 read through its strides
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.op}-{s.mode}-s{s.sparsity}-g{s.groups}")
def test_forward_and_gradients_match_the_naive_formula_within_rounding_bounds(spec, dtype):
    _check_against_naive(spec, _inputs(spec, dtype))


def test_frozen_factors_take_the_merge_only_backward():
    spec = _spec(mode="soft")
    _check_against_naive(spec, _inputs(spec), trainable=(True, True, True, False, False, False))


def test_adapter_dropout_branch_takes_the_triton_path():
    # p = 0 leaves x as it is, so the naive formula applies: y = op(x, W0) + b + op(x, ΔWˢ) adds one rounding (the
    # sum of the two GEMMs' outputs), inside the bound's 64 per-entry operations. This checks the branch's own
    # plumbing (ΔWˢ alone in forward, a backward without W0); the mask's regeneration does not depend on the path.
    spec = _spec(mode="mask", shape=(99, 80), groups=3)
    _check_against_naive(spec, _inputs(spec), layer=lambda *tensors: FusedSnellDropout.apply(*tensors, 0.0, None))


@pytest.mark.parametrize("mode", MODES)
def test_backward_over_several_row_blocks_and_groups(mode, monkeypatch):
    monkeypatch.setattr(snell.triton_path, "BLOCK_ENTRIES", 40 * 80)  # blocks of 40 rows: 2 per group of 66
    spec = _spec(mode=mode, shape=(198, 80), groups=3)
    _check_against_naive(spec, _inputs(spec))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_rebuilds_the_forward_merged_weight_bit_for_bit(dtype):
    checks.assert_triton_backward_merges_as_forward(150, 90, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e38 to fp16: inf, as torch
def test_bf16_and_fp16_merges_round_like_torch():
    _, weight, _, a, b, coef = _inputs(_spec(shape=(96, 80)))
    weight[0, :4] = torch.tensor([math.inf, -math.inf, math.nan, 1e38])  # specials, and overflow to inf in fp16
    a, b, base = a[None], b[None], weight[None]
    tau = fused_triton.select_tau(a, b, coef, 2, [0.9])
    fp32 = fused_triton.merge(a, b, coef, 2, tau, "mask", base, torch.float32)
    numbers = ~fp32.isnan()
    for dtype in (torch.bfloat16, torch.float16):
        rounded = fused_triton.merge(a, b, coef, 2, tau, "mask", base, dtype)
        assert torch.equal(rounded.isnan(), fp32.isnan())
        assert torch.equal(rounded[numbers], fp32.to(dtype)[numbers])


def test_a_bf16_merge_rounds_halfway_values_to_even_as_torch_does():
    # Random data almost never holds an exact tie (about 2^-16 per entry), so the test above cannot see the rule.
    # Zero coefficients and a dense τ make ΔW = 0: the merge writes W0's float32 values exactly, each halfway
    # between two bf16 numbers (1 + 2^-8 lies between 1 and 1 + 2^-7; even is 1), and rounds them.
    halfway = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2 + 2**-7, 0.5 + 2**-10, 3 + 2**-7, 1.0, 1.5])
    base = halfway.repeat(4, 1)[None]
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 8, 4, generator=gen), torch.rand(1, 4, 4, generator=gen)
    tau = torch.full((1, 1, 1), -math.inf)
    rounded = fused_triton.merge(a, b, torch.zeros(2), 2, tau, "mask", base, torch.bfloat16)
    assert torch.equal(rounded.view(torch.int16), base.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99, 0.9999])
def test_tau_is_the_exact_kth_largest_of_the_kernels_own_delta(sparsity):
    checks.assert_triton_tau_is_exact(3, 100, 150, sparsity)


def test_keeping_nothing_gives_an_infinite_tau():
    _, _, _, a, b, coef = _inputs(_spec())
    tau = fused_triton.select_tau(a[None], b[None], coef, 2, [1.0])  # k = 0
    assert (tau == math.inf).all() and not (fused_triton.dense_delta(a[None], b[None], coef, 2).abs() >= tau).any()


def test_ties_at_tau_are_all_kept_and_the_kept_count_is_exact():
    # Rows of B repeated: every |ΔW| value appears 10 times, so τ sits inside a block of ties.
    _, _, _, a, b, coef = _inputs(_spec(shape=(120, 100)), seed=2)
    tied = b[:12].repeat(10, 1)[None]
    tau = fused_triton.select_tau(a[None], tied, coef, 2, [0.9])
    _assert_exact_top_k(fused_triton.dense_delta(a[None], tied, coef, 2), 0.9, tau)
    # Without ties the reference and mask modes keep exactly k = round((1 − s)·m·n) entries.
    for mode in ("reference", "mask"):
        spec = _spec(mode=mode, shape=(120, 100))
        sparse, _ = snell.triton_path.merged_and_tau(spec, a, b, coef, None, torch.float32)
        assert int((sparse != 0).sum()) == snell.sparsify.keep_count(120 * 100, 0.9)


SNELLA_SPEC = with_sparsities(SnellSpec("linear", (99, 80), "mixk", 2, "soft", 0.5, 3), [0.0, 0.5, 0.95])
"""mixk with one sparsity per group (the allocator's), one of them 0."""


@pytest.mark.parametrize("spec", [_spec(mode="soft", shape=(99, 80), groups=3), SNELLA_SPEC], ids=["pl", "mixk"])
def test_the_path_reads_no_device_value_on_the_host(spec, monkeypatch):
    # The CPU stand-in for CUDA's sync debug mode: any read of a tensor's value by the host raises.
    x, weight, bias, a, b, coef = _inputs(spec)
    if spec.kernel == "mixk":
        coef = torch.tensor([[0.1, -0.1, 1.3, 0.7, 0.01]] * 3)  # one (P + 3) row per group, as the layers pass them
    leaves = [t.requires_grad_() for t in (x, a, b)]

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host")

    with snell_kernels("triton"):
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            monkeypatch.setattr(torch.Tensor, name, host_read)
        out = FusedSnell.apply(leaves[0], weight, bias, leaves[1], leaves[2], coef, spec)
        out.backward(torch.ones_like(out))
        monkeypatch.undo()
    assert all(t.grad is not None for t in leaves)


def test_kernel_path_dispatch(monkeypatch):
    spec = _spec(shape=(4096, 4096))
    cuda = torch.device("cuda")
    assert kernel_path(spec, cuda, 8, torch.bfloat16) == "torch"  # not the default on CUDA until measured faster
    assert kernel_path(spec, CPU, 8, torch.float32) != "triton"
    monkeypatch.setenv("SNELL_KERNELS", "triton")
    assert kernel_path(spec, CPU, 8, torch.float32, torch.bfloat16, torch.float16) == "triton"
    assert kernel_path(spec, CPU, 8, torch.float64) == "torch"
    assert kernel_path(SnellSpec("linear", (64, 64), "rbf", 1, "reference", 0.9), CPU, 8, torch.float32) == "torch"
    assert kernel_path(SNELLA_SPEC, CPU, 8, torch.float32, torch.bfloat16) == "triton"  # mixk, group sparsities
    monkeypatch.setenv("SNELL_KERNELS", "auto")
    assert kernel_path(SNELLA_SPEC, cuda, 8, torch.bfloat16) == "torch"  # not the default on CUDA until measured
    monkeypatch.setenv("SNELL_KERNELS", "triton")
    monkeypatch.setattr(fused_triton, "interpreted", lambda: False)  # a CPU without the interpreter
    monkeypatch.setattr(fallback, "_said", set())
    with pytest.warns(UserWarning, match="TRITON_INTERPRET=1"):
        assert kernel_path(spec, CPU, 8, torch.float32) == "torch"


def test_a_rank_the_pieces_do_not_split_or_a_matrix_int32_cannot_index_stays_on_the_torch_path(monkeypatch):
    # The kernels take each piece as r // P columns (r = 7 with P = 2 would drop a column of A and B), and index the
    # (m, n) matrix and count its histogram in int32: 2^31 entries is one too many.
    monkeypatch.setenv("SNELL_KERNELS", "triton")
    supports, fp32 = snell.triton_path.supports, (torch.float32,)
    spec = _spec()
    assert supports(spec, 8, fp32) and kernel_path(spec, CPU, 8, torch.float32) == "triton"
    assert not supports(spec, 7, fp32) and kernel_path(spec, CPU, 7, torch.float32) == "torch"
    assert supports(_spec(shape=(1 << 16, (1 << 15) - 1)), 8, fp32)
    assert not supports(_spec(shape=(1 << 16, 1 << 15)), 8, fp32)


def test_the_compile_check_leaves_torchs_random_state_alone():
    # It runs at a process's first Triton layer: drawing from the default generator shifted that run's dropout masks.
    state = torch.get_rng_state()
    assert fused_triton._runs_on.__wrapped__(torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)


def test_without_triton_the_torch_path_runs_with_one_warning(monkeypatch):
    monkeypatch.setattr(fused_triton, "triton", None)
    monkeypatch.setattr(fallback, "_said", set())
    monkeypatch.setenv("SNELL_KERNELS", "triton")
    spec = _spec()
    with pytest.warns(UserWarning, match="triton is not installed"):
        assert kernel_path(spec, CPU, 8, torch.float32) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_path(spec, CPU, 8, torch.float32) == "torch"


# Compiles every kernel for sm_90 (Hopper) ahead of time in a process without the interpreter (Triton's wheel
# ships ptxas; no GPU is needed) and counts the fused multiply-adds in the PTX: none, since the launches turn FMA
# contraction off, while the same kernels compiled with it on contract hundreds.
_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from snell import fused_triton as ft

from snell import fused_triton_mixk as mixk

shapes = dict(RANK=8, PIECES=2, BM=64, BN=64)
ptr, i32 = "*fp32", "i32"
factors = {n: ptr for n in ("at_ptr", "b_ptr", "coef_ptr", "stats_ptr")}
radix = factors | {"prefix_ptr": "*i32", "hist_ptr": "*i32", "m": i32, "n": i32}
merge = factors | {"tau_ptr": ptr, "base_ptr": "*bf16", "out_ptr": "*i16"}
merge |= {n: i32 for n in ("m", "n", "base_sg", "base_sm", "base_sn")}
backward = factors | {"soft_sums_ptr": ptr, "tau_ptr": ptr, "grad_ptr": "*bf16", "base_ptr": "*bf16"}
backward |= {"merged_ptr": "*i16"} | {n: ptr for n in ("row_part_ptr", "col_part_ptr", "coef_part_ptr")}
backward |= {n: i32 for n in ("group", "first_row", "rows_in_block", "m", "n", "base_sm", "base_sn")}
stats = factors | {"m": i32, "n": i32}
grads = factors | {"tau_ptr": ptr, "grad_ptr": "*bf16", "soft_sums_ptr": ptr, "grad_sums_ptr": ptr, "m": i32, "n": i32}
kernels = [
    (ft._radix_pass, radix, dict(SHIFT=16, MIX=False)),
    (ft._merge, merge, dict(MODE=2, HAS_BASE=True, KIND=1, MIX=False)),
    (ft._backward_rows, backward, dict(MODE=2, HAS_BASE=True, NEED_MERGED=True, KIND=1, NEED_COEF=True, MIX=False)),
    (ft._radix_pass, radix, dict(SHIFT=16, MIX=True)),
    (ft._merge, merge, dict(MODE=2, HAS_BASE=True, KIND=1, MIX=True)),
    (ft._backward_rows, backward, dict(MODE=2, HAS_BASE=True, NEED_MERGED=True, KIND=1, NEED_COEF=True, MIX=True)),
    (mixk._column_stats, stats, {}),
    (mixk._column_grads, grads, dict(MODE=2)),
]
for fusion in (False, True):
    counts = []
    for fn, signature, constants in kernels:
        constants = {**constants, **shapes}
        source = ASTSource(fn, {**signature, **dict.fromkeys(constants, "constexpr")}, constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": fusion})
        counts.append(compiled.asm["ptx"].count("fma.rn.f32"))
    print(fusion, *counts)
"""


def test_kernels_compile_for_hopper_without_fma_contraction():
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    without, with_fusion = (line.split() for line in done.stdout.strip().splitlines())
    assert without == ["False"] + ["0"] * 8
    assert with_fusion[0] == "True" and all(int(count) > 0 for count in with_fusion[1:])
