"""The benchmark harness's arithmetic and plumbing, against fake kernels, fake workers and controlled rows: which
window a peak covers, which worker a number comes from, which rows a target divides, and what reaches the workers."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

# benchmarks/ is not an installed package: make the repo root importable wherever pytest runs from.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import in_turns, memory, run  # noqa: E402
from benchmarks.memory import StepRun  # noqa: E402

MiB = 2**20


class _FakeKernel:
    """The RSS, the peak-RSS mark and getrusage's counters of a process, moved by hand. A reset puts the mark
    ``reset_above`` bytes above the RSS (a real kernel may count a few pages in between)."""

    def __init__(self, rss: int, peak: int, reset_above: int = 0) -> None:
        self.rss, self.peak, self.reset_above = rss, peak, reset_above
        self.faults, self.system_s, self.user_s = 0, 0.0, 0.0

    def rss_bytes(self) -> int:
        return self.rss

    def peak_rss_bytes(self) -> int:
        return self.peak

    def reset_peak_rss(self) -> None:
        self.peak = self.rss + self.reset_above

    def step(self, rss: int, spike: int, faults: int, system_s: float, user_s: float) -> None:
        """One step: the RSS ends at ``rss`` after a transient ``spike`` above it."""
        self.rss, self.peak = rss, max(self.peak, rss + spike)
        self.faults, self.system_s, self.user_s = self.faults + faults, self.system_s + system_s, self.user_s + user_s

    def getrusage(self, who: int) -> SimpleNamespace:
        return SimpleNamespace(ru_minflt=self.faults, ru_stime=self.system_s, ru_utime=self.user_s)


def _three_steps(step: object, warmup: int, steps: int) -> StepRun:
    """A run_steps stand-in: steps of 1, 2 and 6 s; 300 MiB loaded; 50 MiB peak; 30 faults and 1.5 s of system time."""
    return StepRun([1.0, 2.0, 6.0], 300 * MiB, 50 * MiB, 30, 1.5)


def _method_of(args: list[str]) -> str:
    return args[args.index("--method") + 1]


def test_proc_status_kib_are_read_as_bytes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """/proc/self/status gives VmRSS and VmHWM in kB, which are KiB: 1000 kB is 1 024 000 bytes. Read as 1000-byte
    units every RSS and peak in the tables would be 2.4 % low."""
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t    3000 kB\nVmRSS:\t    1000 kB\n")
    monkeypatch.setattr(memory, "_STATUS", status)
    assert (memory.rss_bytes(), memory.peak_rss_bytes()) == (1000 * 1024, 3000 * 1024)


def test_run_steps_window_holds_the_warm_up_and_counts_only_the_timed_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a fake kernel: loading the model peaked at 5000 MiB and left 1000 MiB resident; the warm-up adds
    AdamW's 100 MiB of state with a 50 MiB transient above it, 1000 faults and 5 s of system time; each timed step
    a 30 MiB transient, 10 faults, 0.5 s system and 2 s user time. The window opens after the load (its peak is not
    the step's), the loaded RSS is read before the warm-up (the optimizer state is training's cost: peak 150 MiB,
    not 50), and faults and system time are the timed steps' (20 and 1.0 s, not the warm-up's, not user time)."""
    kernel = _FakeKernel(rss=1000 * MiB, peak=5000 * MiB)
    monkeypatch.setattr(memory, "rss_bytes", kernel.rss_bytes)
    monkeypatch.setattr(memory, "peak_rss_bytes", kernel.peak_rss_bytes)
    monkeypatch.setattr(memory, "reset_peak_rss", kernel.reset_peak_rss)
    monkeypatch.setattr(memory, "resource", SimpleNamespace(getrusage=kernel.getrusage, RUSAGE_SELF=0))
    calls = []

    def step() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            kernel.step(1100 * MiB, 50 * MiB, faults=1000, system_s=5.0, user_s=5.0)
        else:
            kernel.step(1100 * MiB, 30 * MiB, faults=10, system_s=0.5, user_s=2.0)

    measured = memory.run_steps(step, warmup=1, steps=2)
    assert len(calls) == 3 and len(measured.times) == 2
    assert (measured.loaded, measured.peak) == (1000 * MiB, 150 * MiB)
    assert (measured.minor_faults, measured.system_s) == (20, 1.0)


