"""snell's mixk layer and SparsityAllocator against the SNELLA authors' code (benchmarks/reference_snella.py), in
float64.

Tolerances: both sides evaluate the same float64 formulas in different orders (their cdist against our GEMM of
augmented factors for ‖a − b‖², their softmax against ours, one GEMM against per-block ones), so entries agree to
a few ulps of the largest intermediate, far below 1e-10 of the output's scale; we check 1e-10 relative to the
largest |expected| entry. The allocator's ratios are compared exactly: they are 1 − floor(·)/size of the same
float64 products, which differ only if one lands within rounding of an integer.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from bounds import snell_kernels
from torch import nn

import snell
from snell.allocator import AllocatorConfig, SparsityAllocator
from snell.dispatch import kernel_path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
ref = importlib.import_module("benchmarks.reference_snella")
split_pieces = importlib.import_module("benchmarks.reference_snell").split_pieces

pytestmark = pytest.mark.usefixtures("one_thread")

R = 8  # rank: pieces of width 4, as the authors' q_dim // num_Hs


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.detach().abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * scale)


def _pair(sparsity: float, m: int = 12, n: int = 10, seed: int = 0, mode: str = "reference", module=None):
    """Our mixk layer (m×n Linear, float64) and the authors' SNELLA module (or ``module``) with the same factors and
    scalars."""
    torch.manual_seed(seed)
    config = snell.SnellConfig(r=R, kernel="mixk", sparsity=sparsity, sparsify_mode=mode, target_modules=["0"])
    ours = snell.get_snell_model(nn.Sequential(nn.Linear(n, m)).double(), config)[0]
    with torch.no_grad():
        # Away from the init, so that each scalar matters.
        ours.snell_mix.copy_(torch.tensor([[1.3, 0.7, -0.02]], dtype=torch.float64))
    theirs = (module or ref.ReferenceSNELLA)(n, m, q_dim=R, init_thres=sparsity).double()
    with torch.no_grad():
        theirs.In_Qs.copy_(split_pieces(ours.snell_A.detach()))
        theirs.Out_Qs.copy_(split_pieces(ours.snell_B.detach()))
        theirs.alpha.fill_(1.3)
        theirs.gamma.fill_(0.7)
        theirs.beta.fill_(-0.02)
    return ours, theirs


def _branch(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x) - nn.functional.linear(x, layer.weight, layer.bias)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.8])
def test_outputs_support_and_gradients_equal_the_authors_module(sparsity):
    # 120 entries: at these ratios their "|ΔW| > the s-quantile" and our top round((1 − s)·N) keep the same count.
    ours, theirs = _pair(sparsity)
    x = torch.randn(6, 10, dtype=torch.float64)
    theirs_delta = theirs.sparsify(theirs.path_integrals()).T.detach()
    assert torch.equal(ours.delta_weight() != 0, theirs_delta != 0)
    _close(ours.delta_weight(), theirs_delta)
    grad = torch.randn(6, 12, dtype=torch.float64)
    mine, expected = _branch(ours, x), theirs(x)
    _close(mine, expected)
    mine.backward(grad)
    expected.backward(grad)
    _close(ours.snell_A.grad, _unsplit(theirs.In_Qs.grad))
    _close(ours.snell_B.grad, _unsplit(theirs.Out_Qs.grad))
    _close(ours.snell_mix.grad[0], torch.cat([theirs.alpha.grad, theirs.gamma.grad, theirs.beta.grad]))


@pytest.mark.parametrize("kernels", ["torch", "fused"])
def test_mask_mode_at_sparsity_zero_is_the_authors_dense_mixk_module(kernels):
    # Their caltech, svhn and cars scripts train MixK: the mixed kernel, never sparsified (no |ΔW| factor, no
    # dropped entry). Ours at sparsity 0 in mask mode keeps every entry as it is, on either path (the fused
    # kernels run in float32).
    ours, theirs = _pair(0.0, m=700, n=400, mode="mask", module=ref.ReferenceMixK)
    if kernels == "fused":
        ours.float()
        theirs.float()
    x = torch.randn(6, 400, dtype=ours.weight.dtype)
    with snell_kernels(kernels):
        assert kernel_path(ours.snell_spec, x.device, R, x.dtype) == ("fused_cpu" if kernels == "fused" else "torch")
        mine, expected = _branch(ours, x), theirs(x)
        grad = torch.randn(mine.shape, dtype=mine.dtype)
        mine.backward(grad)
        expected.backward(grad)
    pairs = [(mine, expected), (ours.snell_A.grad, _unsplit(theirs.In_Qs.grad))]
    pairs += [(ours.snell_B.grad, _unsplit(theirs.Out_Qs.grad))]
    pairs += [(ours.snell_mix.grad[0], torch.cat([theirs.alpha.grad, theirs.gamma.grad, theirs.beta.grad]))]
    for actual, want in pairs:
        if kernels == "torch":
            _close(actual, want)
        else:
            # float32 on both sides: ΔW's entries and the sums over 700 rows or 400 columns round differently (the
            # fused kernels' own exp, cdist's expansion), each within ~1e-6 of the magnitudes summed
            tolerance = 1e-4 * float(want.detach().abs().max())
            torch.testing.assert_close(actual.detach(), want.detach(), rtol=1e-4, atol=tolerance)


def _unsplit(pieces: torch.Tensor) -> torch.Tensor:
    """(P, rows, r/P) back to our (rows, r)."""
    return pieces.transpose(0, 1).reshape(pieces.shape[1], -1)


def test_at_sparsity_zero_theirs_drops_only_the_smallest_entry():
    # quantile(·, 0) is the smallest |ΔW| and their threshold keeps what is strictly above it; we keep every entry.
    ours, theirs = _pair(0.0)
    theirs_delta = theirs.sparsify(theirs.path_integrals()).T.detach()
    dense = theirs.path_integrals().T.detach()
    smallest = dense.abs().argmin()
    assert (ours.delta_weight() != 0).all()
    assert int((theirs_delta == 0).sum()) == 1 and theirs_delta.flatten()[smallest] == 0
    _close(ours.delta_weight().flatten().index_fill(0, smallest, 0.0), theirs_delta.flatten())


def _scripted_models(seed: int = 0):
    """Our q/k/v + fc model and the authors' four SNELLA modules, with the same factors (float64)."""
    torch.manual_seed(seed)
    model = nn.ModuleDict({"qkv": nn.Linear(10, 24), "fc": nn.Linear(24, 6)}).double()
    config = snell.SnellConfig(r=R, kernel="mixk", sparsity=0.01, target_modules=["qkv", "fc"])
    model = snell.get_snell_model(model, config)
    shapes = {"q": (10, 8), "k": (10, 8), "v": (10, 8), "fc": (24, 6)}
    modules = {name: ref.ReferenceSNELLA(n, m, q_dim=R, init_thres=0.01).double() for name, (n, m) in shapes.items()}
    return model, modules


