"""SparsityAllocator: the budget schedule, the allocation, per-layer sparsities on the layers, exact resume, and the
allocated sparsities in a saved adapter."""

import io

import pytest
import torch
from checks import QkvBlock as Block
from checks import check_snella_under_fp16_autocast

import snell
from snell.allocator import AllocatorConfig, SparsityAllocator, allocate, budget, scheduled_end

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0):
    torch.manual_seed(seed)
    config = snell.SnellConfig(r=4, kernel="mixk", sparsity=0.01, target_modules=["qkv", "fc"])
    return snell.get_snell_model(Block(), config)


CONFIG = AllocatorConfig(target_sparsity=0.8, total_steps=6, init_warmup=1, final_warmup=1, mask_interval=1)


def _train(model, allocator, steps, first=0):
    """``steps`` schedule steps of two optimizer steps each, as the authors' loop runs epochs (SGD without momentum:
    no optimizer state to resume; each step's data from its own seed)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(first, first + steps):
        gen = torch.Generator().manual_seed(step)
        allocator.update(step)
        for _ in range(2):
            model(torch.randn(5, 10, generator=gen)).square().mean().backward()
            opt.step()
            allocator.accumulate()
            opt.zero_grad()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_sparsity": 1.0}, r"target_sparsity must be in \[0, 1\), got 1.0"),
        ({"total_steps": 0}, "total_steps must be an integer >= 1, got 0"),
        ({"mask_interval": 0}, "mask_interval must be an integer >= 1, got 0"),
        ({"init_warmup": 3, "final_warmup": 3}, "init_warmup \\+ final_warmup must be below total_steps"),
        ({"beta1": 1.0}, r"beta1 must be in \(0, 1\), got 1.0"),
    ],
)
def test_bad_config_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AllocatorConfig(**{"target_sparsity": 0.5, "total_steps": 6, **kwargs})


def test_budget_stays_then_falls_on_a_cube_then_holds_the_target():
    config = AllocatorConfig(target_sparsity=0.5, total_steps=10, init_warmup=2, final_warmup=2, mask_interval=3)
    assert budget(config, 1000.0, 100.0, 2) == (1000.0, False)
    assert budget(config, 1000.0, 100.0, 4) == (float(int(100 + 900 * (1 - 2 / 6) ** 3)), False)
    assert budget(config, 1000.0, 100.0, 6) == (float(int(100 + 900 * (1 - 4 / 6) ** 3)), True)
    assert budget(config, 1000.0, 100.0, 9) == (100.0, True)


def test_the_schedules_end_is_where_its_last_reallocation_leaves_it():
    def end(**kwargs):
        return scheduled_end(AllocatorConfig(target_sparsity=0.8, **kwargs), init_sparsity=0.0)

    assert end(total_steps=4, final_warmup=1) == pytest.approx(0.8, abs=1e-12)
    assert end(total_steps=2) == pytest.approx(1 - (0.2 + 0.8 / 8), abs=1e-12)  # step 1 of 0..1: (1/2)³ short
    assert end(total_steps=1) is None and end(total_steps=3, mask_interval=5) is None


def test_allocation_follows_the_scores_caps_at_size_and_hands_the_rest_to_the_others():
    sizes = torch.tensor([10.0, 100.0, 100.0], dtype=torch.float64)
    counts = allocate(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64), 100.0, sizes)
    assert counts.tolist() == [10.0, 45.0, 45.0]
    assert allocate(torch.zeros(3, dtype=torch.float64), 30.0, sizes).tolist() == [10.0, 10.0, 10.0]


def test_the_rest_handed_out_again_is_capped_at_each_size_too():
    """The first round caps unit 0 at 100 and leaves 490 to share: unit 1's share of it would exceed its size."""
    sizes = torch.tensor([100.0, 100.0, 1000.0], dtype=torch.float64)
    counts = allocate(torch.tensor([0.98, 0.01, 0.01], dtype=torch.float64), 600.0, sizes)
    assert (counts <= sizes).all() and counts.sum() == 600


