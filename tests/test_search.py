"""snell search: grid, val-only selection, resumable table, early stopping, retrain and plot.

Fast: a tiny random-weight timm ViT on scikit-learn's digits (800/200/797), one thread, one or two epochs.
"""

import argparse
import copy
import dataclasses
import inspect
import json
import math
from concurrent.futures import Future
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from snell.train import search as S
from snell.train import trials as T
from snell.train.config import TrainConfig, UserError


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a shared 2-core machine two OpenMP threads per process are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**changes) -> TrainConfig:
    values = dict(
        data="digits",
        model="test_vit",
        model_kwargs={"img_size": 16, "patch_size": 4},
        epochs=1,
        batch_size=100,
        eval_batch_size=400,
        warmup_epochs=0,
        lr=1e-2,
        progress=False,
    )
    return TrainConfig(**{**values, **changes})


def fake_record(trial: T.Trial, val: float, test: float | None = None) -> dict:
    record = {"key": trial.key, "params": trial.params, "fingerprint": trial.fingerprint, "status": "finished"}
    record.update(
        options=T.fingerprint_options(trial.config),
        val_curve={"1": val},
        val_accuracy=val,
        epochs_trained=1,
        wall_time_s=0.0,
    )
    if trial.final:
        record["test_accuracy"] = test
    return record


def test_grid_expands_to_every_combination_with_val_selection(tmp_path):
    base = tiny_config(lr=1e-3, r=8, seed=3)
    trials = S.expand_grid(base, S.Grid(sparsity=(0.0, 0.9), lr=(1e-3, 1e-2)), tmp_path)
    assert [t.key for t in trials] == ["s=0,lr=0.001,r=8", "s=0,lr=0.01,r=8", "s=0.9,lr=0.001,r=8", "s=0.9,lr=0.01,r=8"]
    for trial in trials:
        cfg = trial.config
        assert (cfg.sparsity, cfg.lr, cfg.r) == (trial.params["sparsity"], trial.params["lr"], trial.params["r"])
        assert cfg.select_on == "val" and cfg.seed == 3 and cfg.epochs == base.epochs
        assert cfg.output_dir == str(tmp_path / "trials" / trial.key)
        assert trial.table == tmp_path / S.TRIALS_FILE
    assert len({t.fingerprint for t in trials}) == 1 and not any(t.final for t in trials)
    assert [t.key for t in S.expand_grid(tiny_config(method="lora"), S.Grid(lr=(1e-3,)), tmp_path)] == ["lr=0.001,r=8"]
    assert [t.params["r"] for t in S.expand_grid(base, S.Grid(sparsity=(0.5,), r=(4, 8)), tmp_path)] == [4, 8]
    with pytest.raises(UserError, match="repeats"):
        S.Grid(sparsity=(0.5, 0.5)).points(base)


def test_snella_grid_sets_the_target_sparsity_and_keeps_the_allocators_start(tmp_path):
    base = tiny_config(method="snella", init_sparsity=0.05, epochs=2)
    trials = S.expand_grid(base, S.Grid(sparsity=(0.5, 0.9), lr=(1e-2,)), tmp_path)
    assert [t.key for t in trials] == ["target=0.5,lr=0.01,r=8", "target=0.9,lr=0.01,r=8"]
    for trial in trials:
        cfg = trial.config
        assert cfg.target_sparsity == trial.params["sparsity"]
        assert (cfg.sparsity, cfg.init_sparsity) == (base.sparsity, 0.05)
    assert len({t.fingerprint for t in trials}) == 1
    best = {**fake_record(trials[1], 0.5), "params": trials[1].params}
    final = S.final_trial(base, best, tmp_path / "final", seed=1)
    assert (final.config.target_sparsity, final.config.seed, final.key) == (0.9, 1, "target=0.9,lr=0.01,r=8,seed=1")


def test_an_option_at_its_default_leaves_the_fingerprint_alone(monkeypatch):
    config = tiny_config()
    before = T.fingerprint(config)
    assert T.fingerprint(dataclasses.replace(config, fp16=True)) != before  # a changed option is a different search
    # An option a later snell adds, at the default that keeps the old behaviour, must not orphan the tables of
    # searches run before it.
    to_dict = TrainConfig.to_dict
    monkeypatch.setattr(TrainConfig, "to_dict", lambda self: {**to_dict(self), "added_later": False})
    assert T.fingerprint(config) == before