def test_peak_trace_reads_the_traced_steps_window_and_the_free_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    """trace_step on the tiny ViT against a fake kernel: the RSS stays at 1000 MiB, the mark is at 9000 MiB from the
    load and 2 MiB above the RSS after a reset; the free heap reads 42 MiB. Every event must read 0 MiB of RSS and
    2 MiB of high-water (the mark, not the RSS), the step's peak 2 MiB (the mark reset before the traced step, not
    the load's), the classifier head is traced last in the forward, and the free heap is read with or without
    --trim. free_heap_mb itself reads mallinfo2's free chunks (fordblks), not the bytes in use."""
    from benchmarks import peak_trace

    class FakeLibc:
        class mallinfo2:
            restype = None

            def __new__(cls) -> peak_trace._MallInfo2:
                return peak_trace._MallInfo2(arena=10 * MiB, uordblks=7 * MiB, fordblks=3 * MiB)

    assert peak_trace.free_heap_mb(FakeLibc()) == 3.0

    kernel = _FakeKernel(rss=1000 * MiB, peak=9000 * MiB, reset_above=2 * MiB)
    monkeypatch.setattr(peak_trace, "rss_bytes", kernel.rss_bytes)
    monkeypatch.setattr(peak_trace, "peak_rss_bytes", kernel.peak_rss_bytes)
    monkeypatch.setattr(peak_trace, "reset_peak_rss", kernel.reset_peak_rss)
    monkeypatch.setattr(peak_trace, "free_heap_mb", lambda libc: 42.0)
    for trim in (False, True):
        kernel.peak = 9000 * MiB
        events, peak, heap_free = peak_trace.trace_step("vit_tiny_test", "snell8_s0.9", batch=2, trim=trim)
        assert (peak, heap_free) == (2.0, 42.0)
        assert {(rss, high) for *_, rss, high in events} == {(0.0, 2.0)}
        forward = [name for phase, name, *_ in events if phase == "forward"]
        assert forward[-1] == "head" and len(forward) >= 3
        assert [phase for phase, *_ in events].count("after malloc_trim") == int(trim)


def test_measure_takes_the_timed_row_with_the_memory_workers_peak_and_fails_with_either_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """in_turns.measure runs a timed worker under the pinned allocator with the given steps and a memory worker
    under the 1 MiB mmap threshold with one warm-up and one step. Its row is the timed one (step 1.0 s, not the memory
    worker's 9.0) with the memory worker's peak and saved bytes (100 and 7 MB, not the timed worker's 500 and 70,
    which depend on allocator history). If either worker fails the method has no row, rather than a crash or half a
    row, and a failed timed worker costs no memory worker (up to another timeout, for nothing)."""
    calls: list[tuple[str, list[str]]] = []
    failing: set[str] = set()

    def worker(module: str, args: list[str], timeout: float, env: dict[str, str]) -> tuple[dict | None, str]:
        kind = "memory" if env is run.MEMORY_ENV else "timed" if env is run.TIMED_ENV else "other"
        calls.append((kind, list(args)))
        if kind in failing:
            return None, f"{kind} failed"
        if kind == "memory":
            return {"step_s": 9.0, "step_times": [9.0], "peak_mb": 100.0, "saved_mb": 7.0}, "ok"
        return {"step_s": 1.0, "step_times": [1.0], "peak_mb": 500.0, "saved_mb": 70.0}, "ok"

    monkeypatch.setattr(run, "run_worker", worker)
    args = ["--worker", "--method", "snell8"]
    row, status = in_turns.measure("benchmarks.llm_scale", args, 2, 3, 60.0)
    assert (row, status) == ({"step_s": 1.0, "step_times": [1.0], "peak_mb": 100.0, "saved_mb": 7.0}, "ok")
    assert sorted(calls) == [
        ("memory", [*args, "--warmup", "1", "--steps", "1"]),
        ("timed", [*args, "--warmup", "2", "--steps", "3"]),
    ]
    for kind, started in (("memory", ["timed", "memory"]), ("timed", ["timed"])):
        failing.clear()
        failing.add(kind)
        calls.clear()
        row, status = in_turns.measure("benchmarks.llm_scale", args, 2, 3, 60.0)
        assert row is None and f"{kind} failed" in status and [k for k, _ in calls] == started


