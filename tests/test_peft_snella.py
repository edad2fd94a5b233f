"""SNELLA through peft: ``SnellPeftConfig(kernel="mixk")`` trains and saves each adapter's (α, γ, β), the allocator
drives one adapter of a peft model and its sparsities travel in the adapter config, and the Trainer callback steps
the allocator at the right points of transformers' loop. Tiny models, a few steps each.

Comparisons are exact where both sides run the same arithmetic on the same inputs in this process (a reloaded
adapter against the trained one; a peft adapter against the core layer with the same tensors)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import snell
from snell.allocator import AllocatorConfig
from snell.layers import kernel_coefficients

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from snell.integrations.peft import SnellPeftConfig, SnellPeftLayer, snella_allocator  # noqa: E402
from snell.integrations.transformers import SnellaCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """A fused qkv projection (three adapter groups) and an MLP layer, as in a ViT block."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(48 + 32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.qkv(x)), torch.relu(self.fc(x))], -1))


CONFIG = dict(r=4, kernel="mixk", sparsity=0.01, target_modules=["qkv", "fc"], modules_to_save=["head"])
SCHEDULE = AllocatorConfig(target_sparsity=0.6, total_steps=4, mask_interval=1)


def _peft_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = Block()
    torch.manual_seed(seed + 1)
    return peft.get_peft_model(base, SnellPeftConfig(**CONFIG))


def _train(model: nn.Module, allocator, epochs: int = 4) -> None:
    """The authors' loop: update(epoch) before each epoch, accumulate() after each optimizer step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for epoch in range(epochs):
        allocator.update(epoch)
        gen = torch.Generator().manual_seed(epoch)
        for _ in range(3):
            x = torch.randn(8, 16, generator=gen)
            nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,), generator=gen)).backward()
            opt.step()
            allocator.accumulate()
            opt.zero_grad()


def test_mixk_adapters_carry_trained_mix_scalars_as_the_core_layer_does():
    model = _peft_model()
    layer = model.base_model.model.qkv
    assert isinstance(layer, SnellPeftLayer)
    mix = layer.snell_mix["default"]
    assert mix.requires_grad and mix.shape == (3, 3)  # one (α, γ, β) per q, k and v
    assert torch.equal(mix, torch.tensor([[1.0, 1.0, 0.0]] * 3))  # the authors' init
    # The same tensors in a core layer compute the same ΔW (one implementation of the kernel).
    torch.manual_seed(0)
    core = snell.get_snell_model(Block(), snell.SnellConfig(**CONFIG))
    with torch.no_grad():
        core.qkv.snell_A.copy_(layer.snell_A["default"])
        core.qkv.snell_B.copy_(layer.snell_B["default"])
        core.qkv.snell_mix.copy_(mix)
    assert torch.equal(layer.delta_weight("default"), core.qkv.delta_weight())
    coefficients = layer.kernel_coefficients("default")
    assert torch.equal(coefficients, kernel_coefficients(layer.snell_coefficients["default"], mix))


def test_allocated_peft_adapter_saves_and_reloads_the_trained_model(tmp_path):
    model = _peft_model()
    allocator = snella_allocator(model, SCHEDULE)
    assert set(allocator.slots) == {"qkv", "fc"}  # named as in the base model, as peft injected them
    _train(model, allocator)
    sparsity = allocator.sparsity()
    assert len({s for values in sparsity.values() for s in values}) > 1  # the layers competed
    assert model.peft_config["default"].layer_sparsity == sparsity  # recorded as it went
    mixes = {n: p.detach().clone() for n, p in model.named_parameters() if "snell_mix" in n}
    assert mixes and all(not torch.equal(m, torch.tensor([[1.0, 1.0, 0.0]]).expand_as(m)) for m in mixes.values())

    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["layer_sparsity"] == sparsity and saved["kernel"] == "mixk"
    torch.manual_seed(0)
    reloaded = peft.PeftModel.from_pretrained(Block(), str(tmp_path))
    for name in ("qkv", "fc"):
        mine, theirs = reloaded.base_model.model.get_submodule(name), model.base_model.model.get_submodule(name)
        assert mine.snell_specs["default"] == theirs.snell_specs["default"]
        assert torch.equal(mine.snell_mix["default"], theirs.snell_mix["default"])
    x = torch.randn(5, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_an_allocator_needs_a_snell_adapter_of_that_name():
    model = _peft_model()
    with pytest.raises(ValueError, match="no SNELL peft adapter named 'other'"):
        snella_allocator(model, SCHEDULE, adapter_name="other")


def _trainer(output_dir, model, callback, **more) -> transformers.Trainer:
    more = {"save_strategy": "no", **more}
    generator = torch.Generator().manual_seed(0)
    rows = [{"x": torch.randn(16, generator=generator), "labels": int(i % 3)} for i in range(12)]

    class Wrapped(nn.Module):
        """Trainer hands batches over as keyword arguments and wants a loss back."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
            return {"loss": nn.functional.cross_entropy(self.inner(x), labels)}

    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        **more,
    )
    evaluated = rows if args.eval_strategy != "no" else None  # the training rows, for load_best_model_at_end
    return transformers.Trainer(
        model=Wrapped(model), args=args, train_dataset=rows, eval_dataset=evaluated, callbacks=[callback]
    )