def test_sensitivity_emas_follow_the_authors_update_and_count_a_missing_gradient_as_zero():
    """I = |θ ⊙ ∇θ|, Ī ← β1·Ī + (1 − β1)·I, then Ū ← β2·Ū + (1 − β2)·|I − Ī| with the new Ī (the authors'
    update_ipt); a step where a factor got no gradient counts as I = 0, so both averages still decay."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12))
    snell.get_snell_model(model, snell.SnellConfig(r=4, kernel="mixk", sparsity=0.5, target_modules=["0"]))
    allocator = SparsityAllocator(model, AllocatorConfig(target_sparsity=0.8, total_steps=10, beta1=0.85, beta2=0.7))
    a = model[0].snell_A
    a.grad = torch.randn_like(a)
    current = (a.detach().double() * a.grad.double()).abs()
    allocator.accumulate()
    average, uncertainty = 0.15 * current, 0.3 * (current - 0.15 * current).abs()
    torch.testing.assert_close(allocator.sensitivity["0.snell_A"], average)
    torch.testing.assert_close(allocator.uncertainty["0.snell_A"], uncertainty)
    a.grad = None
    allocator.accumulate()
    average = 0.85 * average
    torch.testing.assert_close(allocator.sensitivity["0.snell_A"], average)
    torch.testing.assert_close(allocator.uncertainty["0.snell_A"], 0.7 * uncertainty + 0.3 * average)


def test_layers_get_their_share_of_the_budget_and_still_train():
    model = _model()
    allocator = SparsityAllocator(model, CONFIG)
    assert allocator.sparsity() == {"qkv": [0.01] * 3, "fc": [0.01]}
    _train(model, allocator, 6)
    sparsity = allocator.sparsity()
    sizes = {"qkv": 80, "fc": 144}
    kept = sum((1 - s) * sizes[name] for name, values in sparsity.items() for s in values)
    assert len(set(sparsity["qkv"])) > 1  # q, k and v compete as units of their own
    assert kept == pytest.approx(0.2 * (3 * 80 + 144), abs=4)  # the target, less what truncation drops
    assert model.qkv.snell_spec.group_sparsity == tuple(sparsity["qkv"])
    for name, layer in snell.snell_layers(model):
        for g, s in enumerate(sparsity[name]):
            survivors = int((layer.delta_weight().reshape(layer.snell_spec.grouped_shape)[g] != 0).sum())
            assert survivors == round((1 - s) * sizes[name])


def test_non_finite_gradients_count_as_zero():
    model = _model()
    allocator = SparsityAllocator(model, CONFIG)
    for _, layer in snell.snell_layers(model):
        layer.snell_A.grad = torch.full_like(layer.snell_A, float("nan"))
        layer.snell_B.grad = torch.full_like(layer.snell_B, float("inf"))
    allocator.accumulate()
    assert all(torch.equal(t, torch.zeros_like(t)) for t in allocator.sensitivity.values())
    assert torch.isfinite(allocator.scores()).all()


def test_resuming_from_the_state_dict_is_bit_exact():
    straight = _model()
    allocator = SparsityAllocator(straight, CONFIG)
    _train(straight, allocator, 6)

    resumed = _model()
    first = SparsityAllocator(resumed, CONFIG)
    _train(resumed, first, 3)
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "allocator": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    fresh = _model(seed=9)
    fresh.load_state_dict(saved["model"])
    second = SparsityAllocator(fresh, CONFIG)
    second.load_state_dict(saved["allocator"])
    _train(fresh, second, 3, first=3)

    assert second.sparsity() == allocator.sparsity()
    for kind in ("sensitivity", "uncertainty"):
        for key, value in getattr(allocator, kind).items():
            assert torch.equal(getattr(second, kind)[key], value)
    for (_, mine), (_, theirs) in zip(snell.snell_layers(fresh), snell.snell_layers(straight), strict=True):
        assert torch.equal(mine.delta_weight(), theirs.delta_weight())


def test_a_state_for_another_model_or_config_changes_nothing():
    model = _model()
    allocator = SparsityAllocator(model, CONFIG)
    state = allocator.state_dict()
    other = SparsityAllocator(model, AllocatorConfig(target_sparsity=0.5, total_steps=6))
    with pytest.raises(ValueError, match="saved with"):
        other.load_state_dict(state)
    state["sparsity"]["fc"] = [1.5]
    with pytest.raises(ValueError, match="sparsities do not match"):
        allocator.load_state_dict(state)
    assert allocator.sparsity()["fc"] == [0.01]


def test_a_loaded_adapter_rebuilds_the_allocated_model(tmp_path):
    model = _model()
    allocator = SparsityAllocator(model, CONFIG)
    _train(model, allocator, 6)
    snell.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    base = Block()  # same seed as _model: the same frozen weights
    loaded = snell.load_adapter(base, tmp_path)
    for (_, mine), (_, theirs) in zip(snell.snell_layers(loaded), snell.snell_layers(model), strict=True):
        assert mine.snell_spec == theirs.snell_spec
        assert torch.equal(mine.delta_weight(), theirs.delta_weight())
    x = torch.randn(3, 10)
    assert torch.equal(loaded(x), model(x))


def test_a_model_without_snell_layers_is_refused():
    with pytest.raises(ValueError, match="has no SNELL layers"):
        SparsityAllocator(Block(), CONFIG)


def test_set_sparsity_goes_back_to_a_selected_allocation_and_refuses_a_mismatch():
    """What a run does when it keeps an earlier epoch's tensors: the sparsities of that epoch come back with them."""
    model = _model()
    allocator = SparsityAllocator(model, CONFIG)
    assert allocator.kept_ratio() == pytest.approx(0.99, rel=1e-12)  # every unit starts at s0 = 0.01
    _train(model, allocator, 3)
    selected = allocator.sparsity()
    _train(model, allocator, 3, first=3)
    assert allocator.sparsity() != selected
    assert allocator.kept_ratio() == pytest.approx(0.2, abs=4 / (3 * 80 + 144))  # truncation drops < 1 per unit
    allocator.set_sparsity(selected)
    assert allocator.sparsity() == selected
    assert model.fc.snell_spec.sparsity_of(0) == selected["fc"][0]
    with pytest.raises(ValueError, match="do not match"):
        allocator.set_sparsity({"fc": [0.5]})
    assert allocator.sparsity() == selected


