"""`snell train --method snella` end to end on a small VTAB-format folder with a tiny random ViT: its options, the
allocator's place in the loop (once per optimizer step, on the whole step's gradients), the per-layer sparsities in
metrics.jsonl, the plot and the adapter, `snell eval` / `snell merge` of the result, and an exact resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from cli_cases import (
    ENV,
    PNG,
    TINY_VIT,
    assert_same_adapter,
    drawn,
    merged_and_adapted,
    script_scores,
    stop_after_first_checkpoint,
)
from safetensors.torch import load_file

import snell
from snell.allocator import SparsityAllocator
from snell.cli import _build_parser, main
from snell.train import plots
from snell.train.config import TrainConfig, UserError
from snell.train.evaluate import restore
from snell.train.flags import config_from_args
from snell.train.loop import train
from snell.train.optim import param_groups
from snell.train.recipes import known_recipes, resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = [
    "--model", "vit_tiny_patch16_224", "--model-kwargs", TINY_VIT, "--rank", "4", "--method", "snella",
    "--target-sparsity", "0.5", "--batch-size", "16", "--eval-batch-size", "32", "--lr", "5e-3",
    "--warmup-epochs", "0.5", "--no-progress",
]  # fmt: skip
#: The tiny ViT's adapted matrices: per block q, k, v and proj (64×64 each), fc1 and fc2 (256×64 each); two blocks.
UNITS = 2 * 6
ENTRIES = 2 * (4 * 64 * 64 + 2 * 256 * 64)


@pytest.fixture(scope="module")
def snella_run(vtab_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "snella"
    args = ["train", "--data", str(vtab_dir), *BASE, "--epochs", "4", "--alloc-epochs", "3", "--select-on", "val"]
    assert main([*args, "--output-dir", str(out)]) == 0
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"target_sparsity": 1.0}, r"target_sparsity \(--target-sparsity\) must lie in \[0, 1\), got 1.0"),
        ({"init_sparsity": -0.1}, r"init_sparsity \(--init-sparsity\) must lie in \[0, 1\), got -0.1"),
        ({"alloc_beta1": 1.0}, r"alloc_beta1 \(--alloc-beta1\) must lie in \(0, 1\), got 1.0"),
        ({"alloc_beta2": 0}, r"alloc_beta2 \(--alloc-beta2\) must lie in \(0, 1\), got 0"),
        ({"alloc_mask_interval": 0}, r"alloc_mask_interval \(--alloc-mask-interval\) must be an integer >= 1, got 0"),
        ({"alloc_init_warmup": -1}, r"alloc_init_warmup \(--alloc-init-warmup\) must be an integer >= 0, got -1"),
        ({"alloc_epochs": 0}, r"alloc_epochs \(--alloc-epochs\) must be a positive integer \(or unset\), got 0"),
        ({"alloc_epochs": 11}, r"alloc_epochs \(--alloc-epochs\) must be in \[1, epochs=10\] .*got 11"),
        ({"alloc_init_warmup": 5, "alloc_final_warmup": 5}, "must be below the schedule's 10 epochs, got 5 \\+ 5"),
        ({"r": 9}, r"r \(--rank\) must be divisible by num_pieces for mixk, got r=9, num_pieces=2"),
        ({"kernel": "rbf"}, r"kernel \(--kernel\) must be mixk or unset, got 'rbf'"),
    ],
)
def test_allocation_options_that_cannot_work_name_the_value_and_the_range(values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        TrainConfig(method="snella", **{"epochs": 10, **values})


def test_the_sparsity_flag_is_refused_with_snella_and_a_recipes_sparsity_is_not() -> None:
    """snella reads --init-sparsity and --target-sparsity. The check compared the value with the default, so `-s 0.9`
    passed silently while `--recipe vtab/dtd` (s = 0.995, no flag given) was refused."""
    parse = _build_parser().parse_args
    for sparsity in ("0.9", "0.5"):
        with pytest.raises(UserError, match=f"leave --sparsity out \\(got {sparsity}\\)"):
            config_from_args(parse(["train", "--method", "snella", "-s", sparsity]))
    config = config_from_args(parse(["train", "--recipe", "vtab/dtd", "--method", "snella"]))
    assert (config.method, config.sparsity, config.kernel) == ("snella", 0.995, "mixk")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs": 1}, "SNELLA's schedule of 1 epochs .* never re-allocates"),  # step 0 is the start
        ({"epochs": 3, "alloc_mask_interval": 5}, r"schedule of 3 epochs \(init warm-up 0, mask interval 5\) never"),
    ],
)
def test_a_schedule_that_never_reallocates_is_refused_when_a_run_starts(
    values: dict, message: str, tmp_path: Path
) -> None:
    """Only then: `snell eval` and `merge` read the configs of runs trained before the check existed."""
    config = TrainConfig(method="snella", data="digits", output_dir=str(tmp_path / "run"), **values)
    with pytest.raises(UserError, match=message):
        config.allocation_end()
    with pytest.raises(UserError, match=message):
        train(config)
    assert not (tmp_path / "run").exists()


def test_a_schedule_that_ends_short_of_the_target_is_named(capsys: pytest.CaptureFixture) -> None:
    """Four epochs re-allocating every second one last re-allocate at step 2 of 0..3: the kept fraction is then
    0.2 + (0.99 − 0.2)·(1 − 2/4)³ = 0.29875, sparsity 0.70125 against the target 0.8. It said nothing."""
    parse = _build_parser().parse_args
    config_from_args(parse(["train", "--method", "snella", "--epochs", "4", "--alloc-mask-interval", "2"]))
    assert capsys.readouterr().err.startswith("warning: SNELLA's schedule ends at sparsity 0.701, short of")
    for quiet in (["--epochs", "100"], ["--epochs", "4", "--alloc-final-warmup", "1"]):
        config_from_args(parse(["train", "--method", "snella", *quiet]))
        assert capsys.readouterr().err == ""


def test_snella_defaults_are_the_authors_script_values_and_its_kernel_is_mixk() -> None:
    config = resolve_config(None, {"method": "snella"})
    assert config.kernel == "mixk"  # the default kernel means snella's own
    assert (config.init_sparsity, config.target_sparsity) == (0.01, 0.8)  # VTAB cifar's init_thres, target_ratio
    assert (config.alloc_init_warmup, config.alloc_final_warmup, config.alloc_mask_interval) == (0, 0, 1)
    assert (config.alloc_beta1, config.alloc_beta2) == (0.85, 0.85)
    assert config.allocation_epochs() == config.epochs
    assert config.lr == 2e-2  # kept entries are ΔW·|ΔW| at every ratio: the sparsified-SNELL default
    assert TrainConfig(method="lora", target_sparsity=0.3).target_sparsity == 0.3  # harmless for other methods


def test_mix_scalars_are_never_weight_decayed() -> None:
    """α, γ, β sit in one (G, 3) tensor per layer; the shape rule alone would decay it as a matrix."""
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **json.loads(TINY_VIT))
    snell.get_snell_model(model, snell.SnellConfig(r=4, kernel="mixk", sparsity=0.5, modules_to_save=["head"]))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.05)
    mixes = {n for n, p in model.named_parameters() if n.endswith("snell_mix")}
    assert mixes and all(p.ndim == 2 for n, p in model.named_parameters() if n in mixes)
    assert mixes <= {names[id(p)] for p in no_decay["params"]}
    assert not mixes & {names[id(p)] for p in decay["params"]}


def test_metrics_record_the_allocation_of_every_epoch(snella_run: Path) -> None:
    """The schedule of T = 3 epochs (--alloc-epochs) is stepped before each of them: epoch 0 keeps the initial budget
    (t <= init_warmup = 0), epochs 1 and 2 re-allocate int(V1 + (V0 − V1)·(1 − t/3)³) entries, V0 = 0.99·N and
    V1 = 0.5·N. Each unit's count is floored once more after the hand-out, so at most one entry per unit is lost: the
    tolerance. Epoch 3, after the schedule, keeps epoch 2's allocation unit for unit."""
    records = [m["sparsity"] for m in _metrics(snella_run)]
    assert len(records) == 4
    assert all(s == 0.01 for groups in records[0]["layers"].values() for s in groups)
    for t, record in zip((1, 2), records[1:3], strict=True):
        kept = int(0.5 * ENTRIES + (0.99 - 0.5) * ENTRIES * (1 - t / 3) ** 3)
        assert record["overall"] == pytest.approx(1 - kept / ENTRIES, abs=UNITS / ENTRIES)
        values = [s for groups in record["layers"].values() for s in groups]
        assert len(values) == UNITS and (record["min"], record["max"]) == (min(values), max(values))
        assert record["mean"] == pytest.approx(sum(values) / UNITS, rel=1e-12)
    assert len({s for groups in records[2]["layers"].values() for s in groups}) > 1  # the layers did compete
    assert records[3] == records[2]
    assert (snella_run / "sparsity.png").read_bytes()[:8] == PNG