def _script_step(model, modules, gen):
    """Random factors and gradients, the same on both sides (as if an optimizer step had just run)."""
    for _, layer in snell.snell_layers(model):
        for factor in ("snell_A", "snell_B"):
            param = getattr(layer, factor)
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64))
            param.grad = torch.randn(param.shape, generator=gen, dtype=torch.float64) * (
                1 + torch.rand(1, generator=gen)
            )
    pairs = [("q", "qkv", 0), ("k", "qkv", 1), ("v", "qkv", 2), ("fc", "fc", None)]
    for theirs_name, our_name, group in pairs:
        layer, module = model[our_name], modules[theirs_name]
        for ours_factor, theirs_factor in (("snell_A", "In_Qs"), ("snell_B", "Out_Qs")):
            param = getattr(layer, ours_factor)
            value, grad = (param, param.grad) if group is None else (param[group], param.grad[group])
            with torch.no_grad():
                getattr(module, theirs_factor).copy_(split_pieces(value.detach()))
            getattr(module, theirs_factor).grad = split_pieces(grad).clone()


@pytest.mark.parametrize(
    "schedule",
    [
        dict(target_sparsity=0.8, total_steps=8, init_warmup=0, final_warmup=0, mask_interval=1),  # VTAB scripts
        dict(target_sparsity=0.3, total_steps=8, init_warmup=1, final_warmup=2, mask_interval=2),
    ],
)
def test_allocator_ratios_equal_the_authors_over_a_scripted_run(schedule):
    model, modules = _scripted_models()
    config = AllocatorConfig(**schedule, beta1=0.85, beta2=0.85)
    ours = SparsityAllocator(model, config)
    theirs = ref.ReferenceAllocator(
        modules,
        schedule["target_sparsity"],
        schedule["init_warmup"],
        schedule["final_warmup"],
        schedule["mask_interval"],
        0.85,
        0.85,
        schedule["total_steps"],
    )
    gen = torch.Generator().manual_seed(3)
    reallocations = 0
    for epoch in range(schedule["total_steps"]):
        ours.update(epoch)
        theirs.update(epoch)
        expected = {name: module.init_thres for name, module in modules.items()}
        mine = ours.sparsity()
        assert mine == {"qkv": [expected["q"], expected["k"], expected["v"]], "fc": [expected["fc"]]}, epoch
        reallocations += expected != {name: 0.01 for name in modules}
        for _ in range(3):  # optimizer steps per epoch
            _script_step(model, modules, gen)
            ours.accumulate()
            theirs.update_ipt()
    for name in modules:
        for factor, key in (("In_Qs", "snell_A"), ("Out_Qs", "snell_B")):
            our_name, group = ("qkv", "qkv".index(name)) if name in "qkv" else ("fc", None)
            sensitivity = ours.sensitivity[f"{our_name}.{key}"]
            sensitivity = sensitivity if group is None else sensitivity[group]
            _close(sensitivity, _unsplit(theirs.exp_avg_ipt[f"{name}.{factor}"]))
    assert reallocations >= 3