def test_every_option_but_the_grid_and_the_cosmetic_ones_is_in_the_fingerprint():
    """A rerun into the same folder with another dataset, seed, model, schedule... is another search and must be
    refused, not mixed into the table; only the options trials differ by, and those that change no result, are
    left out (trials' own folder, val selection and standard protocol are the search's)."""
    config = tiny_config()
    before = T.fingerprint(config)
    left_out = set()
    for field in dataclasses.fields(TrainConfig):
        changed = copy.copy(config)
        object.__setattr__(changed, field.name, f"another {field.name}")  # no validation: only the hash is read
        if T.fingerprint(changed) == before:
            left_out.add(field.name)
    grid = {"sparsity", "target_sparsity", "lr", "r"}
    set_by_the_search = {"output_dir", "select_on", "protocol"}
    cosmetic = {"progress", "num_workers"}
    assert left_out == grid | set_by_the_search | cosmetic


def test_winner_is_the_val_best_even_when_test_disagrees(tmp_path, monkeypatch):
    # Per grid point: (val, test if it were measured). s=0.9 is best on val, s=0.5 would be best on test.
    scores = {0.0: (0.70, 0.70), 0.5: (0.75, 0.95), 0.9: (0.80, 0.60)}
    seen_splits = []

    def fake_train(trial):
        seen_splits.append(trial.config.select_on)
        val, test = scores[trial.params["sparsity"]]
        return fake_record(trial, val, test)

    monkeypatch.setattr(T, "train_trial", fake_train)
    result = S.search(tiny_config(), S.Grid(sparsity=(0.0, 0.5, 0.9)), tmp_path, early_stop=None, verbose=False)
    assert result.best["params"]["sparsity"] == 0.9
    assert all("test_accuracy" not in r for r in result.records)  # trials carry no test number to select on
    assert seen_splits == ["val", "val", "val", "none"]  # the retrain is the only run that reports test
    assert result.final["params"]["sparsity"] == 0.9 and result.final["test_accuracy"] == 0.60
    saved = json.loads((tmp_path / S.RESULT_FILE).read_text())
    assert saved["selected"]["key"] == result.best["key"]
    few_shot = S.final_trial(tiny_config(), result.best, tmp_path / "few", seed=2, train_on_val=False)
    assert few_shot.final and few_shot.config.select_on == "val" and few_shot.config.seed == 2


def test_rerun_skips_finished_trials_after_a_crash(tmp_path, monkeypatch):
    calls = []

    def crashing(trial):
        if len(calls) == 2:
            raise RuntimeError("killed")
        calls.append(trial.key)
        return fake_record(trial, 0.5 + 0.1 * len(calls))

    monkeypatch.setattr(T, "train_trial", crashing)
    grid = S.Grid(sparsity=(0.0, 0.5, 0.9, 0.99))
    with pytest.raises(RuntimeError, match="killed"):
        S.search(tiny_config(), grid, tmp_path, retrain=False, verbose=False)
    assert [r["key"] for r in T.read_table(tmp_path / S.TRIALS_FILE)] == calls
    with open(tmp_path / S.TRIALS_FILE, "a") as table:
        table.write('{"key": "torn line of a writer killed mid-wr')  # must not break the rerun

    rerun = []
    monkeypatch.setattr(T, "train_trial", lambda trial: rerun.append(trial.key) or fake_record(trial, 0.1))
    result = S.search(tiny_config(), grid, tmp_path, retrain=False, verbose=False)
    assert rerun == ["s=0.9,lr=0.01,r=8", "s=0.99,lr=0.01,r=8"]
    assert [r["key"] for r in result.records] == [t.key for t in S.expand_grid(tiny_config(), grid, tmp_path)]
    assert len(T.read_table(tmp_path / S.TRIALS_FILE)) == 4
    with pytest.raises(UserError, match=r"other options \(epochs: saved 1 vs now 2, fp16: saved False vs now True\)"):
        S.search(tiny_config(epochs=2, fp16=True), grid, tmp_path, retrain=False, verbose=False)
    # a table written before records carried their options: named by fingerprint
    records = T.read_table(tmp_path / S.TRIALS_FILE)
    old = tmp_path / "old"
    for record in records:
        T.append_record(old / S.TRIALS_FILE, {k: v for k, v in record.items() if k != "options"})
    fp = T.fingerprint(tiny_config(epochs=2))
    with pytest.raises(UserError, match=rf"other options \(fingerprint {records[0]['fingerprint']} vs {fp}\)"):
        S.search(tiny_config(epochs=2), grid, old, retrain=False, verbose=False)