def test_trainer_callback_reads_each_steps_gradient_before_zero_grad_and_updates_per_epoch(tmp_path, monkeypatch):
    """transformers fires on_optimizer_step after optimizer.step() and before model.zero_grad(): the callback must
    see the step's gradients there, once per optimizer step (gradient accumulation: once per 2 batches), and step the
    schedule with the epoch at each epoch's beginning."""
    model = _peft_model()
    allocator = snella_allocator(model, AllocatorConfig(target_sparsity=0.6, total_steps=3))
    calls: list[tuple[str, object]] = []
    accumulate, update = allocator.accumulate, allocator.update

    def watched_accumulate() -> None:
        grads = [slot.factor(f).grad for slot in allocator.slots.values() for f in ("snell_A", "snell_B")]
        calls.append(("accumulate", all(g is not None and bool(g.abs().sum() > 0) for g in grads)))
        accumulate()

    def watched_update(step: int):
        calls.append(("update", step))
        return update(step)

    monkeypatch.setattr(allocator, "accumulate", watched_accumulate)
    monkeypatch.setattr(allocator, "update", watched_update)
    trainer = _trainer(
        tmp_path, model, SnellaCallback(allocator), num_train_epochs=3, gradient_accumulation_steps=2, max_grad_norm=0
    )
    trainer.train()
    # 12 rows / batch 4 = 3 batches per epoch; accumulating 2, an optimizer step after batches 2 and 3.
    per_epoch = [("accumulate", True)] * 2
    assert calls == [("update", 0), *per_epoch, ("update", 1), *per_epoch, ("update", 2), *per_epoch]
    assert model.peft_config["default"].layer_sparsity == allocator.sparsity()


def test_trainer_callback_warns_that_clipping_changes_the_gradients_it_reads(tmp_path):
    model = _peft_model()
    allocator = snella_allocator(model, AllocatorConfig(target_sparsity=0.6, total_steps=1))
    trainer = _trainer(tmp_path, model, SnellaCallback(allocator), num_train_epochs=1, max_grad_norm=1.0)
    with pytest.warns(UserWarning, match="max_grad_norm=1.0"):
        trainer.train()


def test_trainer_checkpoints_hold_the_allocator_and_load_restores_it(tmp_path):
    model = _peft_model()
    allocator = snella_allocator(model, AllocatorConfig(target_sparsity=0.6, total_steps=2))
    trainer = _trainer(
        tmp_path, model, SnellaCallback(allocator), num_train_epochs=3, max_grad_norm=0, save_strategy="epoch"
    )
    trainer.train()
    final = tmp_path / "checkpoint-9"  # 3 optimizer steps per epoch
    assert (final / SnellaCallback.STATE_NAME).is_file() and (
        tmp_path / "checkpoint-3" / SnellaCallback.STATE_NAME
    ).is_file()
    fresh = SnellaCallback(snella_allocator(_peft_model(seed=5), AllocatorConfig(target_sparsity=0.6, total_steps=2)))
    fresh.load(final)
    # the schedule's 2 steps were epochs 0 and 1: epoch 2, past it, re-allocated nothing
    assert fresh.last_update == 1 and fresh.allocator.sparsity() == allocator.sparsity()
    for key, value in allocator.sensitivity.items():
        assert torch.equal(fresh.allocator.sensitivity[key], value)


