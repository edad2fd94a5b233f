"""SNELLA's mixed kernel in the layers: trained (α, γ, β) per adapted matrix, saved and loaded with the adapter,
per-group sparsities, and per-layer sparsities in adapter files (the fused CPU kernels' mixk: test_fused_cpu_mixk)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from checks import QkvBlock as Block
from checks import assert_matches_naive, dense_update, make_inputs, make_spec, naive_forward

import snell
from snell.function import FusedSnell
from snell.spec import with_sparsities

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0, **config):
    torch.manual_seed(seed)
    options = {"r": 4, "kernel": "mixk", "sparsity": 0.5, "target_modules": ["qkv", "fc"], **config}
    return snell.get_snell_model(Block(), snell.SnellConfig(**options))


def test_mix_scalars_are_one_trained_triple_per_matrix_initialised_like_the_authors():
    model = _model()
    assert model.qkv.snell_mix.shape == (3, 3) and model.fc.snell_mix.shape == (1, 3)
    assert torch.equal(model.qkv.snell_mix, torch.tensor([[1.0, 1.0, 0.0]] * 3))
    assert model.qkv.snell_mix.requires_grad and not model.qkv.snell_coefficients.requires_grad
    assert torch.equal(model.qkv.snell_coefficients, torch.tensor([0.1, -0.1]))
    model(torch.randn(7, 10)).square().sum().backward()
    for layer in (model.qkv, model.fc):
        assert torch.isfinite(layer.snell_mix.grad).all() and layer.snell_mix.grad.abs().sum() > 0


def test_other_kernels_have_no_mix_scalars():
    model = _model(kernel="piecewise_linear")
    assert model.fc.snell_mix is None
    assert not any("snell_mix" in name for name, _ in model.named_parameters())


def _branch_by_group(spec, inputs):
    """The adapter part of FusedSnell's output per group, and the inputs' leaves (for their gradients)."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    x, weight, bias = leaves[:3]
    branch = FusedSnell.apply(*leaves, spec) - F.linear(x, weight, bias)
    rows = spec.grouped_shape[1]
    return [branch[..., g * rows : (g + 1) * rows] for g in range(spec.groups)], leaves


def _naive_group(spec, group, x, a, b, coef, sparsity):
    """The naive formula for adapter group ``group`` alone (no base weight)."""
    rows, n = spec.grouped_shape[1:]
    alone = dataclasses.replace(spec, groups=1, weight_shape=(rows, n), sparsity=sparsity, group_sparsity=())
    zeros = torch.zeros(rows, n, dtype=x.dtype), torch.zeros(rows, dtype=x.dtype)
    return naive_forward(alone, x, *zeros, a[group], b[group], coef)


@pytest.mark.parametrize("groups", [1, 3])
def test_mixk_matches_the_naive_formula(groups):
    spec = make_spec(kernel="mixk", groups=groups, shape=(3 * groups, 5))
    x, weight, bias, a, b, coef = make_inputs(spec)
    assert_matches_naive(spec, [x, weight, bias, a, b, coef * 1.1])


def test_per_group_mix_scalars_match_the_naive_formula():
    # The layers pass (G, P + 3) coefficients: one (α, γ, β) row per group.
    spec = make_spec(kernel="mixk", groups=3, shape=(9, 5))
    x, weight, bias, a, b, coef = make_inputs(spec)
    per_group = torch.stack([coef * (1 + 0.2 * g) for g in range(3)])
    branches, leaves = _branch_by_group(spec, [x, weight, bias, a, b, per_group])
    for g, branch in enumerate(branches):
        torch.testing.assert_close(branch, _naive_group(spec, g, x, a, b, per_group[g], spec.sparsity))
    sum(branch.square().sum() for branch in branches).backward()
    assert torch.isfinite(leaves[5].grad).all() and (leaves[5].grad[:, 2:] != 0).all()


@pytest.mark.parametrize("sparsities", [(0.2, 0.5, 0.9), (0.0, 1.0, 0.5)])
def test_per_group_sparsities_match_the_naive_formula(sparsities):
    spec = with_sparsities(make_spec(shape=(9, 5), groups=3), sparsities)
    x, weight, bias, a, b, coef = make_inputs(spec)
    branches, _ = _branch_by_group(spec, [x, weight, bias, a, b, coef])
    for g, branch in enumerate(branches):
        torch.testing.assert_close(branch, _naive_group(spec, g, x, a, b, coef, sparsities[g]))