def test_early_stop_rule():
    rule = T.EarlyStop(margin=0.15, after_epoch=1)
    finished = [{1: 0.50, 2: 0.90}, {1: 0.70}]
    assert rule.should_stop(1, 0.54, finished)  # more than 0.15 below the best at epoch 1 (0.70)
    assert not rule.should_stop(1, 0.56, finished)
    assert not rule.should_stop(3, 0.01, finished)  # nobody finished was evaluated at epoch 3
    assert not rule.should_stop(1, 0.01, [])  # nothing finished yet: nothing to compare with
    assert not T.EarlyStop(margin=0.15, after_epoch=2).should_stop(1, 0.01, finished)


def test_a_real_trial_stops_after_its_first_evaluation(tmp_path):
    base = tiny_config(epochs=2)
    (trial,) = S.expand_grid(base, S.Grid(sparsity=(0.9,)), tmp_path, T.EarlyStop(margin=0.15))
    reference = {
        "key": "other",
        "params": {},
        "fingerprint": trial.fingerprint,
        "status": "finished",
        "val_curve": {"1": 1.0, "2": 1.0},
        "val_accuracy": 1.0,
    }
    T.append_record(trial.table, reference)
    (record,) = T.run_trials([trial], verbose=False)
    assert record["status"] == "stopped" and record["epochs_trained"] == 1
    assert record["options"] == T.fingerprint_options(base)  # what a refusal compares: the search's, not the point's
    assert list(record["val_curve"]) == ["1"] and 0.0 <= record["val_accuracy"] < 0.85
    assert not (tmp_path / "trials" / trial.key / "checkpoints").exists()
    with pytest.raises(UserError, match="no trial finished"):
        S.select_best([record])


def test_with_a_weight_average_trials_are_ranked_and_stopped_on_the_average(tmp_path):
    """The retrain has no evaluations, so under --ema-decay it ends on the average: the trials must be ranked (and
    stopped early) by the average's val score, not the raw model's."""
    base = tiny_config(epochs=2, ema_decay=0.9)
    (trial,) = S.expand_grid(base, S.Grid(sparsity=(0.9,)), tmp_path / "full", early_stop=None)
    (record,) = T.run_trials([trial], verbose=False)
    metrics = [json.loads(line) for line in (tmp_path / "full" / "trials" / trial.key / "metrics.jsonl").open()]
    assert any(m["ema_val_acc"] != m["val_acc"] for m in metrics)  # else this test could not tell them apart
    assert record["val_curve"] == {str(m["epoch"]): m["ema_val_acc"] for m in metrics}
    assert record["val_accuracy"] == metrics[-1]["ema_val_acc"]
    # the same trial again, against a finished one no score can reach: it stops at epoch 1 on the average's score
    (again,) = S.expand_grid(base, S.Grid(sparsity=(0.9,)), tmp_path / "stop", T.EarlyStop(margin=0.0))
    other = {"key": "other", "params": {}, "fingerprint": again.fingerprint, "status": "finished"}
    T.append_record(again.table, {**other, "val_curve": {"1": 1.01, "2": 1.01}, "val_accuracy": 1.01})
    (stopped,) = T.run_trials([again], verbose=False)
    assert stopped["status"] == "stopped" and stopped["val_curve"] == {"1": metrics[0]["ema_val_acc"]}


def test_search_retrains_the_winner_on_train_and_val_and_reports_test(tmp_path, monkeypatch):
    result = S.search(tiny_config(), S.Grid(sparsity=(0.0, 0.9)), tmp_path, early_stop=None, verbose=False)
    for record in result.records:
        assert record["status"] == "finished" and record["split_sizes"]["train"] == 800
        assert record["split_sizes"]["val"] == 200 and "test_accuracy" not in record
        metrics = (tmp_path / "trials" / record["key"] / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(m)["val_acc"] for m in metrics] == [record["val_accuracy"]]
    final = result.final
    assert final["params"] == result.best["params"] and final["split_sizes"] == {"train": 1000, "test": 797}
    assert 0.0 <= final["test_accuracy"] <= 1.0 and not math.isnan(final["test_accuracy"])
    summary = json.loads((tmp_path / "final" / final["key"] / "summary.json").read_text())
    assert summary["config"]["select_on"] == "none" and summary["test_accuracy"] == final["test_accuracy"]
    assert result.plot == tmp_path / S.PLOT_FILE and result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with monkeypatch.context() as patch:
        patch.setattr(T, "train_trial", lambda trial: pytest.fail(f"{trial.key} ran again"))
        again = S.search(tiny_config(), S.Grid(sparsity=(0.0, 0.9)), tmp_path, early_stop=None, verbose=False)
    assert again.final == final

    # a wider grid whose new point wins: its retrain gets its own folder (it resumed the first winner's and failed)
    monkeypatch.setattr(S, "select_best", lambda records: next(r for r in records if r["params"]["sparsity"] == 0.5))
    wider = S.search(tiny_config(), S.Grid(sparsity=(0.0, 0.5, 0.9)), tmp_path, early_stop=None, verbose=False)
    assert wider.final["params"]["sparsity"] == 0.5 and wider.final["key"] != final["key"]
    assert (
        json.loads((tmp_path / "final" / wider.final["key"] / "summary.json").read_text())["config"]["sparsity"] == 0.5
    )