def _fake_step_workers(
    monkeypatch: pytest.MonkeyPatch,
    steps: dict[str, list[float]],
    memory_peaks: dict[str, float],
    failing: set[tuple[str, int]],
) -> list[tuple[str, str]]:
    """Fake workers for drive_in_turns: a method's round n takes steps[method][n - 1] s, or fails where (method, n)
    is in ``failing``. A timed worker reports a 999 MB peak, measure (round 1) the memory worker's
    memory_peaks[method]. Returns the log of (worker, method), in call order."""
    log: list[tuple[str, str]] = []

    def worker(kind: str, args: list[str]) -> tuple[dict | None, str]:
        method = _method_of(args)
        log.append((kind, method))
        round_no = sum(1 for _, m in log if m == method)
        if (method, round_no) in failing:
            return None, "failed (exit 1): boom"
        step = steps[method][round_no - 1]
        return {"step_s": step, "step_times": [step], "peak_mb": 999.0}, "ok"

    def measure(module: str, args: list[str], *rest: object) -> tuple[dict | None, str]:
        row, status = worker("measure", args)
        return (None, status) if row is None else ({**row, "peak_mb": memory_peaks[_method_of(args)]}, status)

    monkeypatch.setattr(in_turns, "measure", measure)
    monkeypatch.setattr(run, "run_worker", lambda module, args, *rest: worker("timed", args))
    return log


def test_rounds_in_turns_measure_the_first_round_only_and_judge_complete_rounds_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """drive_in_turns sends round 1 through measure (timed and memory workers) and later rounds through one timed
    worker each, in reverse order every other round; the rows' peaks are the memory workers' (100 and 80 MB, not a
    timed worker's 999). When LoRA-8 alone fails round 2, the run goes on and prints no SNELL-8 / LoRA-8 verdict
    (its rounds are not all there); with every round there, the verdict is on the median of the per-round ratios
    (1.5, 1.25, 1.5: 1.5, where their mean would be 1.417)."""
    steps = {"lora8": [2.0, 4.0, 4.0], "snell8": [3.0, 5.0, 6.0]}
    peaks = {"lora8": 100.0, "snell8": 80.0}
    target = in_turns.RatioTarget("snell8", "lora8", step_limit=1.6, peak_limit=1.0)

    log = _fake_step_workers(monkeypatch, steps, peaks, {("lora8", 2)})
    rows = in_turns.drive_in_turns("m", "setting", ["lora8", "snell8"], [], 1, 1, 60.0, 3, [target])
    assert log == [
        ("measure", "lora8"),
        ("measure", "snell8"),
        ("timed", "snell8"),
        ("timed", "lora8"),
        ("timed", "lora8"),
        ("timed", "snell8"),
    ]
    assert [(row["round_steps"], row["peak_mb"]) for row in rows] == [
        ([2.0, None, 4.0], 100.0),
        ([3.0, 5.0, 6.0], 80.0),
    ]
    assert "snell8 / lora8" not in capsys.readouterr().out

    _fake_step_workers(monkeypatch, steps, peaks, set())
    in_turns.drive_in_turns("m", "setting", ["lora8", "snell8"], [], 1, 1, 60.0, 3, [target])
    verdict = "snell8 / lora8: step 1.500 (target <= 1.6: PASS), peak 0.800 (target <= 1.0: PASS)"
    assert verdict in capsys.readouterr().out


