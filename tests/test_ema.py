"""The moving average of the trained weights (--ema-decay): its arithmetic, its place in the training loop (scored
beside the model at every evaluation, the better one kept; the run's result without evaluations), its checkpoint
(an exact resume) and its options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_cases import TINY_VIT, assert_same_adapter, script_scores, stop_after_first_checkpoint
from torch import nn

from snell.cli import main
from snell.train.classification import ClassificationRun
from snell.train.config import TrainConfig, UserError
from snell.train.ema import WeightEma, trained_parameters
from snell.train.evaluate import restore

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = [
    "--model", "vit_tiny_patch16_224", "--model-kwargs", TINY_VIT, "--rank", "4", "--method", "snell",
    "--batch-size", "16", "--eval-batch-size", "32", "--lr", "5e-3", "--warmup-epochs", "0.5", "--no-progress",
    "--ema-decay", "0.8",
]  # fmt: skip


def _toy() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # frozen: never averaged
    return model


def test_the_average_follows_its_recurrence_on_the_trained_parameters_only() -> None:
    torch.manual_seed(0)
    model, decay = _toy(), 0.9
    ema = WeightEma(model, decay)
    assert set(ema.average) == {"0.bias", "1.weight", "1.bias"}
    expected = {name: p.detach().double().clone() for name, p in trained_parameters(model).items()}
    steps = 20
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for name, p in trained_parameters(model).items():
            expected[name] = decay * expected[name] + (1 - decay) * p.detach().double()
    # Each float32 step (a lerp: one subtraction, one product, one sum) rounds by at most ~3 u of the magnitudes
    # involved; over 20 steps that is below 60 u ≈ 4e-6 of the largest value, and a wrong weight is off by 10 %.
    for name, average in ema.average.items():
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(average.double(), expected[name], rtol=0, atol=4e-6 * scale)


def test_applied_swaps_in_the_average_and_gives_the_model_back_bit_for_bit_even_on_error() -> None:
    torch.manual_seed(1)
    model = _toy()
    ema = WeightEma(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    own = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="inside"), ema.applied(model):
        assert all(torch.equal(p, ema.average[name]) for name, p in trained_parameters(model).items())
        assert torch.equal(model[0].weight, own["0.weight"])  # frozen: untouched
        raise RuntimeError("inside")
    assert all(torch.equal(p, own[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, True, "0.9"])
def test_a_decay_outside_0_1_is_refused_by_value(decay: object) -> None:
    with pytest.raises(ValueError, match=r"ema decay must lie in \(0, 1\)"):
        WeightEma(_toy(), decay)  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"ema_decay \(--ema-decay\) must (lie in \(0, 1\)|be a number, got True)"):
        TrainConfig(ema_decay=decay)  # type: ignore[arg-type]


def test_ema_and_fsdp_are_refused_together() -> None:
    with pytest.raises(UserError, match="--ema-decay cannot be combined with --fsdp"):
        TrainConfig(ema_decay=0.99, fsdp=True)


def test_an_average_of_another_decay_or_other_tensors_is_not_loaded() -> None:
    model = _toy()
    ema = WeightEma(model, 0.9)
    before = {name: t.clone() for name, t in ema.average.items()}
    with pytest.raises(ValueError, match="does not match"):
        ema.load_state_dict({"decay": 0.5, "average": ema.state_dict()["average"]})
    short = {name: t + 1 for name, t in ema.state_dict()["average"].items() if name != "1.bias"}
    with pytest.raises(ValueError, match="does not match"):
        ema.load_state_dict({"decay": 0.9, "average": short})
    assert all(torch.equal(t, before[name]) for name, t in ema.average.items())


def test_a_model_that_trains_other_tensors_than_the_average_holds_is_refused() -> None:
    """Averaging or swapping in a subset would silently give a model that is neither the trained one nor its average."""
    model = _toy()
    ema = WeightEma(model, 0.9)
    model[1].weight.requires_grad_(False)
    for call in (ema.update, ema.copy_to):
        with pytest.raises(ValueError, match="the model's 2 trained parameters are not the 3 averaged"):
            call(model)


def test_a_bf16_models_average_is_kept_in_float32() -> None:
    """At decay 0.9999 a bf16 average (spacing 2^-7 at 1) would never move: 100 steps from 1 towards 2 must move a
    float32 one to 2 − 0.9999^100, within float32 rounding of 100 lerps (~300 u of 2 ≈ 4e-5)."""
    model = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = WeightEma(model, 0.9999)
    with torch.no_grad():
        model.weight.fill_(2.0)
    for _ in range(100):
        ema.update(model)
    assert ema.average["weight"].dtype == torch.float32
    assert float(ema.average["weight"]) == pytest.approx(2.0 - 0.9999**100, abs=4e-5)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_evaluation_scores_the_average_too_and_the_better_one_is_kept(
    vtab_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scores scripted per call (model, then average, each epoch): the average wins epoch 2, a tie at epoch 3 keeps it.
    scores = iter([0.2, 0.1, 0.3, 0.5, 0.5, 0.5])
    scored: list[dict[str, torch.Tensor]] = []

    def eval_metrics(self: ClassificationRun, loader: object, split: str) -> dict[str, float]:
        model = self.accelerator.unwrap_model(self.model)
        scored.append({name: p.detach().clone() for name, p in trained_parameters(model).items()})
        score = next(scores)
        return {"score": score, f"{split}_acc": score}

    updates = []
    update = WeightEma.update
    monkeypatch.setattr(WeightEma, "update", lambda self, model: updates.append(1) or update(self, model))
    monkeypatch.setattr(ClassificationRun, "eval_metrics", eval_metrics)
    out = tmp_path / "run"
    args = ["train", "--data", str(vtab_dir), *BASE, "--epochs", "3", "--select-on", "val", "--grad-accum", "2"]
    assert main([*args, "--output-dir", str(out)]) == 0
    metrics = _metrics(out)
    assert [(m["val_acc"], m["ema_val_acc"]) for m in metrics] == [(0.2, 0.1), (0.3, 0.5), (0.5, 0.5)]
    assert len(updates) == metrics[-1]["step"] == 3 * 3  # once per optimizer step: 96 images / 16 / 2 an epoch
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selected_epoch"] == 2 and summary["selected_weights"] == "ema"
    assert summary["best_val_accuracy"] == 0.5
    _, _, _, model = restore(out)  # the adapter holds the average as it was scored at epoch 2
    trained = dict(model.named_parameters())
    assert all(torch.equal(trained[name].detach(), tensor) for name, tensor in scored[3].items())
    assert any(not torch.equal(scored[2][name], tensor) for name, tensor in scored[3].items())


def test_without_evaluations_the_run_ends_with_the_average_and_resumes_exactly(
    vtab_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["train", "--data", str(vtab_dir), *BASE, "--epochs", "2", "--adapter-dropout", "0.1"]
    straight = tmp_path / "straight"
    assert main([*args, "--output-dir", str(straight)]) == 0
    summary = json.loads((straight / "summary.json").read_text())
    assert (summary["selected_weights"], summary["selected_epoch"]) == ("ema", 2)  # without evaluations: the last
    state = torch.load(next((straight / "checkpoints").iterdir()) / "state.pt", weights_only=False)
    _, _, _, model = restore(straight)
    trained = dict(model.named_parameters())
    average = state["ema"]["average"]
    assert any(".snell_A" in name for name in average)
    for name, tensor in average.items():  # the saved result is the average, not the last weights
        assert torch.equal(trained[name].detach().float(), tensor)
    assert any(not torch.equal(state["model"][name], average[name]) for name in average if name in state["model"])

    cut = tmp_path / "cut"
    stop_after_first_checkpoint([*args, "--output-dir", str(cut)], monkeypatch)
    assert main([*args, "--output-dir", str(cut), "--resume"]) == 0
    assert_same_adapter(straight, cut)


def test_resuming_a_run_without_an_average_with_one_is_refused_by_name(
    vtab_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--data", str(vtab_dir), *BASE[:-2], "--epochs", "2", "--output-dir", str(tmp_path / "run")]
    stop_after_first_checkpoint(args, monkeypatch)  # no --ema-decay: BASE ends with it
    capsys.readouterr()
    assert main([*args, "--resume", "--ema-decay", "0.8"]) == 2
    assert "ema_decay: saved None vs now 0.8" in capsys.readouterr().err  # before anything is loaded or trained


def test_a_checkpoint_that_lacks_the_average_its_options_need_is_refused_by_name(
    vtab_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The options match (the config check passes), but the checkpoint holds no average, as one copied from another
    run would: resuming would silently restart the average from the current weights."""
    args = ["train", "--data", str(vtab_dir), *BASE, "--epochs", "2", "--output-dir", str(tmp_path / "run")]
    stop_after_first_checkpoint(args, monkeypatch)
    (checkpoint,) = (tmp_path / "run" / "checkpoints").iterdir()
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    del state["ema"]
    torch.save(state, checkpoint / "state.pt")
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    assert f"{checkpoint}: holds no weight average" in capsys.readouterr().err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_resumed_run_remembers_that_the_average_was_selected_before_the_interruption(
    vtab_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scripted scores (model, then average, each epoch): the average of epoch 1 stays best, and the run is cut after
    epoch 1. The resumed run's summary must still say the average was selected."""
    script_scores(monkeypatch, [0.1, 0.5, 0.2, 0.3])
    args = ["train", "--data", str(vtab_dir), *BASE, "--epochs", "2", "--select-on", "val"]
    args += ["--output-dir", str(tmp_path / "run")]
    stop_after_first_checkpoint(args, monkeypatch)
    assert main([*args, "--resume"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["selected_epoch"], summary["selected_weights"]) == (1, "ema")