def test_command_line_builds_the_grid(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    S.add_search_arguments(parser)
    argv = [
        "--data",
        "digits",
        "--model",
        "test_vit",
        "--output-dir",
        str(tmp_path),
        "--grid-sparsity",
        "0,0.5",
        "--grid-lr",
        "1e-3,1e-2",
        "--no-early-stop",
        "--no-retrain",
    ]
    monkeypatch.setattr(T, "train_trial", lambda trial: fake_record(trial, trial.params["lr"]))
    result = S.search_from_args(parser.parse_args(argv))
    assert len(result.records) == 4 and result.best["params"] == {"sparsity": 0.0, "lr": 0.01, "r": 8}
    assert result.final is None
    with pytest.raises(UserError, match="set by snell search"):
        S.search_from_args(parser.parse_args([*argv, "--select-on", "val"]))
    # values out of range are refused before any trial trains (s = 0 trained first, then s = 1 was refused)
    trained = []
    monkeypatch.setattr(T, "train_trial", lambda trial: trained.append(trial) or fake_record(trial, 0.5))
    out = ["--output-dir", str(tmp_path / "bad")]
    with pytest.raises(UserError, match=r"sparsity \(--sparsity\) must lie in \[0, 1\), got 1\.0"):
        S.search_from_args(parser.parse_args([*argv, *out, "--grid-sparsity", "0,1"]))
    with pytest.raises(UserError, match=r"r \(--rank\) must be divisible by num_pieces for piecewise_linear, got r=3"):
        S.search_from_args(parser.parse_args([*argv, *out, "--grid-r", "4,3"]))  # r = 4 trained, then r = 3 failed
    for margin in ("-1", "nan"):  # a negative margin stopped every trial that tied the best
        with pytest.raises(UserError, match=f"--early-stop-margin must be a finite number >= 0, got {margin}"):
            S.search_from_args(parser.parse_args([*argv, *out, "--early-stop-margin", margin]))
    assert not trained


def test_snell_search_subcommand(tmp_path, monkeypatch, capsys):
    from snell import cli

    monkeypatch.setattr(T, "train_trial", lambda trial: fake_record(trial, 1.0 - trial.params["sparsity"], 0.5))
    argv = ["search", "--data", "digits", "--output-dir", str(tmp_path), "--grid-sparsity", "0.5,0.9"]
    assert cli.main(argv) == 0
    assert "retrained on train+val: test accuracy 0.5000" in capsys.readouterr().out
    assert cli.main([*argv, "--resume"]) == 2
    assert "resumes by itself" in capsys.readouterr().err


def test_without_any_rate_each_sparsity_gets_the_methods_default() -> None:
    """`snell search` with neither --lr nor --grid-lr: s = 0 trains the dense kernel at 1e-3, s > 0 the squared
    sparsified update at 2e-2 (one base rate for both would be 20x off for one of them)."""
    grid = S.Grid(sparsity=(0.0, 0.9), lr_per_sparsity=True)
    assert [p["lr"] for p in grid.points(tiny_config(lr=None))] == [1e-3, 2e-2]
    given = S.Grid(sparsity=(0.0, 0.9), lr=(5e-3,), lr_per_sparsity=True)
    assert [p["lr"] for p in given.points(tiny_config())] == [5e-3, 5e-3]


def test_grid_flags_the_method_does_not_read_are_named_and_make_no_trials(tmp_path, monkeypatch, capsys):
    """LoRA has no sparsity and full fine-tuning no rank: --grid-sparsity 0,0.5,0.9 ran one LoRA trial without a word,
    and --grid-r 4,8 two identical full fine-tuning trials."""
    parser = argparse.ArgumentParser()
    S.add_search_arguments(parser)
    monkeypatch.setattr(T, "train_trial", lambda trial: fake_record(trial, 0.5))
    base = ["--data", "digits", "--model", "test_vit", "--no-early-stop", "--no-retrain"]
    cases = [
        (
            "lora",
            ["--grid-sparsity", "0,0.5,0.9", "--grid-r", "4,8"],
            "--grid-sparsity",
            ["lr=0.001,r=4", "lr=0.001,r=8"],
        ),
        ("full", ["--grid-r", "4,8"], "--grid-r", ["lr=0.001,r=8"]),
    ]
    for method, grid, ignored, keys in cases:
        argv = [*base, "--method", method, "--lr", "1e-3", *grid, "--output-dir", str(tmp_path / method)]
        result = S.search_from_args(parser.parse_args(argv))
        assert [r["key"] for r in result.records] == keys
        assert capsys.readouterr().err.splitlines() == [f"warning: --method {method} does not use {ignored}; ignored"]


# ------------------------------------------------------------------------------------------------------
# Gaps a mutation audit found: each test fails with the mutant named in its comment


def test_a_tie_at_a_margin_of_zero_does_not_stop_a_trial():
    assert not T.EarlyStop(margin=0.0).should_stop(1, 0.70, [{1: 0.70}])


def test_a_nan_val_accuracy_never_wins():
    records = [{"key": "a", "status": "finished", "val_accuracy": math.nan}]
    assert S.select_best([*records, {"key": "b", "status": "finished", "val_accuracy": 0.5}])["key"] == "b"


def test_a_table_line_without_a_key_is_skipped(tmp_path):
    table = tmp_path / S.TRIALS_FILE
    table.write_text('{"other": 1}\n{"key": "a", "status": "finished"}\n')
    assert [r["key"] for r in T.read_table(table)] == ["a"]


def test_a_causal_lm_without_answers_is_ranked_by_inverse_perplexity(tmp_path):
    # the runs' own score: a lower loss ranks higher, and stays comparable with early stopping's margin
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "val_loss": 0.5}\n{"epoch": 2, "val_loss": 0.25}\n')
    assert T._val_score_curve(tmp_path) == {1: math.exp(-0.5), 2: math.exp(-0.25)}


