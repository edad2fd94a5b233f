"""The benchmark suite's own machinery: it writes its tables, and its memory probes measure what they claim."""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# benchmarks/ is not an installed package: make the repo root importable wherever pytest runs from.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import run  # noqa: E402
from benchmarks.memory import SavedTensorBytes, rss_counter_slack_bytes  # noqa: E402


def test_quick_training_run_writes_csv_markdown_and_plot(tmp_path: Path) -> None:
    methods = ["snell8_s0.9"]  # every worker is a fresh process (about 4 s of imports): one method
    argv = ["--quick", "--models", "vit_tiny_test", "--methods", *methods, "--parts", "train", "--out", str(tmp_path)]
    run.main(argv)
    with (tmp_path / "training.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == run.TRAIN_COLUMNS
        rows = list(reader)
    assert [(r["model"], r["method"], r["status"]) for r in rows] == [("vit_tiny_test", m, "ok") for m in methods]
    for row in rows:
        assert float(row["step_s_median"]) > 0
        # two rounds of one timed step each: the pooled median is the mean of the two round medians
        assert (row["rounds"], row["steps"]) == ("2", "2")
        round_medians = [float(t) for t in row["step_s_round_medians"].split(" / ")]
        assert float(row["step_s_median"]) == pytest.approx(sum(round_medians) / 2, abs=1e-3)
        assert float(row["step_s_default_malloc"]) > 0
        assert float(row["minor_faults_per_step"]) >= 0 and float(row["system_s_per_step_default_malloc"]) >= 0
        assert float(row["peak_mb"]) > 0
        assert int(row["trainable_params"]) > 0
        assert float(row["saved_mb"]) > 0  # what the probe counts: test_saved_bytes_count_each_storage_once_...
    markdown = (tmp_path / "results.md").read_text()
    assert "QUICK SMOKE RUN" in markdown
    assert "| vit_tiny_test | fp32 | SNELL-8 s=0.9 |" in markdown
    assert "Command: `" in markdown and "--quick" in markdown
    assert (tmp_path / "training_vit_tiny_test.png").stat().st_size > 0


def test_a_part_of_a_suite_never_writes_over_its_committed_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`benchmarks.run --parts infer` and `benchmarks.llm_study --report-only --tasks bbc` rewrote the committed
    tables with their part alone (74 of 75 SmolLM2 runs gone from runs.csv)."""
    from benchmarks import llm_study

    parser = argparse.Namespace(quick=False, out=None, parts=list(run.PARTS), models=None, methods=None)
    assert run.output_folder(parser) == run.FULL_OUT
    for part in ({"parts": ["infer"]}, {"models": ["vit_b16"]}, {"methods": ["lora8"]}):
        assert run.output_folder(argparse.Namespace(**{**vars(parser), **part})) == run.PART_OUT
    assert run.output_folder(argparse.Namespace(**{**vars(parser), "out": tmp_path})) == tmp_path
    monkeypatch.setattr(llm_study, "RESULTS", tmp_path / "committed")
    monkeypatch.setattr(llm_study, "RUNS", tmp_path / "runs")
    llm_study.main(["--report-only", "--tasks", "bbc", "--methods", "snell8,lora8"])
    assert not (tmp_path / "committed").exists() and (tmp_path / "runs" / "report" / "report.md").is_file()
    llm_study.main(["--report-only", "--tasks", "bbc", "--methods", "snell8", "--out", str(tmp_path / "chosen")])
    assert (tmp_path / "chosen" / "runs.csv").is_file() and not (tmp_path / "committed").exists()


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        ("benchmarks.ab_step", ["--against", "lora8", "--pairs", "0"], "--pairs: expected an integer >= 1, got '0'"),
        ("benchmarks.fused_forward", ["--shapes", "64x"], "--shapes: expected a shape such as 11008x4096, got '64x'"),
        ("benchmarks.threshold", ["--repeats", "0"], "--repeats: expected an integer >= 1"),
        ("benchmarks.threshold", ["--shapes", "8x4x3x3"], "--shapes: expected a shape such as 11008x4096, got"),
        ("benchmarks.expressiveness", ["--steps", "-1"], "--steps: expected an integer >= 1, got '-1'"),
        ("benchmarks.llm_scale", ["--worker"], "--worker needs --method"),
        ("benchmarks.llm_scale", ["--warmup", "-2"], "--warmup: expected an integer >= 0, got '-2'"),
        ("benchmarks.step", ["--method", "head", "--warmup", "-1"], "--warmup: expected an integer >= 0, got '-1'"),
    ],
)
def test_a_benchmarks_bad_flag_value_is_one_line_and_exit_2(
    module: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """They raised StatisticsError, IndexError or KeyError tracebacks, or ran with another value than recorded."""
    import importlib

    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main()  # reads sys.argv
    assert exit_.value.code == 2 and message in capsys.readouterr().err


class _SaveThree(torch.autograd.Function):
    """Saves x, a view of x and a parameter: only x's storage is new memory."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, x.mT, weight)
        return x @ weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, _, weight = ctx.saved_tensors
        return grad @ weight.mT, x.mT @ grad


def test_saved_bytes_count_each_storage_once_and_skip_parameters() -> None:
    weight = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(32, 8, requires_grad=True)
    with SavedTensorBytes(exclude=[weight]) as counter:
        out = _SaveThree.apply(x, weight)
    assert counter.nbytes == 32 * 8 * 4
    with SavedTensorBytes() as counter:
        y = x.exp()  # exp saves its result: a new float32 storage
    assert counter.nbytes == 32 * 8 * 4
    (out.sum() + y.sum()).backward()


def test_peak_rss_sees_a_short_lived_allocation_and_a_reset_forgets_it() -> None:
    """In a fresh process: in this one, earlier tests may have left freed, already-resident heap that a new block
    reuses without raising RSS (seen when the suite ran in reverse order), which says nothing about the peak-RSS
    window itself. A 512 MiB block, touched and freed (far above any mmap threshold, so its pages go back), must
    raise the mark by nearly all of it; after a reset the mark must sit near the RSS again, or every window would
    start with the load's peak in it. 128 MiB is far above what the kernel's per-CPU RSS counters and a few pages
    of allocator churn add between two readings, and far below the block a mark left in place would still show."""
    probe = (
        "import sys, torch\n"
        "from benchmarks.memory import peak_rss_bytes, reset_peak_rss, rss_bytes\n"
        "try:\n"
        "    reset_peak_rss()\n"
        "except OSError as err:\n"
        "    print('skip', err); sys.exit(0)\n"
        "before = rss_bytes()\n"
        "block = torch.ones(128 * 2**20)\n"
        "del block\n"
        "grew = peak_rss_bytes() - before\n"
        "reset_peak_rss()\n"
        "print('grew', grew, peak_rss_bytes() - rss_bytes())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    words = done.stdout.split()
    if words[0] == "skip":
        pytest.skip(f"peak RSS cannot be reset here: {done.stdout.strip()}")
    grew, above = (int(word) for word in words[1:])
    assert grew >= 480 * 2**20 and above < 128 * 2**20


def test_targets_compare_the_right_rows() -> None:
    def row(method: str, step: float, peak: float, saved: float) -> dict[str, object]:
        values = {"step_s_median": step, "step_s_default_malloc": step * 1.25, "peak_mb": peak, "saved_mb": saved}
        values["peak_default_malloc_mb"] = peak
        return {"model": "vit_b16", "method": method, "dtype": "fp32", "status": "ok", **values}

    train = [
        row("lora8", 4.0, 1000.0, 900.0),
        row("snell8_s0.9", 4.8, 1000.0, 900.0),
        row("reference_snell8", 10.0, 1200.0, 950.0),
        row("full", 5.0, 2000.0, 900.0),
        row("snella8", 5.52, 990.0, 900.0),
        row("snell32_s0.9", 5.04, 1010.0, 900.0),
    ]
    merged = (("vit_l16", 1.2), ("vit_b16", 1.01))  # the ViT-B/16 row, wherever it comes
    infer = [{"model": m, "variant": "snell merged", "ratio_to_base": r} for m, r in merged]
    threshold = [{"shape": "11008x4096", "method": "snell threshold (τ of |ΔW| from ΔW)", "ratio_to_gemm": 0.3}]
    verdicts = {goal.name: (round(goal.value, 3), goal.verdict) for goal in run.targets(train, infer, threshold)}
    assert verdicts["step time: SNELL-8 s=0.9 / peft LoRA-8"] == (1.2, "PASS")
    assert verdicts["step time: SNELL-8 s=0.9 / reference-style SNELL-8"] == (0.48, "MISS")
    assert verdicts["step time, default malloc (history-dependent): SNELL-8 s=0.9 / peft LoRA-8"] == (1.2, "PASS")
    assert verdicts["peak memory: SNELL-8 s=0.9 / full fine-tuning"] == (0.5, "PASS")
    assert verdicts["inference: merged SNELL / base model"] == (1.01, "PASS")
    assert verdicts["threshold 11008x4096 / one dense GEMM with 2048 tokens"] == (0.3, "MISS")
    assert verdicts["step time: SNELLA-8 / SNELL-8 s=0.9"] == (1.15, "MISS")
    assert verdicts["step time: SNELL-32 s=0.9 / SNELL-8 s=0.9"] == (1.05, "PASS")
    assert verdicts["peak memory: SNELLA-8 / SNELL-8 s=0.9"] == (0.99, "PASS")
    assert all(verdict != "n/a" for _, verdict in verdicts.values())


def test_a_value_is_shown_with_the_digits_its_verdict_needs() -> None:
    """vit_b16_ranks/results.md read `| peak memory: SNELLA-8 / SNELL-8 s=0.9 | 1 | <= 1.0 | MISS |` for 1.000073."""
    from benchmarks.report import Target

    for value, limit, shown, verdict in [
        (1.000073, 1.0, "1.0001", "MISS"),
        (1.2504, 1.25, "1.2504", "MISS"),
        (0.45004, 0.45, "0.45004", "MISS"),
        (0.4499, 0.45, "0.45", "PASS"),  # rounds onto the limit, on the same side
        (1.402, 1.25, "1.402", "MISS"),
        (0.8617, 1.0, "0.862", "PASS"),
        (None, 1.0, "–", "n/a"),
    ]:
        target = Target("x", value, limit)
        assert (target.shown, target.verdict) == (shown, verdict)


def test_peak_trace_records_every_block_in_both_directions_and_the_trim() -> None:
    from benchmarks.peak_trace import trace_step

    events, peak, heap_free = trace_step("vit_tiny_test", "snell8_s0.9", batch=2, trim=True)
    phases = [phase for phase, *_ in events]
    blocks = {name for phase, name, *_ in events if phase == "forward" and "blocks" in name}
    assert len(blocks) >= 2
    assert phases.count("after malloc_trim") == 1
    assert {name for phase, name, *_ in events if phase == "backward"} >= blocks
    # each reading's high-water mark covers its RSS, and the step's peak covers every reading, to within the
    # kernel's per-CPU counters (each reading may be off by the slack, either way)
    slack = 2 * rss_counter_slack_bytes() / 2**20
    assert all(high >= rss - slack for _, _, rss, high in events)
    assert peak >= max(high for *_, high in events) - slack
    assert heap_free >= 0.0


def test_ab_step_imports_the_baseline_beside_the_working_tree_and_pairs_their_steps(tmp_path: Path) -> None:
    import snell
    from benchmarks import ab_step

    working = {name: module for name, module in sys.modules.items() if name == "snell" or name.startswith("snell.")}
    baseline = ab_step.import_snell_revision("HEAD", tmp_path)
    assert {name: module for name, module in sys.modules.items() if name in working} == working
    assert baseline is sys.modules["snell_baseline"] is not snell
    # the baseline's modules call each other, not the working tree's
    assert Path(baseline.torch_path.__file__).is_relative_to(tmp_path)
    assert baseline.torch_path.kernels is sys.modules["snell_baseline.kernels"] is not snell.kernels

    build_a = ab_step.builder("vit_tiny_test", "snell8_s0.9", baseline)
    build_b = ab_step.builder("vit_tiny_test", "snell8_s0.9")
    result = ab_step.paired_steps(build_a, build_b, "vit_tiny_test", batch=2, pairs=3)
    assert len(result["step_s_a"]) == len(result["step_s_b"]) == 3
    assert 0 <= result["b_faster_pairs"] <= 3
    assert result["median_ratio"] > 0
    # same seed, same batch, the same maths at HEAD and in a clean working tree
    assert result["loss_a"] == pytest.approx(result["loss_b"], rel=1e-5)
    with pytest.raises(ValueError, match="cannot read src/snell at revision 'no-such-revision'"):
        ab_step.import_snell_revision("no-such-revision", tmp_path / "other")
    assert sys.modules["snell"] is snell
    with pytest.raises(ValueError, match="pairs must be at least 1, got 0"):
        ab_step.paired_steps(build_a, build_b, "vit_tiny_test", batch=2, pairs=0)


def test_ab_step_runs_each_methods_after_step_hook_as_the_suite_does() -> None:
    """SNELLA's allocator runs after every optimizer step in the suite's workers; ab_step timed SNELLA-8 without it,
    every layer left at the initial sparsity."""
    import snell
    from benchmarks import ab_step

    built = {}

    def keep(key: str) -> Callable[[], torch.nn.Module]:
        def build() -> torch.nn.Module:
            built[key] = ab_step.builder("vit_tiny_test", "snella8")()
            return built[key]

        return build

    ab_step.paired_steps(keep("a"), keep("b"), "vit_tiny_test", batch=2, pairs=1, methods=(None, "snella8"))
    sparsities = {
        key: {
            s
            for _, layer in snell.snell_layers(model)
            for s in layer.snell_spec.group_sparsity or (layer.snell_spec.sparsity,)
        }
        for key, model in built.items()
    }
    assert sparsities["a"] <= {0.01} and len(sparsities["b"]) > 1  # b re-allocated after its steps, a did not


def test_fused_layer_times_three_variants_in_turns() -> None:
    import os
    import subprocess

    pytest.importorskip("numba")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, str(Path(ROOT) / "src")])}
    args = ["--out-features", "96", "--in-features", "64", "--tokens", "4", "--rounds", "2", "--dtype", "float32"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.fused_layer", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("torch / fused: median of rounds") == 2
    lines = [line.strip() for line in done.stdout.splitlines()]
    for name in ("torch", "fused", "plain"):
        assert sum(line.startswith(f"{name}: median") for line in lines) == 2


def test_fused_layer_sweep_writes_one_row_per_shape(tmp_path: Path) -> None:
    import os
    import subprocess

    pytest.importorskip("numba")
    # already under the pinned allocator, so it does not start itself again (the test above covers that restart)
    env = {**os.environ, **run.TIMED_ENV, "PYTHONPATH": os.pathsep.join([ROOT, str(Path(ROOT) / "src")])}
    out = tmp_path / "sweep.json"
    shapes = ["48x32", "96x64", "8x4x3x3"]  # the last a Conv2d
    args = ["--sweep", *shapes, "--tokens", "4", "--rounds", "2", "--dtype", "float32", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.fused_layer", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    expected = [("48x32", 1536, 4), ("96x64", 6144, 4), ("8x4x3x3", 288, 4)]
    assert [(row["shape"], row["numel"], row["tokens"]) for row in rows] == expected
    assert all(row[f"{name}_ms"] > 0 for row in rows for name in ("torch", "fused", "plain"))


def test_llm_scale_projects_from_two_depths() -> None:
    from benchmarks.llm_scale import project

    total, arithmetic = project({"step_s": 5.0}, {"step_s": 3.0}, "step_s")
    # per layer 2, rest 1: 1 + 32 × 2
    assert total == 65.0 and "1.00 + 32 × 2.00 = 65.00" in arithmetic


def test_llm_scale_worker_trains_a_batch_of_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    """--batch reaches the tokens: the saved-for-backward count grows with the batch (the activations of 3 sequences,
    not 1), at the tiny LLaMA shape."""
    from benchmarks import llama, llm_scale

    build = llama.build
    monkeypatch.setattr(llama, "build", lambda layers: build(layers, shape=llama.TINY))
    rows = {batch: llm_scale.worker("snell8", layers=1, seq=8, warmup=0, steps=1, batch=batch) for batch in (1, 3)}
    assert [(row["batch"], row["seq"], len(row["step_times"])) for row in rows.values()] == [(1, 8, 1), (3, 8, 1)]
    assert rows[3]["trainable_params"] == rows[1]["trainable_params"] > 0
    assert rows[3]["saved_mb"] > 2 * rows[1]["saved_mb"] > 0


def test_smollm2_step_worker_trains_the_real_model_with_snell_on_all_seven_projections(
    smollm2: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import smollm2_step

    source, model, _ = smollm2
    loads = []
    # the session's load of the file (through snell's loader, as llm_memory.load goes), cast to bf16 as load casts
    monkeypatch.setattr(smollm2_step, "load", lambda path: loads.append(path) or copy.deepcopy(model).bfloat16())
    row = smollm2_step.worker("snell8", batch=1, seq=8, warmup=0, steps=1)
    assert loads == [str(source.folder / source.gguf_file)]
    # SmolLM2-135M: 30 layers of q/o (576×576), k/v (192×576), gate/up (1536×576) and down (576×1536); SNELL-8
    # trains A (n×8) and B (m×8) of each, 8·(m + n) parameters
    per_layer = 8 * (2 * (576 + 576) + 2 * (192 + 576) + 3 * (1536 + 576))
    assert row["trainable_params"] == 30 * per_layer
    assert row["step_s"] > 0 and len(row["step_times"]) == 1
    # a warm process's step at 1 × 8 tokens may add nothing: its peak is 0, read through the kernel's counters
    assert row["peak_mb"] >= -2 * rss_counter_slack_bytes() / 2**20


def test_llm_memory_loads_a_causal_lm_folder_in_bf16_and_refuses_anything_else(tmp_path: Path) -> None:
    from benchmarks.llm_memory import load

    model = load(str(Path(ROOT) / "src" / "snell" / "data" / "tiny_llama_bbc"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(SystemExit, match="not a causal LM"):
        load(str(tmp_path / "missing.gguf"))


def _fake_workers(monkeypatch: pytest.MonkeyPatch, seconds: list[float], peaks: dict[str, float]) -> list[list[str]]:
    """Stands in for :mod:`benchmarks.in_turns`' worker processes: each returns the next of ``seconds`` as its step and
    its method's peak; returns the list every call's arguments go to."""
    from benchmarks import in_turns, run

    calls, steps = [], iter(seconds)

    def timed(module, args, *rest):
        calls.append(args)
        step = next(steps)
        return {"step_s": step, "step_times": [step], "peak_mb": peaks[args[args.index("--method") + 1]]}, "ok"

    monkeypatch.setattr(in_turns, "measure", lambda module, args, warmup, steps, timeout: timed(module, args))
    monkeypatch.setattr(run, "run_worker", timed)
    return calls


def test_smollm2_step_rounds_run_in_turns_and_judge_the_median_ratio(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import smollm2_step

    # lora8, snell8 | snell8, lora8 | lora8, snell8: SNELL-8 / LoRA-8 1.5, 2.0 and 1.1 in the three rounds
    calls = _fake_workers(monkeypatch, [2.0, 3.0, 4.0, 2.0, 2.0, 2.2], {"lora8": 100.0, "snell8": 70.0})
    rows = smollm2_step.drive(["lora8", "snell8"], 4, 256, 1, 3, 60.0, rounds=3)
    methods = [args[args.index("--method") + 1] for args in calls]
    assert methods == ["lora8", "snell8", "snell8", "lora8", "lora8", "snell8"]
    assert all(args[args.index("--batch") + 1] == "4" for args in calls)
    by_method = {row["round_steps"][0]: row for row in rows}
    assert by_method[2.0]["round_steps"] == [2.0, 2.0, 2.0] and by_method[3.0]["round_steps"] == [3.0, 4.0, 2.2]
    assert by_method[3.0]["step_s"] == 3.0
    verdict = "snell8 / lora8: step 1.500 (target <= 1.15: MISS), peak 0.700 (target <= 0.85: PASS)"
    assert verdict in capsys.readouterr().out


def test_llm_scale_rounds_time_the_given_depth_in_turns_against_the_llama_targets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from benchmarks import llm_scale

    methods = ["lora8", "snell8", "snell32", "full"]
    # round 1 in this order, round 2 reversed: SNELL-32 / SNELL-8 1.2 then 0.95, median 1.075
    seconds = [1.0, 2.0, 2.4, 3.0, 3.0, 1.9, 2.0, 1.0]
    calls = _fake_workers(monkeypatch, seconds, {"lora8": 100.0, "snell8": 90.0, "snell32": 95.0, "full": 300.0})
    out = tmp_path / "rows.json"
    argv = ["llm_scale", "--methods", *methods, "--layers", "2", "--batch", "4", "--seq", "256", "--rounds", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    llm_scale.main()
    shapes = {tuple(args[args.index("--layers") :][:6]) for args in calls}
    assert shapes == {("--layers", "2", "--batch", "4", "--seq", "256")}
    printed = capsys.readouterr().out
    assert "snell8 / lora8: step 2.000 (target <= 1.8: MISS), peak 0.900 (target <= 1.0: PASS)" in printed
    assert "snell32 / snell8: step 1.075 (target <= 1.1: PASS), peak 1.056" in printed
    assert "snell32 / full: step 0.717 (target <= 1.0: PASS), peak 0.317" in printed
    assert "snell32 / lora32" not in printed  # LoRA-32 was not timed
    rounds = [row["round_steps"] for row in json.loads(out.read_text())]
    assert rounds == [[1.0, 1.0], [2.0, 2.0], [2.4, 1.9], [3.0, 3.0]]


def test_fused_forward_times_both_ways_and_checks_they_agree() -> None:
    pytest.importorskip("numba")
    from benchmarks.fused_forward import compare

    for dtype in (torch.float32, torch.bfloat16):
        row = compare(100, 300, 8, dtype, "mask", 0.9, rounds=2)
        assert row["identical"] and row["two_passes_ms"] > 0 and row["one_pass_ms"] > 0 and row["speedup"] > 0


def test_fused_passes_are_timed_per_step_and_given_back_untouched(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("numba")
    from benchmarks import profile_step
    from snell import fused_cpu

    originals = [getattr(module, name) for module, name, _ in profile_step.FUSED_PASSES]
    a, b, coef = torch.rand(300, 8), torch.rand(500, 8), torch.tensor([0.1, -0.1])
    profile_step.time_fused_passes(lambda: fused_cpu.merge_selected(a, b, coef, 2, "mask", 0.9, None, a.dtype), 2)
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        label, value, _ = line.rsplit(None, 2)
        rows[label.strip()] = float(value)
    one_pass = "their one pass over ΔW (reference and mask modes)"
    assert rows["tau and merge"] >= rows[one_pass] > 0.0 and rows["merge alone (soft mode, dense matrices)"] == 0.0
    assert rows["whole step"] >= rows["tau and merge"]
    assert [getattr(module, name) for module, name, _ in profile_step.FUSED_PASSES] == originals


def test_profile_step_times_the_llama_steps_fused_passes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--llama-layers profiles llm_scale's step (here at the tiny shape, 172×64 MLP matrices on the fused path once
    numba is there) and refuses a method of the other table."""
    pytest.importorskip("numba")
    from benchmarks import llama, profile_step

    build = llama.build
    monkeypatch.setattr(llama, "build", lambda layers: build(layers, shape=llama.TINY))
    argv = ["profile_step", "--llama-layers", "1", "--seq", "8", "--method", "snell8", "--fused-passes", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr("snell.dispatch._FUSED_FROM", ((1, 16),))
    profile_step.main()
    rows = {
        line.rsplit(None, 2)[0].strip(): float(line.rsplit(None, 2)[1]) for line in capsys.readouterr().out.splitlines()
    }
    assert rows["whole step"] >= rows["backward, fused path (with the dW and dx GEMMs)"] >= rows["gradient pass"] > 0
    assert rows["forward, fused path"] > 0
    monkeypatch.setattr(sys, "argv", [*argv[:5], "--method", "snell8_s0.9"])
    with pytest.raises(SystemExit) as stopped:
        profile_step.main()
    assert stopped.value.code == 2 and "snell8_s0.9: not one of" in capsys.readouterr().err


def test_snell_with_dropout_drops_the_inputs_the_reference_style_baseline_drops() -> None:
    """`snell8_s0.9_dropout` is the like-for-like partner of `reference_snell8`: the same layers get input dropout
    (attn.proj's input stays undropped in both, as in the reference code), so neither pays a dropout path alone."""
    import snell
    from benchmarks import methods
    from benchmarks.reference_snell import ReferenceSnellLinear

    ours = methods.METHODS["snell8_s0.9_dropout"].build(methods.MODELS["vit_tiny_test"].create())
    reference = methods.METHODS["reference_snell8"].build(methods.MODELS["vit_tiny_test"].create())
    dropped = {name: layer.snell_dropout for name, layer in snell.snell_layers(ours)}
    expected = {
        name: {branch.dropout.p for branch in module.branches}.pop()
        for name, module in reference.named_modules()
        if isinstance(module, ReferenceSnellLinear)
    }
    assert dropped == expected and sorted(set(dropped.values())) == [0.0, 0.1]