def test_rounds_in_turns_pair_steps_of_the_same_round_and_peaks_of_the_memory_worker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed worker leaves a hole in its round, not a shift: LoRA-8 failing round 2 and SNELL-8 round 3 must not
    pair SNELL-8's round 2 with LoRA-8's round 3 (the drift the turns cancel), so no verdict. A method whose first
    round failed has no peak: the timed workers' runs under the pinned allocator are not the memory worker's. A
    peak of 0 MB gives no ratio rather than a ZeroDivisionError that loses the whole run."""
    steps = {"lora8": [2.0, 4.0, 6.0], "snell8": [3.0, 6.0, 9.0]}  # the machine slows down, round by round
    target = in_turns.RatioTarget("snell8", "lora8", step_limit=1.4, peak_limit=0.85)
    peaks = {"lora8": 100.0, "snell8": 80.0}

    _fake_step_workers(monkeypatch, steps, peaks, {("lora8", 2), ("snell8", 3)})
    rows = in_turns.drive_in_turns("m", "setting", ["lora8", "snell8"], [], 1, 1, 60.0, 3, [target])
    assert [row["round_steps"] for row in rows] == [[2.0, None, 6.0], [3.0, 6.0, None]]
    assert [row["step_s"] for row in rows] == [4.0, 4.5] and [row["peak_mb"] for row in rows] == [100.0, 80.0]
    assert "snell8 / lora8" not in capsys.readouterr().out

    _fake_step_workers(monkeypatch, steps, peaks, {("lora8", 1)})
    rows = in_turns.drive_in_turns("m", "setting", ["lora8", "snell8"], [], 1, 1, 60.0, 2, [target])
    assert {row["round_steps"][1]: row["peak_mb"] for row in rows} == {4.0: None, 6.0: 80.0}  # lora8's is None
    assert "   lora8: step 4.00 s, peak above the loaded model not measured" in capsys.readouterr().out

    _fake_step_workers(monkeypatch, steps, {"lora8": 0.0, "snell8": 0.0}, set())
    in_turns.drive_in_turns("m", "setting", ["lora8", "snell8"], [], 1, 1, 60.0, 1, [target])
    assert "snell8 / lora8: step 1.500 (target <= 1.4: MISS), peak n/a" in capsys.readouterr().out


def test_a_target_at_its_limit_passes_and_numbers_keep_their_sign() -> None:
    """The tables print "target <= limit": a ratio exactly at its limit is a PASS, a hair above a MISS. fmt shows
    a number of magnitude >= 1 in fixed point whatever its sign (a peak of -1234.5 MB reads -1234.5, not
    -1.23e+03), and one below 1 with its significant digits."""
    from benchmarks.report import Target, fmt

    assert [Target("x", v, limit).verdict for v, limit in ((1.0, 1.0), (0.45, 0.45), (1.0001, 1.0))] == [
        "PASS",
        "PASS",
        "MISS",
    ]
    assert [fmt(v) for v in (-1234.5, 1234.5, -12.0, -0.0412)] == ["-1234.5", "1234.5", "-12", "-0.0412"]


@pytest.mark.parametrize(("parse", "text"), [("matrix_shape", "0x4096"), ("layer_shape", "64x0x3x3")])
def test_a_shape_with_a_side_of_zero_is_refused(parse: str, text: str) -> None:
    """A matrix or layer with an empty side times nothing: the flag must be refused, not benchmarked as a ratio of
    two empty GEMMs."""
    from benchmarks import report

    with pytest.raises(argparse.ArgumentTypeError):
        getattr(report, parse)(text)


def test_the_environment_table_gives_ram_in_gib_and_markdown_tables_a_full_separator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The results' environment table labels RAM in GiB, so it divides by 2**30 (3.5 GiB here, which 1e9 would show
    as 3.8). A Markdown table's separator row needs one cell per header, or the renderer shows no table at all."""
    from benchmarks import report

    monkeypatch.setattr(report.psutil, "virtual_memory", lambda: SimpleNamespace(total=7 * 2**29))
    assert report.environment()["RAM"] == "3.5 GiB"
    lines = report.markdown_table(["a", "b", "c"], [(1, 2.5, None)]).splitlines()
    assert lines == ["| a | b | c |", "|---|---|---|", "| 1 | 2.5 | – |"]


def test_a_step_autocasts_bf16_only_and_saved_bytes_leave_the_parameters_out() -> None:
    """make_step runs an fp32 step in float32 and a bf16 step under bf16 autocast: an fp32 row computed in bf16
    would time the wrong kernels. saved_for_backward counts what the forward adds: two Linear layers at batch 1 save
    their inputs (2 × 4000 bytes) and the loss's few bytes, not the 40 000-byte weight that the second layer's input
    gradient needs, which is alive anyway."""
    from benchmarks.step import make_step, saved_for_backward

    torch.manual_seed(0)
    seen = []
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    images, labels = torch.randn(2, 4), torch.tensor([0, 2])
    make_step(model, images, labels, "fp32")()
    make_step(model, images, labels, "bf16")()
    assert seen == [torch.float32, torch.bfloat16]
    model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 10))
    assert 8000 <= saved_for_backward(model, torch.randn(1, 1000), torch.tensor([3]), "fp32") < 20000