def test_snella_steps_under_fp16_autocast_and_a_grad_scaler():
    # The GPU check runs the same on the device, where the averages live on the GPU and the counts on the host.
    check_snella_under_fp16_autocast()


def test_the_allocator_leaves_merged_layers_alone():
    """Unmerging subtracts the ΔWˢ of the spec at that time: a sparsity changed while merged left W0 changed."""
    model = _model()
    allocator = SparsityAllocator(model, CONFIG)
    _train(model, allocator, 3)
    state, before = allocator.state_dict(), allocator.sparsity()
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith(".weight")}
    snell.merge_adapters(model.eval())
    for change in (lambda: allocator.update(3), lambda: allocator.set_sparsity(state["sparsity"])):
        with pytest.raises(ValueError, match=r"adapted layers \(e\.g\. '\w+'\) are merged into their weights"):
            change()
    with pytest.raises(ValueError, match="merged into their weights"):
        allocator.load_state_dict(state)
    assert allocator.sparsity() == before
    snell.unmerge_adapters(model)
    for name, p in model.named_parameters():
        if name in weights:  # W0 + ΔWˢ rounded once, then − ΔWˢ: within a float32 ulp of W0's entries and ΔWˢ's
            torch.testing.assert_close(p, weights[name], rtol=0, atol=4 * 2**-24 * (weights[name].abs().max() + 1))
    assert allocator.update(3) is not None  # unmerged, the schedule goes on