def test_a_stopped_trial_is_no_reference_for_early_stopping(tmp_path):
    """Only finished trials set the bar: a stopped one's curve ends where it went wrong, or is a fluke."""
    (trial,) = S.expand_grid(tiny_config(), S.Grid(sparsity=(0.9,)), tmp_path, T.EarlyStop(margin=0.15))
    stopped = {**fake_record(trial, 1.0), "key": "other", "status": "stopped", "val_curve": {"1": 1.0}}
    T.append_record(trial.table, stopped)
    (record,) = T.run_trials([trial], verbose=False)
    assert record["status"] == "finished"
    # and a trial never evaluates test: only the retrain of the winner does
    summary = json.loads((Path(trial.config.output_dir) / "summary.json").read_text())
    assert math.isnan(summary["test_accuracy"]) and "test not evaluated" in summary["accuracy_kind"]


def test_a_rerun_does_not_train_a_stopped_trial_again(tmp_path, monkeypatch):
    (trial,) = S.expand_grid(tiny_config(), S.Grid(sparsity=(0.9,)), tmp_path)
    T.append_record(trial.table, {**fake_record(trial, 0.1), "status": "stopped"})
    monkeypatch.setattr(T, "train_trial", lambda t: pytest.fail("the stopped trial trained again"))
    (record,) = T.run_trials([trial], verbose=False)
    assert record["status"] == "stopped"


def test_a_trial_killed_after_its_first_checkpoint_resumes_from_it(tmp_path, monkeypatch):
    from snell.train.classification import ClassificationRun

    (trial,) = S.expand_grid(tiny_config(epochs=2), S.Grid(sparsity=(0.9,)), tmp_path, early_stop=None)
    save = ClassificationRun._save_checkpoint

    def save_then_die(self, *args):
        save(self, *args)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ClassificationRun, "_save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            T.run_trials([trial], verbose=False)
    (record,) = T.run_trials([trial], verbose=False)
    assert record["status"] == "finished" and record["epochs_trained"] == 2