def test_with_sparsities_names_the_expected_count():
    with pytest.raises(ValueError, match=r"3 adapter groups takes 3 sparsities, got \[0.5\]"):
        with_sparsities(make_spec(shape=(9, 5), groups=3), [0.5])
    assert with_sparsities(make_spec(shape=(9, 5), groups=3), [0.4] * 3).group_sparsity == ()


def test_mixk_at_sparsity_zero_still_scales_by_the_magnitude():
    # SNELLA's module sparsifies at every ratio: ΔW·|ΔW| everywhere, not the dense ΔW SNELL's s = 0 gives.
    model = _model(sparsity=0.0)
    layer = model.fc
    dense = dense_update(layer)[0]
    torch.testing.assert_close(layer.delta_weight(), dense * dense.abs())


def test_mixk_stays_finite_where_d_over_gamma_leaves_floats_exp_range(monkeypatch):
    """softmax(D/γ) is max-subtracted: with γ = 1e-4 and D of order 1, exp(D/γ) alone overflows float32."""
    monkeypatch.setenv("SNELL_KERNELS", "torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 24))
    config = snell.SnellConfig(
        r=8, kernel="mixk", sparsity=0.5, target_modules=["0"], coefficients=[0.1, -0.1, 1.0, 1e-4, 0.0]
    )
    layer = snell.get_snell_model(model, config)[0]
    with torch.no_grad():
        layer.snell_A.mul_(10.0)
        layer.snell_B.mul_(10.0)
    model(torch.randn(4, 32)).sum().backward()
    assert torch.isfinite(layer.delta_weight()).all()
    assert torch.isfinite(layer.snell_A.grad).all() and torch.isfinite(layer.snell_B.grad).all()


def test_mix_scalars_and_layer_sparsities_round_trip_through_an_adapter(tmp_path):
    model = _model(seed=1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        model(torch.randn(5, 10)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    # one group at the config's own 0.5: a layer is recorded when any group differs, not only when all do
    model.qkv.snell_spec = with_sparsities(model.qkv.snell_spec, [0.5, 0.6, 0.95])
    model.fc.snell_spec = with_sparsities(model.fc.snell_spec, [0.8])
    assert not torch.equal(model.qkv.snell_mix, torch.tensor([[1.0, 1.0, 0.0]] * 3))
    snell.save_adapter(model, tmp_path)
    config = snell.SnellConfig.from_json((tmp_path / "adapter_config.json").read_text())
    assert config.layer_sparsity == {"qkv": [0.5, 0.6, 0.95], "fc": [0.8]}
    torch.manual_seed(5)
    loaded = snell.load_adapter(Block(), tmp_path)
    loaded.load_state_dict({k: v for k, v in model.state_dict().items() if "snell" not in k}, strict=False)
    for name in ("qkv", "fc"):
        mine, theirs = getattr(loaded, name), getattr(model, name)
        assert mine.snell_spec == theirs.snell_spec
        assert torch.equal(mine.snell_mix, theirs.snell_mix)
        assert torch.equal(mine.delta_weight(), theirs.delta_weight())
    x = torch.randn(3, 10)
    assert torch.equal(loaded(x), model(x))


def test_a_plain_adapter_records_no_layer_sparsity(tmp_path):
    snell.save_adapter(_model(kernel="piecewise_linear"), tmp_path)
    assert snell.SnellConfig.from_json((tmp_path / "adapter_config.json").read_text()).layer_sparsity is None


@pytest.mark.parametrize(
    "value, match",
    [({"fc": [1.5]}, r"layer_sparsity\['fc'\] must be a list of sparsities in \[0, 1\]"), ([0.5], "must be a dict")],
)
def test_bad_layer_sparsity_is_refused_naming_it(value, match):
    with pytest.raises(ValueError, match=match):
        snell.SnellConfig(layer_sparsity=value)


def test_layer_sparsity_with_the_wrong_group_count_is_refused_before_injection():
    with pytest.raises(ValueError, match=r"layer_sparsity\['qkv'\]"):
        _model(layer_sparsity={"qkv": [0.5, 0.5]})


def test_mixk_coefficients_count_is_checked():
    with pytest.raises(ValueError, match="kernel 'mixk' takes 5 coefficients"):
        snell.SnellConfig(kernel="mixk", coefficients=[0.1, -0.1])
