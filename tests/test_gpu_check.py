"""benchmarks.gpu cannot rot while no GPU is at hand: its smoke run goes through every part on the CPU."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu  # noqa: E402

# A GPU machine may have nothing beyond torch, timm, transformers, peft, accelerate and safetensors: the smoke
# run imports everything with these blocked, so an import of any of them anywhere on its path fails the test.
_BLOCKED = ("pytest", "_pytest", "matplotlib", "sklearn", "numba")
_RUN_BLOCKED = f"""
import runpy, sys
class Hide:
    # wraps every finder: the blocked packages look absent (find_spec None, import ModuleNotFoundError)
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {_BLOCKED!r}:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)
sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
sys.argv = ["benchmarks.gpu", *sys.argv[1:]]
runpy.run_module("benchmarks.gpu", run_name="__main__")
"""


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_smoke_run_passes_every_check_and_writes_every_table_without_test_or_plot_packages(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-c", _RUN_BLOCKED, "--smoke", "--out", str(tmp_path)],
        cwd=tmp_path,  # not the repo root: the script must find its files itself
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checks = _rows(tmp_path / "checks.csv")
    # on the CPU the host-sync checks cannot check (no set_sync_debug_mode): n/a, with the steps run
    expected = {row["check"]: "n/a" if row["check"].startswith("no host sync") else "PASS" for row in checks}
    assert len(checks) > 40 and {row["check"]: row["status"] for row in checks} == expected
    assert any("fullgraph" in row["check"] for row in checks)
    selection = _rows(tmp_path / "selection.csv")
    methods = {row["method"] for row in selection}
    assert {"kthvalue", "topk", "torch.quantile", "sampled bracket"} <= methods
    assert all(row["exact"] == "True" for row in selection if row["method"] != "torch.quantile")
    layers = _rows(tmp_path / "layers.csv")
    assert [row["blocks"] for row in layers] == ["8", "1"] and all(float(row["ms"]) > 0 for row in layers)
    # the Triton parts run under the interpreter: conftest.py set TRITON_INTERPRET=1, which the run inherits
    assert sum(row["check"].startswith("triton") for row in checks) == 18 + 10 + 3 + 3  # piecewise, mixk, τ, merge
    kernels = _rows(tmp_path / "kernels.csv")
    layers = [
        ("96x80", "piecewise_linear", "8"),
        ("130x64", "piecewise_linear", "8"),
        ("130x64", "piecewise_linear", "32"),
    ]
    layers.append(("96x80", "mixk", "8"))
    assert [(row["shape"], row["kernel"], row["rank"], row["path"]) for row in kernels] == [
        (*layer, path) for layer in layers for path in ("dense layer, weight trains", "torch", "triton")
    ]
    assert all(float(row["ms"]) > 0 for row in kernels)
    training = _rows(tmp_path / "training.csv")
    assert {(row["model"], row["method"]) for row in training} == {
        *(("vit_tiny_test", m) for m in gpu.VIT_METHODS),
        *(("llama_tiny_2_layers", m) for m in ("snell8_s0.9", "snell32_s0.9", "lora8", "full")),
    }
    assert all(row["status"] == "ok" and float(row["step_ms_median"]) > 0 for row in training)
    markdown = (tmp_path / "results.md").read_text()
    assert "SMOKE RUN" in markdown and "UNFINISHED" not in markdown and "`_TRITON_MIN_NUMEL` these" in markdown
    assert "Command: `" in markdown and "--smoke" in markdown
    assert "snell commit" in markdown and "| torch |" in markdown
    assert (
        "| 130x64 | bfloat16 | piecewise_linear | triton |"
        in markdown.split("One layer's SNELL-32 over its SNELL-8")[1]
    )
    assert "skipped: nothing" in done.stdout
    for target in gpu.targets(gpu.Run("cpu", True, 0)):
        assert target.name in markdown


def test_budget_skips_what_does_not_fit_and_lists_it(capsys) -> None:
    run = gpu.Run("cuda", smoke=False, budget_s=20.0)
    assert run.fits("small", 5.0)
    assert not run.fits("too big", 60.0)
    assert run.parts == [{"part": "too big", "estimate_s": 60.0, "wall_s": None, "status": run.parts[0]["status"]}]
    assert run.parts[0]["status"].startswith("skipped: estimated 60 s")
    assert "[too big] skipped" in capsys.readouterr().out


def test_training_worker_round_trips_through_a_fresh_process() -> None:
    # The fresh process imports everything and answers; a failing configuration comes back as a row with its
    # reason (rows that train are the smoke run's, in-process).
    job = {"model": "vit_tiny_test", "family": "vit", "method": "no_such_method", "device": "cpu", "smoke": True}
    rows = gpu._run_worker({**job, "configs": [["fp32", 1]], "warmup": 0, "steps": 1}, timeout=300)
    assert [row["status"] for row in rows] == ["error: KeyError: 'no_such_method'"]
    stopped = gpu._run_worker({**job, "configs": [["fp32", 1], ["bf16", 2]], "warmup": 0, "steps": 1}, timeout=0.5)
    assert [(row["dtype"], row["status"]) for row in stopped] == [
        ("fp32", "worker stopped at the end of the budget (0.5 s)"),
        ("bf16", "worker stopped at the end of the budget (0.5 s)"),
    ]


def test_sampled_bracket_is_exact_where_the_sample_hits_and_where_it_misses() -> None:
    torch.manual_seed(0)
    values = torch.randn(400_000)
    for k in (1, 4_000, 40_000, 200_000, 400_000):
        assert torch.equal(gpu.sampled_bracket(values, k), values.abs().topk(k).values[-1])
    spiky = torch.zeros(600_000)
    spiky[:100] = 1.0  # the sample sees only zeros: the bracket holds no entry and kthvalue answers
    assert gpu.sampled_bracket(spiky, 100).item() == 1.0


def test_measured_table_row_names_the_fastest_exact_method_from_each_size_on() -> None:
    run = gpu.Run("cuda", smoke=False, budget_s=0)

    def rows(shape: str, numel: int, times: dict[str, float]) -> list[dict]:
        return [{"shape": shape, "numel": numel, "method": m, "ms": t, "exact": True} for m, t in times.items()]

    run.selection = [
        *rows("a", 100, {"library threshold (topk)": 1.0, "kthvalue": 1.0, "topk": 2.0, "sampled bracket": 0.1}),
        *rows("b", 1000, {"kthvalue": 3.0, "topk": 2.0}),
        *rows("c", 10_000, {"kthvalue": 9.0, "topk": 5.0}),
    ]
    # the sampled bracket is fastest at "a" but reads the host: never a table entry
    assert gpu.measured_table_row(run) == ((0, "kthvalue"), (1000, "topk"))


def test_triton_min_numel_is_the_smallest_size_from_which_triton_was_faster_at_every_size_above() -> None:
    def rows(numel: int, torch_ms: float, triton_ms: float | None) -> list[dict]:
        return [
            {"numel": numel, "path": "dense layer, weight trains", "ms": 0.1},
            {"numel": numel, "path": "torch", "ms": torch_ms},
            {"numel": numel, "path": "triton", "ms": triton_ms},
        ]

    assert gpu.triton_min_numel([*rows(10, 1.0, 0.5), *rows(100, 2.0, 3.0), *rows(1000, 5.0, 4.0)]) == 1000
    assert gpu.triton_min_numel([*rows(10, 1.0, 0.5), *rows(100, 2.0, 1.0), *rows(1000, 5.0, 4.0)]) == 10
    assert gpu.triton_min_numel([*rows(10, 1.0, 0.5), *rows(1000, 5.0, 6.0)]) is None
    assert gpu.triton_min_numel(rows(10, 1.0, None)) is None  # the Triton path could not run
    mixk = [{**row, "kernel": "mixk"} for row in rows(1000, 5.0, 6.0)]  # one bound for both kernels
    assert gpu.triton_min_numel([*rows(10, 1.0, 0.5), *rows(1000, 5.0, 4.0), *mixk]) is None
    wide = [{**row, "rank": 32} for row in rows(1000, 5.0, 6.0)]  # and for every rank
    assert gpu.triton_min_numel([*rows(10, 1.0, 0.5), *rows(1000, 5.0, 4.0), *wide]) is None


def test_rank_costs_pair_each_layers_r32_with_its_r8_per_path() -> None:
    from benchmarks.gpu.triton_check import rank_costs

    def row(shape: str, path: str, rank: int, ms: float | None) -> dict:
        return {"shape": shape, "dtype": "bfloat16", "kernel": "piecewise_linear", "path": path, "rank": rank, "ms": ms}

    rows = [row("4x4", "dense layer, weight trains", 8, 1.0), row("4x4", "torch", 8, 2.0), row("4x4", "torch", 32, 3.0)]
    rows += [row("4x4", "triton", 8, 1.0), row("4x4", "triton", 32, 1.5), row("8x8", "torch", 8, 2.0)]
    rows += [row("8x8", "triton", 8, 1.0), row("8x8", "triton", 32, None)]  # the Triton path could not run at r = 32
    assert rank_costs(rows) == [
        ["4x4", "bfloat16", "piecewise_linear", "torch", 2.0, 3.0, 1.5],
        ["4x4", "bfloat16", "piecewise_linear", "triton", 1.0, 1.5, 1.5],
    ]


def test_only_a_whole_gpu_run_writes_into_the_committed_results(tmp_path: Path) -> None:
    """The result files are written from one run alone: a rerun of some parts (or a smoke run) goes to a fresh temp
    folder, or the committed folder would lose every other part's rows; ``--out`` always wins."""
    from benchmarks.gpu.cli import FULL_OUT, results_folder

    assert results_folder(None, smoke=False, every_part=True) == FULL_OUT
    for smoke, every_part in ((False, False), (True, True), (True, False)):
        folder = results_folder(None, smoke=smoke, every_part=every_part)
        assert folder != FULL_OUT and folder.is_dir() and not any(folder.iterdir())
        folder.rmdir()
    assert results_folder(tmp_path, smoke=False, every_part=False) == tmp_path