def test_a_step_workers_row_is_the_median_step_and_per_step_counters_of_the_timed_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """benchmark_training's row from a controlled StepRun (steps of 1, 2 and 6 s; 300 MiB loaded; 50 MiB peak; 30
    faults and 1.5 s of system time over the 3 timed steps, after 2 warm-up steps): the median step 2 s (one slow
    step must not move it, as a mean of 3 s would), and 10 faults and 0.5 s per timed step (not per warm-up and timed
    step)."""
    from benchmarks import step

    monkeypatch.setattr(step, "run_steps", _three_steps)
    row = step.benchmark_training("vit_tiny_test", "head", batch=2, warmup=2, steps=3, dtype="fp32")
    assert {key: row[key] for key in ("step_times", "step_s_median", "step_s_min", "warmup", "steps", "batch")} == {
        "step_times": [1.0, 2.0, 6.0],
        "step_s_median": 2.0,
        "step_s_min": 1.0,
        "warmup": 2,
        "steps": 3,
        "batch": 2,
    }
    assert (row["minor_faults_per_step"], row["system_s_per_step"]) == (10.0, 0.5)
    assert (row["peak_mb"], row["loaded_mb"]) == (50.0, 300.0)


def test_rounds_pool_every_steps_time_and_average_the_faults() -> None:
    """A suite row's step time is the median of every round's steps pooled (3.5 s of 1, 2, 9, 3, 4, 5; their mean
    would be 4.0), and its faults per step the mean over the rounds (20 of 10 and 30, not the first round's)."""
    row = {"step_times": [9.0], "round_times": [[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]], "round_faults": [10.0, 30.0]}
    run._pool_rounds(row)
    assert row == {
        "rounds": 2,
        "step_s_median": 3.5,
        "step_s_min": 1.0,
        "step_s_round_medians": "2.000 / 4.000",
        "steps": 6,
        "minor_faults_per_step": 20.0,
    }


def test_a_jobs_first_round_takes_its_peak_from_the_memory_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """_first_round runs a default-malloc timed worker, then a memory worker under the 1 MiB mmap threshold with
    one warm-up and one step, then a pinned timed worker. The row's peak_mb is the memory worker's (100 MB); the
    default-malloc worker's 300 MB is its own column, and the pinned worker's steps start round_times. When the
    memory worker fails, the plain step and peak columns stay blank beside the failed status: the default-malloc
    numbers keep their own columns and never stand in for the pinned ones."""
    calls: list[tuple[str, list[str]]] = []
    kinds = {id(run.DEFAULT_MALLOC_ENV): "default", id(run.MEMORY_ENV): "memory", id(run.TIMED_ENV): "timed"}
    failing: set[str] = set()

    def worker(module: str, args: list[str], timeout: float, env: dict[str, str]) -> tuple[dict | None, str]:
        kind = kinds.get(id(env), "other")
        calls.append((kind, args[-4:]))
        if kind in failing:
            return None, f"failed (exit 137): {kind} killed"
        peak, step = {"default": (300.0, 2.0), "memory": (100.0, 9.0), "timed": (250.0, 1.5)}.get(kind, (0.0, 0.0))
        row = {"step_times": [step], "step_s_median": step, "minor_faults_per_step": 5.0, "system_s_per_step": 0.1}
        return {**row, "saved_mb": 3.0, "loaded_mb": 10.0, "trainable_params": 7, "peak_mb": peak}, "ok"

    monkeypatch.setattr(run, "run_worker", worker)
    monkeypatch.setattr(run, "estimated_bytes", lambda job, measured: 0)
    row = run._first_round(run.TrainJob("vit_tiny_test", "snell8_s0.9", "fp32", warmup=2, steps=4), 60.0, {})
    assert calls == [
        ("default", ["--warmup", "2", "--steps", "4"]),
        ("memory", ["--warmup", "1", "--steps", "1"]),
        ("timed", ["--warmup", "2", "--steps", "4"]),
    ]
    assert (row["peak_mb"], row["peak_default_malloc_mb"], row["step_s_default_malloc"]) == (100.0, 300.0, 2.0)
    assert (row["round_times"], row["status"]) == ([[1.5]], "ok")

    failing.add("memory")
    row = run._first_round(run.TrainJob("vit_tiny_test", "lora8", "fp32", warmup=1, steps=2), 60.0, {})
    assert row["status"] == "failed (exit 137): memory killed"
    assert (row["peak_default_malloc_mb"], row["step_s_default_malloc"], row["trainable_params"]) == (300.0, 2.0, 7)
    assert not {"peak_mb", "step_s_median", "step_s_min", "minor_faults_per_step"} & row.keys()