def test_the_tables_and_search_json_hold_every_trial_and_the_retrain(tmp_path, monkeypatch):
    def fake(trial):
        record = fake_record(trial, trial.params["sparsity"], 0.4)
        if trial.params["sparsity"] == 0.0 and not trial.final:
            record["status"] = "stopped"
        return record

    monkeypatch.setattr(T, "train_trial", fake)
    grid = S.Grid(sparsity=(0.0, 0.5))
    result = S.search(tiny_config(), grid, tmp_path, early_stop=None, verbose=False)
    keys = [t.key for t in S.expand_grid(tiny_config(), grid, tmp_path)]
    assert [r["key"] for r in T.read_table(tmp_path / S.TRIALS_FILE)] == keys  # the retrain has its own table
    assert [r["key"] for r in T.read_table(tmp_path / S.FINAL_FILE)] == [result.final["key"]]
    saved = json.loads((tmp_path / S.RESULT_FILE).read_text())
    assert saved["final"] == result.final and saved["trials"] == result.records  # the stopped trial included
    assert [r["status"] for r in result.records] == ["stopped", "finished"]


class _InlinePool:
    """ProcessPoolExecutor's interface, running each trial at once in this process."""

    made: ClassVar[list] = []

    def __init__(self, max_workers, **_):
        self.max_workers, self.threads = max_workers, []
        _InlinePool.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, trial, threads):
        self.threads.append(threads)
        future = Future()
        future.set_result(fn(trial, threads))
        return future


def test_parallel_trials_share_the_cores_and_each_sets_its_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "ProcessPoolExecutor", _InlinePool)
    monkeypatch.setattr(T, "available_cores", lambda: 4)
    monkeypatch.setattr(T, "train_trial", lambda t: {**fake_record(t, 0.5, 0.5), "threads": torch.get_num_threads()})
    _InlinePool.made.clear()
    result = S.search(tiny_config(), S.Grid(sparsity=(0.0, 0.5)), tmp_path, jobs=2, early_stop=None, verbose=False)
    (pool,) = _InlinePool.made[:1]
    assert pool.max_workers == 2 and pool.threads == [2, 2]
    assert all(r["threads"] == 2 for r in result.records)


_SEARCH = inspect.signature(S.search)  # taken before any test stands in for search()


def _search_call(monkeypatch, argv):
    """The arguments `snell search ARGV` calls search() with, by name."""
    parser = argparse.ArgumentParser()
    S.add_search_arguments(parser)
    seen = {}
    monkeypatch.setattr(S, "search", lambda *a, **k: seen.update(_SEARCH.bind(*a, **k).arguments))
    S.search_from_args(parser.parse_args(["--data", "digits", "--model", "test_vit", *argv]))
    return seen


def test_the_command_line_passes_the_margin_the_threads_and_per_sparsity_rates(monkeypatch):
    assert _search_call(monkeypatch, [])["early_stop"] == T.EarlyStop(margin=0.15, after_epoch=1)
    assert _search_call(monkeypatch, ["--early-stop-margin", "0"])["early_stop"].margin == 0.0
    assert _search_call(monkeypatch, ["--early-stop-margin", "0.3"])["early_stop"].margin == 0.3
    threads = _search_call(monkeypatch, ["--threads", "1"])
    assert threads["isolate"] is True and threads["threads"] == 1
    assert _search_call(monkeypatch, [])["grid"].lr_per_sparsity
    assert not _search_call(monkeypatch, ["--lr", "0.01"])["grid"].lr_per_sparsity


def test_the_command_line_refuses_a_protocol_zero_threads_a_fractional_rank_and_an_empty_grid(monkeypatch, capsys):
    with pytest.raises(UserError, match="set by snell search"):
        _search_call(monkeypatch, ["--protocol", "standard"])
    with pytest.raises(UserError, match="--threads must be >= 1"):
        _search_call(monkeypatch, ["--threads", "0"])
    with pytest.raises(SystemExit):
        _search_call(monkeypatch, ["--grid-r", "4.5"])
    assert "expected comma-separated integers, got '4.5'" in capsys.readouterr().err
    # `--grid-lr ,` is a grid of nothing, not "no grid": it fell back to the base rate, and at s = 0 to 2e-2
    for flag, name in (("--grid-lr", "lr"), ("--grid-r", "r")):
        call = _search_call(monkeypatch, ["--grid-sparsity", "0,0.9", flag, ","])
        with pytest.raises(UserError, match=f"the {name} grid is empty"):
            call["grid"].points(call["base"])
