"""The numbers and verdicts benchmarks.gpu and benchmarks.threshold report, pinned on the CPU: medians, units, ratios,
the `exact` column, the targets' rows, limits and verdicts, the budget, --parts and a broken part's status. Clocks and
timers are faked and inputs controlled, so every expected value is exact; a mutation audit found none of it checked."""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import threshold  # noqa: E402
from benchmarks.gpu import cli, correctness, results, selection, training, triton_check  # noqa: E402
from benchmarks.gpu import run as gpu_run  # noqa: E402
from snell import sparsify  # noqa: E402
from snell import spec as layout  # noqa: E402


@pytest.fixture(autouse=True)
def _own_rng() -> Iterator[None]:
    """The code under test reseeds torch's global generator (piecewise_delta, layer_rows): give it back as it was."""
    with torch.random.fork_rng(devices=[]):
        yield


def _clock(*ticks: float) -> Callable[[], float]:
    """A clock that reads ``ticks`` in turn (a test that reads it more often than planned fails on StopIteration)."""
    return iter(ticks).__next__


def _timings(*first: float, then: float) -> Callable[..., float]:
    """A stand-in for a timer (``timed_ms`` or ``timed``): ``first`` in call order, then always ``then``."""
    values = iter(first)
    return lambda *args, **kwargs: next(values, then)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_timers_report_the_median_of_the_repeats_in_milliseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ms column of the GPU check comes from ``timed_ms`` over ``once_ms``: one warm-up call, then the median
    of the repeats, so one slow outlier (a compile, a page fault) does not move the number a user compares; and
    on the CPU the wall clock's seconds are turned into milliseconds, the unit every column is labelled in."""
    monkeypatch.setattr(gpu_run, "time", SimpleNamespace(perf_counter=_clock(10.0, 10.25)))
    assert gpu_run.once_ms(lambda: None, "cpu") == 250.0
    monkeypatch.setattr(gpu_run, "once_ms", _timings(1.0, 2.0, 9.0, then=100.0))
    calls = []
    assert gpu_run.timed_ms(lambda: calls.append(1), "cpu", 3) == 2.0  # not the mean 4.0, nor the 100.0 after
    assert calls == [1]  # the warm-up; the timed calls went through the faked once_ms


def test_a_check_is_a_fail_row_when_it_raises_n_a_when_it_says_so_and_pass_otherwise() -> None:
    """checks.csv and the run's last line count FAIL rows: a check that raises must be a FAIL row carrying the
    error, never a PASS, and a check that answers "n/a..." (host-sync checks on a CPU) is n/a, not a failure."""
    run = gpu_run.Run("cpu", smoke=True, budget_s=0.0)
    gpu_run._record(run, "raises", lambda: 1 / 0)
    gpu_run._record(run, "not applicable", lambda: "n/a: no device")
    gpu_run._record(run, "fine", lambda: None)
    assert [(c["check"], c["status"]) for c in run.checks] == [
        ("raises", "FAIL"),
        ("not applicable", "n/a"),
        ("fine", "PASS"),
    ]
    assert [c["detail"] for c in run.checks] == ["ZeroDivisionError: division by zero", "n/a: no device", ""]