def test_targets_divide_the_columns_and_rows_their_names_say() -> None:
    """run.targets() on ViT-B/16 rows whose every number differs, so that reading a wrong column (peak for saved,
    pinned for default malloc) or a wrong row shows: a bf16 SNELL-8 row and a 4096x4096 threshold row come first and
    must be passed over (the targets are on fp32 rows and the 11008x4096 shape). Every one of the 14 targets has the
    value its name says."""

    def row(method: str, dtype: str, *numbers: float) -> dict[str, object]:
        columns = ("step_s_median", "step_s_default_malloc", "peak_mb", "peak_default_malloc_mb", "saved_mb")
        values = dict(zip(columns, numbers, strict=True))
        return {"model": "vit_b16", "method": method, "dtype": dtype, "status": "ok", **values}

    train = [
        row("snell8_s0.9", "bf16", 1.0, 1.0, 1.0, 1.0, 1.0),
        row("lora8", "fp32", 4.0, 5.0, 1000.0, 1100.0, 800.0),
        row("snell8_s0.9", "fp32", 6.0, 6.6, 900.0, 990.0, 880.0),
        row("reference_snell8", "fp32", 12.0, 20.0, 1200.0, 1300.0, 950.0),
        row("full", "fp32", 5.0, 5.5, 2000.0, 2200.0, 900.0),
        row("snella8", "fp32", 6.6, 7.0, 945.0, 1000.0, 900.0),
        row("snell32_s0.9", "fp32", 7.2, 7.0, 950.0, 1000.0, 900.0),
    ]
    infer = [{"model": "vit_b16", "variant": "snell merged", "ratio_to_base": 1.01}]
    threshold = [
        {"shape": "4096x4096", "method": "snell threshold", "ratio_to_gemm": 0.9},
        {"shape": "11008x4096", "method": "snell threshold", "ratio_to_gemm": 0.15},
    ]
    got = {goal.name: (round(goal.value, 4), goal.limit) for goal in run.targets(train, infer, threshold)}
    default = "default malloc (history-dependent)"
    assert got == {
        "step time: SNELL-8 s=0.9 / peft LoRA-8": (1.5, 1.25),
        "step time: SNELL-8 s=0.9 / reference-style SNELL-8": (0.5, 0.45),
        f"step time, {default}: SNELL-8 s=0.9 / peft LoRA-8": (1.32, 1.25),
        f"step time, {default}: SNELL-8 s=0.9 / reference-style SNELL-8": (0.33, 0.45),
        "peak memory: SNELL-8 s=0.9 / peft LoRA-8": (0.9, 1.0),
        "peak memory: SNELL-8 s=0.9 / full fine-tuning": (0.45, 0.6),
        f"peak memory, {default}: SNELL-8 s=0.9 / peft LoRA-8": (0.9, 1.0),
        f"peak memory, {default}: SNELL-8 s=0.9 / full fine-tuning": (0.45, 0.6),
        "saved for backward: SNELL-8 s=0.9 / peft LoRA-8": (1.1, 1.02),
        "inference: merged SNELL / base model": (1.01, 1.02),
        "threshold 11008x4096 / one dense GEMM with 2048 tokens": (0.15, 0.2),
        "step time: SNELL-32 s=0.9 / SNELL-8 s=0.9": (1.2, 1.1),
        "step time: SNELLA-8 / SNELL-8 s=0.9": (1.1, 1.1),
        "peak memory: SNELLA-8 / SNELL-8 s=0.9": (1.05, 1.0),
    }