def test_the_sparsity_map_shows_each_matrixs_kept_ratio_by_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    # The map is titled "kept ratio": 1 − s, one row per matrix (q, k and v of a fused projection each) and one
    # column per epoch. Binary fractions, so 1 − s is exact.
    def record(epoch: int, layers: dict) -> dict:
        values = [s for groups in layers.values() for s in groups]
        return {"epoch": epoch, "sparsity": {"overall": 0.5, "min": min(values), "max": max(values), "layers": layers}}

    metrics = [record(0, {"q": [0.75], "qkv": [0.75, 0.75, 0.75]}), record(1, {"q": [1.0], "qkv": [0.5, 0.875, 0.625]})]
    figure = drawn(monkeypatch, plots.plot_sparsity, metrics)
    image = figure.axes[1].images[0].get_array().tolist()
    plots.pyplot().close(figure)
    assert image == [[0.25, 0.0], [0.25, 0.5], [0.25, 0.125], [0.25, 0.375]]


def test_the_adapter_holds_the_selected_epochs_allocation_and_eval_reproduces_it(
    snella_run: Path, capsys: pytest.CaptureFixture
) -> None:
    summary = json.loads((snella_run / "summary.json").read_text())
    selected = _metrics(snella_run)[summary["selected_epoch"] - 1]["sparsity"]["layers"]
    _, _, _, model = restore(snella_run)
    for name, layer in snell.snell_layers(model):
        assert [layer.snell_spec.sparsity_of(g) for g in range(layer.snell_spec.groups)] == selected[name]
    tensors = load_file(str(snella_run / "adapter" / "adapter_model.safetensors"))
    mixes = [value for key, value in tensors.items() if key.endswith("snell_mix")]
    assert len(mixes) == 8 and any(not torch.equal(m, torch.tensor([[1.0, 1.0, 0.0]]).expand_as(m)) for m in mixes)
    capsys.readouterr()
    assert main(["eval", str(snella_run)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] == summary["test_accuracy"]  # the same model on the same images: the same count


def test_merged_snella_model_gives_the_adapted_outputs(snella_run: Path, tmp_path: Path) -> None:
    """W0 + ΔWˢ is rounded once to float32 in either path; logits of order 1 after two blocks of 64- to 256-term
    float32 sums then differ by a few 1e-6: 1e-4 leaves a wide margin and still catches a wrong ΔW (entries ~1e-3)."""
    merged, adapted, _ = merged_and_adapted(snella_run, tmp_path / "merged")
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


def test_the_allocator_reads_each_optimizer_steps_whole_gradient_once(
    vtab_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --grad-accum 2 the factors' gradients are partial after the first micro-batch: the allocator must see
    them only after the second, once per optimizer step, before zero_grad clears them. (The head starts at zero, so
    the very first step's backbone gradients are exactly zero; every later one is not.)"""
    seen: list[tuple[bool, bool]] = []
    original = SparsityAllocator.accumulate

    def watched(self: SparsityAllocator) -> None:
        grads = [slot.factor(f).grad for slot in self.slots.values() for f in ("snell_A", "snell_B")]
        there = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        seen.append((there, there and all(bool(g.any()) for g in grads)))
        original(self)

    monkeypatch.setattr(SparsityAllocator, "accumulate", watched)
    out = tmp_path / "accum"
    args = ["train", "--data", str(vtab_dir), *BASE, "--epochs", "2", "--batch-size", "8", "--grad-accum", "2"]
    assert main([*args, "--output-dir", str(out)]) == 0
    steps = _metrics(out)[-1]["step"]
    assert steps == 2 * 8 and seen == [(True, False)] + [(True, True)] * (steps - 1)  # 128 images / 8 / 2 = 8 steps


def test_resume_ends_bit_identical_to_an_uninterrupted_run(
    vtab_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after epoch 1 (before any re-allocation), the resumed run must re-allocate at epochs 1 and 2 from the
    checkpointed EMAs exactly as the straight run does; dropout makes the RNG state part of it too."""
    args = ["train", "--data", str(vtab_dir), *BASE, "--epochs", "3", "--adapter-dropout", "0.1"]
    assert main([*args, "--output-dir", str(tmp_path / "straight")]) == 0
    stop_after_first_checkpoint([*args, "--output-dir", str(tmp_path / "cut")], monkeypatch)
    assert main([*args, "--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    assert_same_adapter(tmp_path / "straight", tmp_path / "cut")
    config = lambda run: json.loads((run / "adapter" / "adapter_config.json").read_text())  # noqa: E731
    assert config(tmp_path / "cut")["layer_sparsity"] == config(tmp_path / "straight")["layer_sparsity"] is not None
    strip = lambda run: [{k: v for k, v in m.items() if "time" not in k and "per_s" not in k} for m in _metrics(run)]  # noqa: E731
    assert strip(tmp_path / "cut") == strip(tmp_path / "straight")


def test_two_processes_allocate_like_one_that_accumulates_the_same_halves(vtab_dir: Path, tmp_path: Path) -> None:
    """DDP averages the gradients before the allocator reads them, so both ranks allocate alike, and (as for SNELL in
    tests/test_cli.py) 2 processes on half-batches do the same arithmetic as 1 process accumulating those halves:
    every tensor and every sparsity must be equal, not merely close."""
    common = ["train", "--data", str(vtab_dir), *BASE, "--epochs", "2"]
    one = subprocess.run(
        [sys.executable, "-m", "snell", *common, "--batch-size", "8", "--grad-accum", "2", "--output-dir",
         str(tmp_path / "one")], env=ENV, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*torchrun, "-m", "snell", *common, "--output-dir", str(tmp_path / "two")],
        env=ENV, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    first, second = json.loads((tmp_path / "two" / "summary.json").read_text())["rank_fingerprints"]
    assert first == second
    assert [m["sparsity"] for m in _metrics(tmp_path / "one")] == [m["sparsity"] for m in _metrics(tmp_path / "two")]
    assert_same_adapter(tmp_path / "one", tmp_path / "two")


#: (batch size, lr, weight decay, init_thres, target_ratio, val_interval) of the authors' snella32 scripts that run
#: the allocator; caltech.sh, svhn.sh (VTAB) and cars.sh (FGVC) train the dense MixK kernel without it instead.
SNELLA_SCRIPTS = {
    "vtab/cifar": (8, 1e-3, 0.05, 0.01, 0.8, 10),
    "vtab/patch_camelyon": (8, 1e-3, 5e-4, 0.01, 0.76, 10),
    "vtab/dtd": (8, 1e-3, 5e-3, 0.01, 0.93, 1),
    "vtab/oxford_flowers102": (8, 1e-3, 1e-3, 0.01, 0.4, 1),
    "vtab/oxford_iiit_pet": (16, 1e-3, 0.05, 0.01, 0.55, 1),
    "vtab/diabetic_retinopathy": (32, 1e-3, 0.05, 0.01, 0.2, 10),
    "vtab/smallnorb_ele": (32, 1e-3, 1e-3, 0.01, 0.63, 1),
    "fgvc/cub": (16, 1e-3, 0.05, 0.0, 0.3, 10),
    "fgvc/nabirds": (32, 1e-3, 5e-4, 0.0, 0.9, 10),  # 0.16 is set in the script but never passed: 0.9 runs
    "fgvc/oxford_flowers": (16, 1e-3, 1e-3, 0.0, 0.61, 10),
    "fgvc/stanford_dogs": (32, 1e-4, 5e-3, 0.0, 0.24, 10),
}


#: The snella32 scripts that pass --amp (float16 autocast and a GradScaler): their recipes set fp16.
AMP_SCRIPTS = {"vtab/cifar", "vtab/patch_camelyon", "vtab/oxford_iiit_pet"}


#: The snella32 scripts that train the dense MixK module (no sparsification, no allocator): batch, lr, weight decay.
MIXK_SCRIPTS = {
    "vtab/caltech101": (16, 1e-3, 1e-4),
    "vtab/svhn": (16, 1e-3, 1e-4),
    "fgvc/stanford_cars": (16, 1e-3, 0.05),
}


def test_each_snella_recipe_resolves_to_its_scripts_values() -> None:
    scripts = {f"snella/{task}" for task in [*SNELLA_SCRIPTS, *MIXK_SCRIPTS]}
    assert {name for name in known_recipes() if name.startswith("snella/")} == scripts
    for task, (batch, lr, wd) in MIXK_SCRIPTS.items():
        config = resolve_config(f"snella/{task}", {})
        assert (config.method, config.kernel, config.sparsity, config.sparsify_mode) == ("snell", "mixk", 0.0, "mask")
        assert (config.r, config.data_format, config.batch_size, config.lr, config.weight_decay) == (
            32,
            task[:4],
            batch,
            lr,
            wd,
        )
        assert (config.epochs, config.warmup_epochs, config.eval_every) == (100, 10, 10)
        assert (config.adapter_dropout, config.adapter_drop_path, config.drop_path_rate) == (0.1, 0.1, 0.1)
        assert config.ema_decay == (0.9999 if task.startswith("fgvc") else None)
    for task, (batch, lr, wd, init, target, every) in SNELLA_SCRIPTS.items():
        config = resolve_config(f"snella/{task}", {})
        assert config.ema_decay == (0.9999 if task.startswith("fgvc") else None), task  # train_alloc_ema.py
        assert (config.method, config.kernel, config.r, config.data_format) == ("snella", "mixk", 32, task[:4])
        assert (config.batch_size, config.lr, config.weight_decay, config.eval_every) == (batch, lr, wd, every), task
        assert (config.init_sparsity, config.target_sparsity, config.allocation_epochs()) == (init, target, 100), task
        assert (config.alloc_init_warmup, config.alloc_final_warmup, config.alloc_mask_interval) == (0, 0, 1)
        assert (config.alloc_beta1, config.alloc_beta2, config.epochs, config.warmup_epochs) == (0.85, 0.85, 100, 10)
        assert (config.adapter_dropout, config.adapter_drop_path, config.drop_path_rate) == (0.1, 0.1, 0.1)
        assert config.color_jitter == (0.4 if task.startswith("fgvc") else 0.0)
        assert config.fp16 == (task in AMP_SCRIPTS) and not config.bf16, task


def test_eval_and_merge_read_a_run_whose_schedule_a_newer_snell_would_refuse(
    snella_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A 1-epoch run trained before the never-re-allocates check still evaluates and merges: the check is about
    training, and eval and merge only read the config."""
    old = tmp_path / "old"
    shutil.copytree(snella_run, old)
    record = json.loads((old / "config.json").read_text())
    record["config"].update(epochs=1, alloc_epochs=None, output_dir=str(old))
    (old / "config.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["eval", str(old)]) == 0 and main(["merge", str(old)]) == 0
    assert (old / "merged").is_dir()


def test_a_resumed_run_saves_the_allocation_of_the_epoch_selected_before_the_interruption(
    vtab_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epoch 1 scores best (scripted), the run is cut after it, and epoch 3 re-allocates: the resumed run's adapter
    must hold epoch 1's weights with epoch 1's sparsities, not epoch 3's."""
    script_scores(monkeypatch, [0.9, 0.1, 0.1])
    out = tmp_path / "run"
    args = ["train", "--data", str(vtab_dir), *BASE, "--epochs", "3", "--select-on", "val", "--output-dir", str(out)]
    stop_after_first_checkpoint(args, monkeypatch)
    assert main([*args, "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    epochs = [json.loads(line)["sparsity"]["layers"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["selected_epoch"] == 1 and epochs[0] != epochs[-1]
    _, _, _, model = restore(out)
    held = {name: [layer.snell_spec.sparsity_of(g) for g in range(layer.snell_spec.groups)]
            for name, layer in snell.snell_layers(model)}  # fmt: skip
    assert held == epochs[0]