def test_cli_runs_the_parts_named_whatever_a_smoke_runs_budget_and_records_a_broken_part_as_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``main`` with three stub parts, the middle one broken: a smoke run runs every part even with no budget left
    (it is the CPU's check that nothing rotted), a part that raises is listed as ``error: ...`` in parts.csv while
    the parts after it still run, and ``--parts`` runs only the parts named and lists the others as skipped."""
    calls = []

    def works(run: gpu_run.Run) -> None:
        calls.append("works")

    def breaks(run: gpu_run.Run) -> None:
        calls.append("breaks")
        raise RuntimeError("broken part")

    monkeypatch.setattr(cli, "PARTS", (("correctness", 1, works), ("sync", 1, breaks), ("compile", 1, works)))
    monkeypatch.setattr(cli, "train_parts", lambda smoke: [])
    common = ["--smoke", "--budget-s", "0", "--commit", "test"]

    cli.main([*common, "--out", str(tmp_path / "all")])
    assert calls == ["works", "breaks", "works"]
    statuses = {row["part"]: row["status"] for row in _csv_rows(tmp_path / "all" / "parts.csv")}
    assert statuses == {"correctness": "done", "sync": "error: RuntimeError: broken part", "compile": "done"}
    assert "\nskipped: nothing\n" in capsys.readouterr().out

    calls.clear()
    cli.main([*common, "--out", str(tmp_path / "one"), "--parts", "correctness"])
    assert calls == ["works"]
    statuses = {row["part"]: row["status"] for row in _csv_rows(tmp_path / "one" / "parts.csv")}
    assert statuses == {
        "sync": "skipped: not in --parts",
        "compile": "skipped: not in --parts",
        "correctness": "done",
    }
    assert "\nskipped: sync, compile\n" in capsys.readouterr().out


def test_correctness_part_runs_the_bf16_rows_under_autocast_and_the_big_case_across_several_row_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``part_correctness`` over a stand-in for tests/checks.py that records what each check was given: the rows
    named "bf16 autocast" must run the fused function under bf16 autocast (the precision a GPU trains in), and the
    "several row blocks" row must build ΔW in blocks small enough that each group of the 900x700, 3-group matrix
    spans at least two of them, with the library's block size restored afterwards."""
    seen = []

    def matches_naive(spec: Any, inputs: list[torch.Tensor], autocast: torch.dtype | None = None) -> None:
        seen.append((spec, autocast, layout.BLOCK_ENTRIES))

    fake = SimpleNamespace(
        CASES=["case"],
        DROPOUT_CASES=[],
        spec_id=str,
        make_inputs=lambda spec, dtype=torch.float32, device="cpu", tokens=None: [],
        make_spec=lambda shape, groups, sparsity: ("big", shape, groups),
        assert_matches_naive=matches_naive,
        assert_keeps_exactly=lambda delta, sparsity: None,
        assert_selection_is_exact=lambda values, k, magnitude: None,
        check_merge_unmerge_disable_and_unload=lambda device, depth: None,
        check_save_load=lambda folder, device, depth: None,
        check_dropout_is_reproducible=lambda device, depth: None,
        check_snella_under_fp16_autocast=lambda device, depth: None,
    )
    monkeypatch.setattr(correctness, "_load_test_checks", lambda: fake)
    library_blocks = layout.BLOCK_ENTRIES
    run = gpu_run.Run("cpu", smoke=True, budget_s=0.0)
    correctness.part_correctness(run)
    assert run.checks and all(c["status"] == "PASS" for c in run.checks)
    assert [autocast for spec, autocast, _ in seen if spec == "case"] == [None, torch.bfloat16]
    ((_, (rows, columns), groups),) = [spec for spec, _, _ in seen if spec != "case"]
    (entries,) = [entries for spec, _, entries in seen if spec != "case"]
    assert entries * 2 <= rows // groups * columns
    assert library_blocks == layout.BLOCK_ENTRIES


def test_compile_part_fails_the_explain_check_of_a_forward_that_breaks_the_graph(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The compile part exists to catch a graph break on the device path: with a subject whose forward calls
    ``torch._dynamo.graph_break()``, the fp32 and bf16 explain rows must FAIL with the break count in their detail
    (the dropout row only reports it), and the fullgraph row fails too."""

    class Breaks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(48, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.linear(x)
            torch._dynamo.graph_break()
            return y + 1

    monkeypatch.setattr(correctness, "_compile_subject", lambda run, dropout: Breaks())
    run = gpu_run.Run("cpu", smoke=True, budget_s=0.0)
    correctness.part_compile(run)
    statuses = {c["check"].split(": ")[1]: c["status"] for c in run.checks}
    assert statuses == {
        "two-layer SNELL MLP forward, fp32": "FAIL",
        "two-layer SNELL MLP forward, bf16 autocast": "FAIL",
        "two-layer SNELL MLP forward, dropout 0.1 (reported)": "PASS",
        "two-layer SNELL MLP forward + backward": "FAIL",
    }
    # the break count, not a fixed number: dynamo may split a user break into more than one graph
    assert all(" graphs, " in c["detail"] and " 0 breaks" not in c["detail"] for c in run.checks[:3])


def test_selection_rows_call_only_the_k_th_value_exact_and_divide_each_time_by_the_gemms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """selection.csv's ``exact`` means bit-equal to the k-th largest |entry|, the τ a training step needs: on a ΔW of
    1 + i·1e-6 (distinct float32 values, 8 ulps apart), torch.quantile interpolates between two neighbours, within
    allclose's tolerance of the k-th value but not it, so it alone is not exact. Its ratios are a method's ms over
    one GEMM's ms (faked: fp32 GEMM 2 ms, bf16 GEMM 4 ms, every method 1 ms, so 0.5 and 0.25 exactly)."""

    def controlled_delta(m: int, n: int, device: str = "cpu") -> torch.Tensor:
        return (1.0 + torch.arange(m * n, dtype=torch.float64) * 1e-6).float().reshape(1, m, n)

    monkeypatch.setattr(selection, "piecewise_delta", controlled_delta)
    monkeypatch.setattr(selection, "timed_ms", _timings(2.0, 4.0, then=1.0))
    rows = selection.selection_rows(64, 48, "cpu", repeats=1)
    assert {r["method"]: r["exact"] for r in rows} == {
        f"library threshold ({sparsify.selection_method('cpu', 64 * 48)})": True,
        **dict.fromkeys(sparsify.SELECTION_METHODS, True),
        "torch.quantile": False,
        "sampled bracket": True,
    }
    assert {
        (r["ms"], r["gemm_fp32_ms"], r["ratio_to_gemm_fp32"], r["gemm_bf16_ms"], r["ratio_to_gemm_bf16"]) for r in rows
    } == {(1.0, 2.0, 0.5, 4.0, 0.25)}


def test_the_selection_verdicts_take_only_exact_methods_and_say_yes_only_where_the_librarys_was_fastest() -> None:
    """The verdicts a user reads ("library fastest?", the SELECTION_TABLE row) rest on ``fastest_exact``: a wrong τ is
    no candidate however fast it came back, and the verdict is "yes" where the library's method for that size was
    the fastest exact one without host reads and "NO" where another method was."""
    rows = [
        {"method": "kthvalue", "ms": 2.0, "exact": True},
        {"method": "topk", "ms": 1.0, "exact": False},
        {"method": "torch.quantile", "ms": 0.5, "exact": False},
    ]
    assert selection.fastest_exact(rows, sync_free=True)["method"] == "kthvalue"
    assert selection.fastest_exact(rows, sync_free=False)["method"] == "kthvalue"

    run = gpu_run.Run("cuda", smoke=False, budget_s=0.0)
    chosen = sparsify.selection_method("cuda", 1000)
    other = next(m for m in sparsify.SELECTION_METHODS if m != chosen)
    for shape, fastest in (("a", chosen), ("b", other)):
        for method in (chosen, other):
            ms = 1.0 if method == fastest else 2.0
            run.selection.append({"shape": shape, "numel": 1000, "method": method, "exact": True, "ms": ms})
    assert results.selection_verdicts(run) == [
        ["a", chosen, chosen, 1.0, "yes", chosen],
        ["b", chosen, other, 1.0, "NO", other],
    ]


def test_layer_rows_count_every_row_block_and_divide_the_snell_layers_time_by_the_dense_layers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """layers.csv: 100 rows of 128 in blocks of 4096 entries are 32 + 32 + 32 + 4 rows, four blocks (a partial
    block is a block), and ``ratio_to_dense`` is the SNELL layer's ms over the dense layer's (faked: dense 2 ms,
    SNELL 3 ms, so 1.5 exactly, and a SNELL layer slower than dense reads above 1)."""
    monkeypatch.setattr(selection, "timed_ms", _timings(2.0, then=3.0))
    library_blocks = layout.BLOCK_ENTRIES
    rows = selection.layer_rows(100, 128, "cpu", 4, (4096, None), repeats=1)
    assert [(r["block_entries"], r["blocks"], r["ms"], r["ratio_to_dense"]) for r in rows] == [
        (4096, 4, 3.0, 1.5),
        ("whole matrix", 1, 3.0, 1.5),
    ]
    assert library_blocks == layout.BLOCK_ENTRIES


def _target_run() -> gpu_run.Run:
    """A full run's rows: ViT-B/16 in bf16 at batch 64 (step 10/8/20/40 ms and peak 100/200/400/300 MB for SNELL-8,
    LoRA-8, full, reference-style SNELL-8) and 1.0 in every other configuration; LLaMA SNELL-8 10 ms, SNELL-32
    15 ms; the library's threshold 0.7 of a GEMM at 4096x4096 and 0.1 at 11008x4096."""
    step = {"snell8_s0.9": 10.0, "lora8": 8.0, "full": 20.0, "reference_snell8": 40.0}
    peak = {"snell8_s0.9": 100.0, "lora8": 200.0, "full": 400.0, "reference_snell8": 300.0}
    run = gpu_run.Run("cuda", smoke=False, budget_s=0.0)
    for method in training.VIT_METHODS:
        for dtype, batch in training.CONFIGS:
            measured = (dtype, batch) == ("bf16", 64)
            run.training.append(
                {
                    "model": "vit_b16",
                    "method": method,
                    "dtype": dtype,
                    "batch": batch,
                    "step_ms_median": step[method] if measured else 1.0,
                    "peak_mb": peak[method] if measured else 1.0,
                    "status": "ok",
                }
            )
    for method, ms in (("snell8_s0.9", 10.0), ("snell32_s0.9", 15.0)):
        run.training.append(
            {
                "model": "llama2_7b_2_layers",
                "method": method,
                "dtype": "bf16",
                "batch": 1,
                "step_ms_median": ms,
                "peak_mb": 1.0,
                "status": "ok",
            }
        )
    for shape, ratio in (("4096x4096", 0.7), ("11008x4096", 0.1)):
        run.selection.append(
            {"shape": shape, "numel": 0, "method": "library threshold (topk)", "ratio_to_gemm_fp32": ratio}
        )
    return run


def test_targets_read_the_bf16_batch_64_rows_and_compare_each_against_its_own_limit() -> None:
    """The targets table is the GPU check's answer to the issues: each value must be read at the configuration the
    issue names (bf16 autocast, batch 64; the threshold at 11008x4096), be the named ratio (memory against full
    fine-tuning, SNELL-32 over SNELL-8), and be judged against the limit benchmarks/README.md gives."""
    assert [(t.name, t.value, t.limit, t.verdict) for t in results.targets(_target_run())] == [
        ("step: SNELL-8 s=0.9 / peft LoRA-8", 1.25, 1.15, "MISS"),
        ("step: SNELL-8 s=0.9 / reference-style SNELL-8", 0.25, 0.45, "PASS"),
        ("peak memory: SNELL-8 s=0.9 / peft LoRA-8", 0.5, 1.0, "PASS"),
        ("peak memory: SNELL-8 s=0.9 / full fine-tuning", 0.25, 0.6, "PASS"),
        ("threshold 11008x4096 / one fp32 GEMM with 2048 tokens", 0.1, 0.2, "PASS"),
        ("LLaMA step: SNELL-32 s=0.9 / SNELL-8 s=0.9", 1.5, 1.1, "MISS"),
    ]


@pytest.mark.parametrize("smoke", [True, False])
def test_a_run_whose_training_parts_all_succeed_measures_every_target(smoke: bool) -> None:
    """The training parts must train the configuration the targets read: with one ok row per part, method and
    configuration the run plans (and the threshold's selection row), no target is n/a, in a smoke run (whose
    targets show that the report is wired up) as in a full one."""
    run = gpu_run.Run("cpu" if smoke else "cuda", smoke=smoke, budget_s=0.0)
    for part in training.train_parts(smoke):
        for method in part.methods:
            for dtype, batch in part.configs:
                row = {"model": part.model, "method": method, "dtype": dtype, "batch": batch, "status": "ok"}
                run.training.append({**row, "step_ms_median": 1.0, "peak_mb": 1.0})
    shape = "512x300" if smoke else "11008x4096"
    run.selection.append({"shape": shape, "method": "library threshold (topk)", "ratio_to_gemm_fp32": 0.1})
    assert [t.name for t in results.targets(run) if t.value is None] == []


def test_results_md_counts_only_fail_rows_as_failures(tmp_path: Path) -> None:
    """results.md's headline "Checks: N of M fail" is what a user reads first: the n/a rows a CPU or a missing
    feature gives are not failures, so PASS, n/a and FAIL are 1 of 3 failing."""
    run = gpu_run.Run("cpu", smoke=True, budget_s=0.0, finished=True)
    run.checks = [
        {"check": "a: x", "status": "PASS", "seconds": 0.0, "detail": ""},
        {"check": "b: y", "status": "n/a", "seconds": 0.0, "detail": "n/a: no CUDA device"},
        {"check": "c: z", "status": "FAIL", "seconds": 0.0, "detail": "AssertionError"},
    ]
    text = results.write_results(run, tmp_path, {"device": "cpu"}, "python -m benchmarks.gpu --smoke").read_text()
    assert "\n## Checks: 1 of 3 fail\n" in text
    assert [row["status"] for row in _csv_rows(tmp_path / "checks.csv")] == ["PASS", "n/a", "FAIL"]


def test_training_part_is_skipped_whole_when_its_methods_do_not_fit_and_gives_its_workers_the_budget_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model's methods are compared with each other, so its part runs whole or not at all: with 50 s left,
    4 methods × 20 s are skipped (no worker starts) and parts.csv says why; with 1000 s left, each worker may run
    for all of it, not a few seconds that would stop it before its first step. The clock is frozen at the run's
    start, so the budget left is exactly the budget."""
    monkeypatch.setattr(gpu_run, "time", SimpleNamespace(monotonic=lambda: 0.0))
    timeouts = []

    def worker(job: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        timeouts.append(timeout)
        row = {"model": job["model"], "method": job["method"], "dtype": "bf16", "batch": 1, "status": "ok"}
        return [{**row, "step_ms_median": 1.0, "peak_mb": 1.0}]

    monkeypatch.setattr(training, "_run_worker", worker)
    part = training.TrainPart("k", "vit_b16", "vit", ("a", "b", "c", "d"), (("bf16", 1),), 0, 1, 20.0)

    tight = gpu_run.Run("cuda", smoke=False, budget_s=50.0, started=0.0)
    training.run_train_part(tight, part)
    assert timeouts == []
    assert tight.parts == [
        {
            "part": "train_k",
            "estimate_s": 80.0,
            "wall_s": None,
            "status": "skipped: estimated 80 s, 50 s of the budget left",
        }
    ]

    roomy = gpu_run.Run("cuda", smoke=False, budget_s=1000.0, started=0.0)
    training.run_train_part(roomy, part)
    assert timeouts == [1000.0] * 4
    assert [(p["part"], p["status"]) for p in roomy.parts] == [(f"train_k {m}", "done") for m in "abcd"]


def test_kernels_table_times_the_torch_path_where_triton_cannot_run_and_a_tie_is_not_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kernels.csv and the ``_TRITON_MIN_NUMEL`` it supports: where the Triton kernels cannot run the torch path is
    still timed (faked 2 ms, as the dense layer) and the Triton row says why; and a size where Triton only ties
    the torch path is not one from which Triton is faster, so it gives no bound."""
    monkeypatch.setattr(triton_check, "_why_not", lambda device: "n/a: the Triton kernels cannot run on cpu")
    monkeypatch.setattr(triton_check, "timed_ms", _timings(then=2.0))
    rows = triton_check.layer_rows(8, 8, torch.float32, 4, "cpu", 1)
    assert [(r["path"], r["ms"], r["ratio_to_dense"]) for r in rows] == [
        ("dense layer, weight trains", 2.0, 1.0),
        ("torch", 2.0, 1.0),
        ("triton", None, None),
    ]
    assert rows[1]["note"] == "dispatch: torch" and rows[2]["note"] == "n/a: the Triton kernels cannot run on cpu"

    tie = [{"numel": 10, "path": "torch", "ms": 1.0}, {"numel": 10, "path": "triton", "ms": 1.0}]
    assert triton_check.triton_min_numel(tie) is None
    faster_below = [{"numel": 5, "path": "torch", "ms": 2.0}, {"numel": 5, "path": "triton", "ms": 1.0}]
    assert triton_check.triton_min_numel([*tie, *faster_below]) is None


def test_threshold_timed_is_the_median_of_the_repeats_after_one_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.threshold's seconds are the median of the repeats after an untimed warm-up call (faked clock:
    1, 2 and 5 s give 2 s, not the 1 s minimum), so the reported ratio is a typical call's, not a lucky one's."""
    monkeypatch.setattr(threshold, "time", SimpleNamespace(perf_counter=_clock(0.0, 1.0, 1.0, 3.0, 3.0, 8.0)))
    calls = []
    assert threshold.timed(lambda: calls.append(1), 3) == 2.0
    assert len(calls) == 4


def test_threshold_rows_use_a_seeded_matrix_an_exact_reference_and_times_relative_to_the_gemm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The threshold benchmark (and the GPU check's selection part) measure ΔW from ``piecewise_delta``, which its
    own seed decides whatever the generator's state before, so runs and devices compare the same matrix; the
    library's row is checked against the true k-th largest |entry| ("exact"), and ``ratio_to_gemm`` is a method's
    seconds over the GEMM's (faked: GEMM 2 s, every method 1 s, so 0.5 exactly)."""
    torch.manual_seed(1)
    first = threshold.piecewise_delta(8, 4)
    torch.manual_seed(2)
    assert torch.equal(threshold.piecewise_delta(8, 4), first)

    monkeypatch.setattr(threshold, "timed", _timings(2.0, then=1.0))
    rows = threshold.benchmark_shape(64, 48, 1)
    assert rows[0]["note"] == "exact"
    assert {(r["gemm_s"], r["seconds"], r["ratio_to_gemm"]) for r in rows} == {(2.0, 1.0, 0.5)}