def test_training_rounds_reverse_every_other_round_and_give_each_job_its_rounds(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """run_training with the first round and the workers faked: LoRA-8 and SNELL-8 want 2 rounds, full fine-tuning
    1. Round 2 runs in reverse order (a slow spell lands on every job, not on the last one each round) and only for
    the jobs that asked for it: two extra timed workers, SNELL-8's then LoRA-8's, and rows of 2, 2 and 1 rounds."""

    def first_round(job: run.TrainJob, timeout: float, measured: dict) -> dict:
        row = {"model": job.model, "method": job.method, "dtype": job.dtype, "batch": job.batch, "status": "ok"}
        row.update(peak_mb=1.0, peak_default_malloc_mb=1.0, saved_mb=1.0)
        return {**row, "round_times": [[1.0]], "round_faults": [1.0]}

    later: list[str] = []

    def worker(module: str, args: list[str], timeout: float, env: dict[str, str]) -> tuple[dict, str]:
        later.append(_method_of(args))
        return {"step_times": [2.0], "minor_faults_per_step": 3.0}, "ok"

    monkeypatch.setattr(run, "_first_round", first_round)
    monkeypatch.setattr(run, "run_worker", worker)
    jobs = [
        run.TrainJob("vit_b16", "lora8", "fp32", 1, 1, rounds=2),
        run.TrainJob("vit_b16", "snell8_s0.9", "fp32", 1, 1, rounds=2),
        run.TrainJob("vit_b16", "full", "fp32", 1, 1),
    ]
    rows = run.run_training(jobs, 60.0)
    capsys.readouterr()
    assert later == ["snell8_s0.9", "lora8"]
    assert [(row["method"], row["rounds"], row["steps"]) for row in rows] == [
        ("lora8", 2, 2),
        ("snell8_s0.9", 2, 2),
        ("full", 1, 1),
    ]


def test_a_workers_row_is_the_json_on_its_last_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """run_worker parses the JSON on the worker's last stdout line, as its docstring says: a worker that prints a
    progress line first still gives its row instead of a JSONDecodeError that loses the run."""
    (tmp_path / "fake_worker_module.py").write_text("print('round 1/1 done')\nprint('{\"step_s\": 1.5}')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert run.run_worker("fake_worker_module", [], 60.0, {}) == ({"step_s": 1.5}, "ok")


def test_llm_scale_times_the_median_step_and_projects_32_layers_from_2_and_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """timed_training reports the median step (2 s of 1, 2 and 6) and the peak and loaded RSS in MB. drive projects
    each column to 32 layers from the 2- and 1-layer runs (5 s and 3 s: per layer 2, rest 1, so 65 s; peak 6500,
    saved 650 MB), not from the runs swapped, and prints SNELL-8 / LoRA-8's ratios at 2 layers."""
    from benchmarks import llm_scale

    monkeypatch.setattr(llm_scale, "run_steps", _three_steps)
    row = llm_scale.timed_training(nn.Linear(3, 2), None, 1, 3)
    assert (row["step_s"], row["peak_mb"], row["loaded_mb"], row["trainable_params"]) == (2.0, 50.0, 300.0, 8)

    values = {
        ("snell8", "2"): (5.0, 500.0, 50.0),
        ("snell8", "1"): (3.0, 300.0, 30.0),
        ("lora8", "2"): (4.0, 400.0, 40.0),
        ("lora8", "1"): (2.5, 250.0, 25.0),
    }

    def measure(module: str, args: list[str], warmup: int, steps: int, timeout: float) -> tuple[dict, str]:
        step, peak, saved = values[_method_of(args), args[args.index("--layers") + 1]]
        return {"step_s": step, "step_times": [step], "peak_mb": peak, "saved_mb": saved}, "ok"

    monkeypatch.setattr(llm_scale, "measure", measure)
    rows = llm_scale.drive(["snell8", "lora8"], 256, 1, 1, 60.0)
    snell8 = next(row for row in rows if row["method"] == "snell8")
    assert (snell8["step_s_32"], snell8["peak_mb_32"], snell8["saved_mb_32"]) == (65.0, 6500.0, 650.0)
    assert "snell8 / lora8 (2 layers): step 1.250, peak 1.250" in capsys.readouterr().out


def test_llm_step_commands_pass_their_flags_to_the_workers_and_judge_their_targets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """smollm2_step's command line reaches its workers: --rounds 2 with two methods runs four workers in turns, each
    with the given --batch and --seq. llm_scale --rounds with LoRA-32 and SNELL-32 judges their target on the peak
    (<= 1.0), the step ratio shown without a target."""
    from benchmarks import llm_scale, smollm2_step

    calls: list[list[str]] = []

    def worker(module: str, args: list[str], *rest: object) -> tuple[dict, str]:
        calls.append(list(args))
        step, peak = {"lora8": (1.0, 1.0), "snell8": (1.0, 1.0), "lora32": (2.0, 100.0), "snell32": (3.0, 90.0)}[
            _method_of(args)
        ]
        return {"step_s": step, "step_times": [step], "peak_mb": peak}, "ok"

    monkeypatch.setattr(in_turns, "measure", lambda module, args, warmup, steps, timeout: worker(module, args))
    monkeypatch.setattr(run, "run_worker", worker)
    argv = ["--methods", "lora8", "snell8", "--rounds", "2", "--batch", "4", "--seq", "128"]
    monkeypatch.setattr(sys, "argv", ["smollm2_step", *argv])
    smollm2_step.main()
    assert [_method_of(args) for args in calls] == ["lora8", "snell8", "snell8", "lora8"]
    assert all(args[args.index("--batch") :][:4] == ["--batch", "4", "--seq", "128"] for args in calls)

    monkeypatch.setattr(sys, "argv", ["llm_scale", "--methods", "lora32", "snell32", "--rounds", "1", "--seq", "8"])
    llm_scale.main()
    assert "snell32 / lora32: step 1.500, peak 0.900 (target <= 1.0: PASS)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        ("profile_step", ["--method", "snell8_s0.9", "--batch", "0"], "--batch: expected an integer >= 1, got '0'"),
        ("profile_step", ["--method", "snell8_s0.9", "--sort", "bogus"], "--sort: invalid choice: 'bogus'"),
        ("profile_step", ["--method", "snell8", "--llama-layers", "0"], "--llama-layers: expected an integer >= 1"),
        ("fused_layer", ["--sparsity", "1.5"], "--sparsity: expected a sparsity in [0, 1), got '1.5'"),
        ("fused_layer", ["--rank", "7"], "r must be divisible by num_pieces for piecewise_linear, got r=7"),
        ("fused_forward", ["--ranks", "8", "7"], "r must be divisible by num_pieces"),
        ("llm_study", ["--jobs", "0"], "--jobs: expected an integer >= 1, got '0'"),
        ("run", ["--timeout", "-1"], "--timeout: expected a number > 0, got '-1'"),
        ("gpu.cli", ["--smoke", "--budget-s", "-5"], "--budget-s: expected a number >= 0, got '-5'"),
        ("peak_trace", ["--method", "lora8", "--batch", "0"], "--batch: expected an integer >= 1, got '0'"),
        ("llm_memory", ["--jobs", "lora8:bogus"], "'lora8:bogus': loss 'bogus' is not plain or chunked"),
        ("llm_memory", ["--jobs", "bogus:plain:ckpt:x"], "method 'bogus' is not eval or one of"),
    ],
)
def test_a_benchmark_refuses_a_bad_value_before_any_work(
    module: str, argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Each ended in a traceback deep inside (a negative batch, a rank the library refuses, an unknown sort key), ran
    silently with a meaningless setting (a negative timeout or budget, --fused-passes -1), or reported a mistyped
    job's failure as a row and exited 0."""
    import importlib

    monkeypatch.setattr(sys, "argv", [module, *argv])
    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        main(*([argv] if "argv" in main.__code__.co_varnames[: main.__code__.co_argcount] else []))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_families_refuses_an_unknown_family_name(capsys: pytest.CaptureFixture) -> None:
    """--only with a mistyped family printed "0 adapted" and passed."""
    from benchmarks import families

    assert families.main(["--libraries", "timm", "--only", "no_such_family"]) == 2
    assert "families: error: --only no_such_family: no such family in timm" in capsys.readouterr().err