def test_the_oracles_schedule_ends_its_cubic_span_at_t_minus_the_final_warm_up():
    """T = 8, warm-ups 1 and 2, interval 4, one 10×8 unit at target 0.3: step 6 = T − w1 is still cubic (an
    int volume, re-allocating on a multiple of the interval only); step 7 takes the target and re-allocates."""
    module = ref.ReferenceSNELLA(10, 8, q_dim=8, init_thres=0.01)
    alloc = ref.ReferenceAllocator({"a": module}, 0.3, 1, 2, 4, 0.85, 0.85, 8)
    volume, reallocate = alloc.schedule_threshold(6)
    assert (volume, reallocate) == (56, False) and isinstance(volume, int)
    assert alloc.schedule_threshold(7) == (alloc.target_nonzero_param, True)


def test_the_oracles_averages_use_their_own_betas_and_count_nan_as_zero():
    """One step from zero with β1 = 0.5, β2 = 0.9: Ī = 0.5·I and Ū = 0.1·|I − Ī| = 0.05·I (float64, exact up to
    rounding); a NaN gradient entry counts as sensitivity 0, as in the authors' code."""
    torch.manual_seed(0)
    module = ref.ReferenceSNELLA(6, 4, q_dim=4, init_thres=0.5).double()
    for param in (module.In_Qs, module.Out_Qs):
        param.grad = torch.randn_like(param)
    module.In_Qs.grad[0, 0, 0] = float("nan")
    alloc = ref.ReferenceAllocator({"a": module}, 0.8, 0, 0, 1, 0.5, 0.9, 10)
    alloc.update_ipt()
    for factor in ("In_Qs", "Out_Qs"):
        param = getattr(module, factor)
        ipt = (param * param.grad).abs().detach().nan_to_num(0.0)
        torch.testing.assert_close(alloc.exp_avg_ipt[f"a.{factor}"], 0.5 * ipt, rtol=1e-12, atol=0)
        torch.testing.assert_close(alloc.exp_avg_unc[f"a.{factor}"], 0.05 * ipt, rtol=1e-12, atol=0)
    assert alloc.ipt["a.In_Qs"][0, 0, 0] == 0


def test_the_oracle_shares_equally_without_scores_and_hands_out_every_left_over():
    """All-zero gradients: two 80-entry units share a budget of 80 equally. Sizes (10, 12, 100), shares (0.6, 0.2,
    0.2), budget 40: (24 → 10, 8, 8) leaves 14; 7 each to the last two, the second capped at 12, leaves 3, which a
    second round gives the third: (10, 12, 18). Small integers, exact in float64."""
    modules = {name: ref.ReferenceSNELLA(10, 8, q_dim=8, init_thres=0.01).double() for name in ("a", "b")}
    for module in modules.values():
        for param in (module.In_Qs, module.Out_Qs):
            param.grad = torch.zeros_like(param)
    alloc = ref.ReferenceAllocator(modules, 0.5, 0, 0, 1, 0.85, 0.85, 10)
    alloc.update_ipt()
    assert alloc.mask_to_target_ratio(80) == {"a": 0.5, "b": 0.5}
    shares = torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64)
    assert alloc.param_alloc(shares, 40, torch.tensor([10.0, 12.0, 100.0], dtype=torch.float64)).tolist() == [
        10,
        12,
        18,
    ]