def test_load_best_model_at_end_brings_back_the_best_checkpoints_sparsities(tmp_path):
    """Trainer loads the best checkpoint's factors alone (peft reads no config there); the callback then sets the
    sparsities saved with that checkpoint, or the model would pair them with the last epoch's."""
    model = _peft_model()
    allocator = snella_allocator(model, AllocatorConfig(target_sparsity=0.6, total_steps=2))
    callback = SnellaCallback(allocator)
    trainer = _trainer(
        tmp_path, model, callback, num_train_epochs=2, max_grad_norm=0, save_strategy="epoch", eval_strategy="epoch",
        load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,  # the first epoch's
    )  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-3")  # 3 optimizer steps per epoch
    saved, last = (
        torch.load(f"{folder}/{SnellaCallback.STATE_NAME}", weights_only=False)["allocator"]["sparsity"]
        for folder in (best, tmp_path / "checkpoint-6")
    )
    assert saved != last  # the schedule moved on in epoch 2
    assert allocator.sparsity() == saved
    assert model.peft_config["default"].layer_sparsity == saved


@pytest.mark.parametrize("checkpoint", [3, 4], ids=["end-of-epoch-1", "inside-epoch-2"])
def test_trainer_resumed_from_a_checkpoint_ends_like_an_uninterrupted_run(checkpoint, tmp_path):
    """A checkpoint resumed in a fresh process-like setup (a new model, allocator and callback, then
    ``callback.load`` and ``train(resume_from_checkpoint=...)``) ends with the uninterrupted run's factors, mix
    scalars, sparsities and EMAs, bit for bit: the same arithmetic in the same order on one CPU. Inside epoch 2
    (step 4 of 3 per epoch), that epoch's re-allocation happened before the save and must not run again."""

    def run(folder, resume=None):
        model = _peft_model(seed=0 if resume is None else 7)  # a resumed run's own init must not matter
        callback = SnellaCallback(snella_allocator(model, AllocatorConfig(target_sparsity=0.6, total_steps=3)))
        if resume is not None:
            callback.load(resume)
        saving = {"save_strategy": "steps", "save_steps": checkpoint}
        trainer = _trainer(folder, model, callback, num_train_epochs=3, max_grad_norm=0, **saving)
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        return model, callback.allocator

    straight, straight_allocator = run(tmp_path / "straight")
    resumed, resumed_allocator = run(tmp_path / "resumed", resume=tmp_path / "straight" / f"checkpoint-{checkpoint}")
    assert resumed_allocator.sparsity() == straight_allocator.sparsity()
    for kind in ("sensitivity", "uncertainty"):
        for key, value in getattr(straight_allocator, kind).items():
            assert torch.equal(getattr(resumed_allocator, kind)[key], value), key
    mine, theirs = dict(resumed.named_parameters()), dict(straight.named_parameters())
    assert all(torch.equal(mine[name], value) for name, value in theirs.items() if value.requires_grad)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 24)
        self.lin1 = nn.Linear(24, 24, bias=False)


_SCHEDULE = AllocatorConfig(target_sparsity=0.8, total_steps=4, init_warmup=0, final_warmup=0, mask_interval=1)


def test_the_allocator_covers_only_the_layers_of_its_adapter() -> None:
    torch.manual_seed(0)
    model = peft.get_peft_model(_MLP(), SnellPeftConfig(r=4, kernel="mixk", target_modules=["lin0", "lin1"]))
    model.add_adapter("other", SnellPeftConfig(r=4, kernel="mixk", target_modules=["lin0"]))
    assert sorted(snella_allocator(model, _SCHEDULE, "other").sparsity()) == ["lin0"]


def test_the_allocator_refuses_to_reallocate_a_merged_peft_adapter() -> None:
    """Unmerging would subtract another ΔW than was added and leave W0 changed for good."""
    torch.manual_seed(0)
    model = peft.get_peft_model(_MLP(), SnellPeftConfig(r=4, kernel="mixk", target_modules=["lin0", "lin1"]))
    allocator = snella_allocator(model, _SCHEDULE)
    before = allocator.sparsity()
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        allocator.set_sparsity({name: [0.9] * len(values) for name, values in before.items()})
    assert allocator.sparsity() == before
