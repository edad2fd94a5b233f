"""One prepared check of SNELL on a CUDA device: correctness first, then selection, speed and memory.

    PYTHONPATH=src python -m benchmarks.gpu                  # on a GPU machine: benchmarks/results/gpu/
    PYTHONPATH=src python -m benchmarks.gpu --budget-s 300   # skips the parts that do not fit, and lists them
    PYTHONPATH=src python -m benchmarks.gpu --smoke          # tiny sizes on the CPU, into a temp folder

Needs only torch, timm, transformers, peft, accelerate and safetensors (no pytest, no matplotlib, no network).
Parts run in this order, each only if its estimated time still fits in ``--budget-s``: the fused function
against the naive formulas (tests/checks.py, the test suite's own checks) for every kernel and mode in fp32
and under bf16 autocast, kept counts, merge/unmerge, save/load and dropout; no host synchronisation in a
training step; torch.compile graph breaks; the exact k-th-largest selection against torch's and one GEMM;
one SNELL layer per ΔW row-block size; then training steps (each model × method in its own process, memory
reset per configuration) on ViT-B/16, LLaMA-2-7B-shaped layers, ViT-L/16 and ViT-H/14. The estimates are
guesses for an H200 until a run records each part's wall time (parts.csv).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import llama
from benchmarks.methods import METHODS, MODELS, NUM_CLASSES
from benchmarks.report import REPO, Target, _version, command_line, fmt, markdown_table, write_csv
from benchmarks.step import make_step
from benchmarks.threshold import piecewise_delta, quantile_call
from snell import function, sparsify
from snell.layers import init_factors

FULL_OUT = REPO / "benchmarks" / "results" / "gpu"
DEFAULT_BUDGET_S = 450.0  # 8 minutes less time for imports, CUDA start-up and writing the results
SPARSITY = 0.9
TOKENS = 2048
VIT_METHODS = ("snell8_s0.9", "lora8", "full", "reference_snell8")
CONFIGS = (("bf16", 64), ("bf16", 8), ("fp32", 64), ("fp32", 8))
LLAMA_SEQUENCE = 512
SELECTION_SHAPES = ((768, 768), (3072, 768), (4096, 4096), (11008, 4096), (4096, 14336))
CHECK_COLUMNS = ("check", "status", "seconds", "detail")
SELECTION_COLUMNS = (
    "shape",
    "numel",
    "method",
    "ms",
    "exact",
    "gemm_fp32_ms",
    "ratio_to_gemm_fp32",
    "gemm_bf16_ms",
    "ratio_to_gemm_bf16",
    "note",
)
TRAIN_COLUMNS = (
    "model",
    "method",
    "dtype",
    "batch",
    "trainable_params",
    "warmup",
    "steps",
    "step_ms_median",
    "step_ms_min",
    "peak_mb",
    "loaded_mb",
    "status",
)
PART_COLUMNS = ("part", "estimate_s", "wall_s", "status")
LAYER_COLUMNS = ("shape", "block_entries", "blocks", "ms", "ratio_to_dense", "note")
LAYER_SHAPES = ((3072, 768), (11008, 4096))


@dataclass
class Run:
    """What one run of the check has done so far: the rows of every table and the parts it skipped."""

    device: str
    smoke: bool
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    checks: list[dict[str, Any]] = field(default_factory=list)
    selection: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    parts: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    save: Callable[[], object] = lambda: None  # rewrites the result files: a killed run keeps what it measured

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def fits(self, name: str, estimate_s: float) -> bool:
        """Whether ``name`` fits in what is left of the budget; records it as skipped if not."""
        if self.smoke or estimate_s <= self.left_s():
            return True
        status = f"skipped: estimated {estimate_s:.0f} s, {max(self.left_s(), 0):.0f} s of the budget left"
        self.parts.append({"part": name, "estimate_s": estimate_s, "wall_s": None, "status": status})
        print(f"[{name}] {status}", flush=True)
        return False


@functools.cache
def _load_test_checks():
    """tests/checks.py, the test suite's device-independent checks (tests/ is not a package: loaded by path)."""
    tests = REPO / "tests"
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))  # checks.py imports its neighbour naive.py
    spec = importlib.util.spec_from_file_location("snell_test_checks", tests / "checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def once_ms(fn: Callable[[], object], device: str) -> float:
    """Milliseconds of one call: on a GPU between CUDA events recorded before and after it (the device's
    timeline, including any wait for the host to launch kernels), the wall clock elsewhere."""
    if device != "cuda":
        began = time.perf_counter()
        fn()
        return (time.perf_counter() - began) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def timed_ms(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after one warm-up call."""
    fn()
    _synchronize(device)
    return statistics.median(once_ms(fn, device) for _ in range(repeats))


@contextlib.contextmanager
def _accelerator_path(device: str) -> Iterator[None]:
    """On the CPU (smoke runs), take the accelerator's code path so that the parts check what a GPU runs."""
    with sparsify.device_path_on_cpu() if device == "cpu" else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """TF32 off for the comparisons: they check SNELL's maths, not TF32's 10-bit rounding of convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _record(run: Run, name: str, fn: Callable[[], str | None]) -> None:
    """Run one check; a failure is a FAIL row with its message, never an abort of the whole run."""
    began = time.monotonic()
    try:
        detail = fn() or ""
        status = "n/a" if detail.startswith("n/a") else "PASS"
    except Exception as err:  # every failure becomes a row of the report
        detail, status = f"{type(err).__name__}: {' | '.join(str(err).strip().splitlines()[:4])[:400]}", "FAIL"
    run.checks.append({"check": name, "status": status, "seconds": time.monotonic() - began, "detail": detail})
    print(f"  {status} {name} {detail}", flush=True)


def part_correctness(run: Run) -> None:
    """The fused function against plain autograd on the naive formulas, then the model-level checks."""
    checks = _load_test_checks()
    device = run.device
    with _accelerator_path(device), _no_tf32():
        for precision, dtype, autocast in (
            ("fp32", torch.float32, None),
            ("bf16 autocast", torch.float32, torch.bfloat16),
        ):
            for spec in checks.CASES:
                inputs = checks.make_inputs(spec, dtype=dtype, device=device)
                _record(
                    run,
                    f"fused = naive, {precision}: {checks.spec_id(spec)}",
                    lambda spec=spec, inputs=inputs, autocast=autocast: checks.assert_matches_naive(
                        spec, inputs, autocast
                    ),
                )
        big = checks.make_spec(shape=(900, 700), groups=3, sparsity=0.9)
        _record(
            run, f"fused = naive, fp64, several row blocks: {checks.spec_id(big)}", lambda: _several_blocks(big, device)
        )
        for spec in checks.DROPOUT_CASES:
            _record(
                run,
                f"dropout branch = naive with the same mask, fp64: {checks.spec_id(spec)}",
                lambda spec=spec: checks.assert_dropout_matches_naive(spec, 0.3, True, device),
            )
        generator = torch.Generator().manual_seed(0)
        shapes = ((3, 64, 48), (1, 3072, 768)) + (() if run.smoke else ((1, 11008, 4096),))
        for shape in shapes:
            delta = torch.randn(shape, generator=generator).to(device)
            for s in (0.3, 0.9, 0.99):
                _record(
                    run,
                    f"kept count = round((1 − s)·N): {'x'.join(map(str, shape))} s={s}",
                    lambda delta=delta, s=s: checks.assert_keeps_exactly(delta, s),
                )
        for dtype in (torch.float32, torch.bfloat16):
            values = torch.randn(2, 300_000, generator=generator).to(device, dtype)
            for k in (1, 30_000, 150_001, 300_000):
                _record(
                    run,
                    f"every selection method exact: 2x300000 {dtype} k={k}",
                    lambda values=values, k=k: checks.assert_selection_is_exact(values, k, True),
                )
        depth = 1 if run.smoke else 12
        merge = checks.check_merge_unmerge_disable_and_unload
        _record(run, "merge / unmerge / disable / unload", lambda: merge(device, depth))
        with tempfile.TemporaryDirectory() as folder:
            _record(run, "save / load into a fresh model", lambda: checks.check_save_load(Path(folder), device, depth))
        reproducible = checks.check_dropout_is_reproducible
        _record(run, "dropout and drop-path reproducible from the seed", lambda: reproducible(device, min(depth, 2)))


def _several_blocks(spec, device: str) -> None:
    """A q/k/v matrix whose groups span several row blocks (blocks of 2^16 entries, as the unit test sets them)."""
    checks = _load_test_checks()
    saved = function._BLOCK_ENTRIES
    function._BLOCK_ENTRIES = 1 << 16
    try:
        checks.assert_matches_naive(spec, checks.make_inputs(spec, tokens=5, device=device))
    finally:
        function._BLOCK_ENTRIES = saved


def _tiny_snell_vit(device: str, dropout: float, depth: int):
    checks = _load_test_checks()
    import snell

    model = checks.tiny_vit(depth=depth, device=device)
    config = snell.SnellConfig(sparsity=0.9, dropout=dropout, drop_path=dropout, modules_to_save=["head"])
    return snell.get_snell_model(model, config).train()


def _forward_backward(model, x: torch.Tensor, autocast: bool) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().mean().backward()


def part_sync(run: Run) -> None:
    """Forward and backward under ``torch.cuda.set_sync_debug_mode("error")``: any host read of a device value
    (τ pulled to the host, a boolean index, nonzero) raises. On the CPU the steps run unchecked."""
    import snell

    device = run.device

    def check(model, x: torch.Tensor, autocast: bool) -> str | None:
        _forward_backward(model, x, autocast)  # warm-up: lazy initialisation may synchronise once
        _synchronize(device)
        if device != "cuda":
            _forward_backward(model, x, autocast)
            return "n/a: no CUDA device (the step ran unchecked)"
        torch.cuda.set_sync_debug_mode("error")
        try:
            _forward_backward(model, x, autocast)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return None

    x = torch.randn(4, 3, 32, 32, device=device)
    for dropout in (0.0, 0.1):
        for autocast in (False, True):
            model = _tiny_snell_vit(device, dropout, 1 if run.smoke else 2)
            name = f"no host sync: tiny ViT, dropout {dropout}, {'bf16 autocast' if autocast else 'fp32'}"
            _record(run, name, lambda model=model, autocast=autocast: check(model, x, autocast))
    out_features, in_features = (172, 64) if run.smoke else (11008, 4096)
    layer = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False, device=device))
    snell.get_snell_model(layer, snell.SnellConfig(target_modules=["0"], sparsity=0.9))
    tokens = torch.randn(2, 16, in_features, device=device)
    _record(run, f"no host sync: {out_features}x{in_features} layer, bf16 autocast", lambda: check(layer, tokens, True))


def _compile_subject(run: Run, dropout: float) -> torch.nn.Module:
    """A tiny SNELL ViT on a device; in a smoke run a two-layer MLP (dynamo takes a minute over a ViT on a busy CPU)."""
    if not run.smoke:
        return _tiny_snell_vit(run.device, dropout, 2)
    import snell

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 10))
    config = snell.SnellConfig(target_modules=["0", "2"], sparsity=0.9, dropout=dropout, drop_path=dropout)
    return snell.get_snell_model(model, config).train()


def part_compile(run: Run) -> None:
    """torch._dynamo.explain over a SNELL model's forward (which traces FusedSnell's backward too), and
    torch.compile(fullgraph=True) through forward and backward: the device path must not break the graph."""
    device = run.device
    x = torch.randn(4, 3, 32, 32, device=device) if not run.smoke else torch.randn(4, 48, device=device)

    def explain(dropout: float, autocast: bool, must_be_whole: bool) -> str:
        torch._dynamo.reset()
        model = _compile_subject(run, dropout)

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                return model(x)

        explained = torch._dynamo.explain(forward)(x)
        reasons = sorted({reason.reason.splitlines()[0][:120] for reason in explained.break_reasons})
        detail = f"{explained.graph_count} graphs, {explained.graph_break_count} breaks" + (
            f" ({'; '.join(reasons)})" if reasons else ""
        )
        if must_be_whole and explained.graph_break_count:
            raise AssertionError(detail)
        return detail

    def fullgraph() -> None:
        torch._dynamo.reset()
        model = _compile_subject(run, 0.0)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        compiled(x).float().square().mean().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    subject = "two-layer SNELL MLP" if run.smoke else "tiny SNELL ViT"
    torch._logging.set_logs(dynamo=logging.ERROR)  # explain reports the breaks; no warning per break
    with _accelerator_path(device):
        _record(run, f"torch._dynamo.explain: {subject} forward, fp32", lambda: explain(0.0, False, True))
        _record(run, f"torch._dynamo.explain: {subject} forward, bf16 autocast", lambda: explain(0.0, True, True))
        name = f"torch._dynamo.explain: {subject} forward, dropout 0.1 (reported)"
        _record(run, name, lambda: explain(0.1, False, False))
        _record(run, f"torch.compile(fullgraph=True, aot_eager): {subject} forward + backward", fullgraph)
    torch._dynamo.reset()
    torch._logging.set_logs()


def sampled_bracket(values: torch.Tensor, k: int, sample_size: int = 1 << 16) -> torch.Tensor:
    """The k-th largest |entry| of a flat tensor from a sample's bracket, counted and selected with torch on the
    device. Exact (falls back to kthvalue when the sample misses), but the band's size is data-dependent: two host
    reads, so the library cannot use it in a training step. Timed here to see what that would buy."""
    magnitude = values.abs()
    n = magnitude.numel()
    q = 1.0 - k / n
    margin = 6.0 * math.sqrt(max(q * (1.0 - q), 1.0 / sample_size) / sample_size) + 2.0 / sample_size
    positions = torch.randint(n, (sample_size,), device=values.device, generator=None)
    sample = magnitude[positions]
    low = max(math.floor((q - margin) * sample_size), 0)
    high = min(math.ceil((q + margin) * sample_size), sample_size - 1)
    lower, upper = torch.kthvalue(sample, low + 1).values, torch.kthvalue(sample, high + 1).values
    above = int((magnitude > upper).sum())
    band = magnitude[(magnitude > lower) & (magnitude <= upper)]
    position = band.numel() - (k - above)
    if not 0 <= position < band.numel():
        return torch.kthvalue(magnitude, n - k + 1).values
    return torch.kthvalue(band, position + 1).values


def selection_rows(m: int, n: int, device: str, repeats: int) -> list[dict[str, Any]]:
    """Every way to find τ for a piecewise-linear ΔW of (m, n), timed against one GEMM of that matrix."""
    delta = piecewise_delta(m, n, device=device)
    flat = delta.flatten(1)
    numel = m * n
    k = sparsify.keep_count(numel, SPARSITY)
    exact = torch.kthvalue(flat.abs()[0].float(), numel - k + 1).values.reshape(1)
    x = torch.randn(TOKENS, n, device=device)
    gemm_fp32 = timed_ms(lambda: F.linear(x, delta[0]), device, repeats)
    x_bf16, w_bf16 = x.bfloat16(), delta[0].bfloat16()
    gemm_bf16 = timed_ms(lambda: F.linear(x_bf16, w_bf16), device, repeats)
    chosen = sparsify.selection_method(device, numel)
    candidates: dict[str, tuple[Callable[[], torch.Tensor] | str, str]] = {
        f"library threshold ({chosen})": (lambda: sparsify.threshold(delta, SPARSITY), "what a training step runs"),
    }
    for name, select in sparsify.SELECTION_METHODS.items():
        if name == "banded" and device != "cpu":
            continue
        candidates[name] = (lambda select=select: select(flat, k, True), "library method")
    magnitude = flat.abs()[0]
    note = "interpolates: not the k-th value itself"
    if numel > 1 << 24:  # this torch may take it; torch 1.12, which the reference code ran on, did not
        note += "; torch 1.12 refused > 2^24 entries"
    candidates["torch.quantile"] = (quantile_call(magnitude), note)
    candidates["sampled bracket"] = (lambda: sampled_bracket(flat[0], k), "two host reads per call")
    rows = []
    for name, (fn, note) in candidates.items():
        row: dict[str, Any] = {
            "shape": f"{m}x{n}",
            "numel": numel,
            "method": name,
            "gemm_fp32_ms": gemm_fp32,
            "gemm_bf16_ms": gemm_bf16,
            "note": note,
        }
        if isinstance(fn, str):
            row.update(ms=None, exact=None, ratio_to_gemm_fp32=None, ratio_to_gemm_bf16=None, note=fn)
        else:
            got = torch.as_tensor(fn()).reshape(-1)[:1].float()
            seconds = timed_ms(fn, device, repeats)
            row.update(
                ms=seconds,
                exact=bool(torch.equal(got, exact)),
                ratio_to_gemm_fp32=seconds / gemm_fp32,
                ratio_to_gemm_bf16=seconds / gemm_bf16,
            )
        rows.append(row)
        print(f"  {row['shape']} {name}: {fmt(row['ms'])} ms, exact {row['exact']}", flush=True)
    return rows


def fastest_exact(rows: Sequence[dict[str, Any]], sync_free: bool) -> dict[str, Any] | None:
    """The fastest exact selection of one shape's rows (library methods only if ``sync_free``)."""
    pool = [r for r in rows if r["exact"] and r["ms"] is not None and not r["method"].startswith("library")]
    if sync_free:
        pool = [r for r in pool if r["method"] in sparsify.SELECTION_METHODS]
    return min(pool, key=lambda r: r["ms"], default=None)


def part_selection(run: Run) -> None:
    shapes = ((64, 48), (512, 300)) if run.smoke else SELECTION_SHAPES
    for m, n in shapes:
        rows = selection_rows(m, n, run.device, repeats=2 if run.smoke else 10)
        run.selection.extend(rows)


def layer_rows(m: int, n: int, device: str, tokens: int, block_entries: Sequence[int | None], repeats: int):
    """One SNELL-8 s = 0.9 layer's forward + backward (bf16 autocast) for each size of the row blocks ΔW is
    built in (None: the whole matrix at once), against a dense layer whose weight trains (full fine-tuning's
    three GEMMs). The blocks keep a CPU's temporaries in cache; on a GPU they mostly multiply kernel launches."""
    torch.manual_seed(0)
    x = torch.randn(tokens, n, device=device, requires_grad=True)
    weight = torch.randn(m, n, device=device) / math.sqrt(n)
    dense = weight.clone().requires_grad_()
    a, b = torch.empty(n, 8, device=device), torch.empty(m, 8, device=device)
    init_factors(a, b, num_pieces=2)
    a.requires_grad_()
    b.requires_grad_()
    coefficients = torch.tensor([0.1, -0.1], device=device)
    spec = function.SnellSpec("linear", (m, n), "piecewise_linear", 2, "reference", SPARSITY)
    grad = torch.randn(tokens, m, device=device, dtype=torch.bfloat16)

    def snell_layer() -> None:
        x.grad = a.grad = b.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):
            out = function.FusedSnell.apply(x.to(torch.bfloat16), weight, None, a, b, coefficients, spec)
        out.backward(grad)

    def dense_layer() -> None:
        x.grad = dense.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):
            out = F.linear(x, dense)
        out.backward(grad)

    dense_ms = timed_ms(dense_layer, device, repeats)
    rows = []
    saved = function._BLOCK_ENTRIES
    try:
        for entries in block_entries:
            function._BLOCK_ENTRIES = entries or m * n
            ms = timed_ms(snell_layer, device, repeats)
            rows_per_block = max(1, function._BLOCK_ENTRIES // n)
            row = {
                "shape": f"{m}x{n}",
                "block_entries": entries or "whole matrix",
                "blocks": math.ceil(m / rows_per_block),
                "ms": ms,
                "ratio_to_dense": ms / dense_ms,
                "note": "the library's setting" if entries == saved else "",
            }
            rows.append(row)
            print(f"  {m}x{n} blocks of {row['block_entries']} entries: {fmt(ms)} ms, {fmt(ms / dense_ms)}x dense")
    finally:
        function._BLOCK_ENTRIES = saved
    return rows


def part_blocks(run: Run) -> None:
    """Does ΔW's row-block size, chosen for a CPU's cache, cost a GPU? One layer per block size."""
    if run.smoke:
        run.layers.extend(layer_rows(256, 128, run.device, 64, (1 << 12, None), repeats=2))
        return
    for m, n in LAYER_SHAPES:
        run.layers.extend(layer_rows(m, n, run.device, TOKENS, (1 << 20, 1 << 22, 1 << 24, None), repeats=10))


def _build_for_training(
    job: dict[str, Any], dtype: str, batch: int
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(model, inputs, targets) of one training configuration, built directly on the device."""
    device = job["device"]
    if job["family"] == "llama":
        shape = llama.TINY if job["smoke"] else llama.LLAMA2_7B
        model = llama.CausalLMLoss(llama.METHODS[job["method"]](llama.build(2, shape, device, torch.bfloat16)))
        ids = torch.randint(shape["vocab_size"], (batch, 16 if job["smoke"] else LLAMA_SEQUENCE), device=device)
        return model.train(), ids, llama.next_tokens(ids)
    spec = MODELS[job["model"]]
    with torch.device(device):
        model = METHODS[job["method"]].build(spec.create()).train()
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, device=device)
    return model, images, torch.randint(NUM_CLASSES, (batch,), device=device)


def _train_one(job: dict[str, Any], dtype: str, batch: int) -> dict[str, Any]:
    """Median step time and peak memory of one configuration; peak counted from after the model is built."""
    device = job["device"]
    row = {"model": job["model"], "method": job["method"], "dtype": dtype, "batch": batch}
    row.update(warmup=job["warmup"], steps=job["steps"])
    torch.manual_seed(0)
    model, inputs, targets = _build_for_training(job, dtype, batch)
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step = make_step(model, inputs, targets, dtype, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        row["loaded_mb"] = torch.cuda.memory_allocated() / 2**20
    for _ in range(job["warmup"]):
        step()
    _synchronize(device)
    times = [once_ms(step, device) for _ in range(job["steps"])]
    row.update(step_ms_median=statistics.median(times), step_ms_min=min(times), status="ok")
    if device == "cuda":
        row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def train_worker(
    job: dict[str, Any], emit: Callable[[dict[str, Any]], None] = lambda row: None
) -> list[dict[str, Any]]:
    """Every configuration of one (model, method) job, with the device's memory released and its peak reset
    between them; a configuration that fails (out of memory, say) is a row with the reason. ``emit`` gets each
    row as soon as it exists."""
    rows = []
    for dtype, batch in job["configs"]:
        try:
            row = _train_one(job, dtype, batch)
        except Exception as err:  # reported per configuration
            message = str(err).strip().splitlines()[0][:200] if str(err) else ""
            row = {"model": job["model"], "method": job["method"], "dtype": dtype, "batch": batch}
            row["status"] = f"error: {type(err).__name__}: {message}"
        rows.append(row)
        emit(row)
        gc.collect()
        if job["device"] == "cuda":
            torch.cuda.empty_cache()
    return rows


def _emit_json(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def _run_worker(job: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """``train_worker`` in a fresh process (so no job inherits another's allocator state). It prints a JSON row
    per configuration as it finishes, so a worker that fails or runs out of time still gives the rows it has;
    the configurations it did not reach get a row with the reason."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "benchmarks.gpu", "--worker", json.dumps(job)]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        stdout, stderr = done.stdout, done.stderr
        reason = f"worker failed (exit {done.returncode}): {(stderr.strip().splitlines() or [''])[-1][:200]}"
    except subprocess.TimeoutExpired as err:
        stdout, reason = err.stdout or "", f"worker stopped at the end of the budget ({timeout:.1f} s)"
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"model"')]
    reached = {(row["dtype"], row["batch"]) for row in rows}
    rows += [
        {"model": job["model"], "method": job["method"], "dtype": d, "batch": b, "status": reason}
        for d, b in job["configs"]
        if (d, b) not in reached
    ]
    return rows


@dataclass(frozen=True)
class TrainPart:
    """One model's training jobs: a process per method, every configuration in it."""

    key: str  # its name for --parts: train_<key> (a smoke run's stand-ins share the real models' keys)
    model: str
    family: str
    methods: tuple[str, ...]
    configs: tuple[tuple[str, int], ...]
    warmup: int
    steps: int
    estimate_s: float  # per method, on an H200: a guess until parts.csv has a measurement


def train_parts(smoke: bool) -> list[TrainPart]:
    """ViT-B/16 first (the targets), then the LLaMA-shaped layers, then ViT-L/16 and ViT-H/14."""
    if smoke:
        return [
            TrainPart("vit_b16", "vit_tiny_test", "vit", VIT_METHODS, (("bf16", 2),), 0, 1, 0),
            TrainPart("llama", "llama_tiny_2_layers", "llama", tuple(llama.METHODS), (("bf16", 1),), 0, 1, 0),
        ]
    return [
        TrainPart("vit_b16", "vit_b16", "vit", VIT_METHODS, CONFIGS, 3, 10, 20),
        TrainPart("llama", "llama2_7b_2_layers", "llama", tuple(llama.METHODS), (("bf16", 1),), 3, 10, 15),
        TrainPart("vit_l16", "vit_l16", "vit", VIT_METHODS, CONFIGS, 1, 3, 25),
        TrainPart("vit_h14", "vit_h14", "vit", VIT_METHODS, CONFIGS, 1, 3, 40),
    ]


def run_train_part(run: Run, part: TrainPart) -> None:
    """A model's methods, or none of them: the targets compare methods, so a model is skipped whole when its
    estimate does not fit. A job that still overruns is stopped at the end of the budget (rows say so)."""
    name = f"train_{part.key}"
    if not run.fits(name, part.estimate_s * len(part.methods)):
        return
    print(f"[{name}]", flush=True)
    for method in part.methods:
        began = time.monotonic()
        job = {
            "model": part.model,
            "family": part.family,
            "method": method,
            "configs": [list(c) for c in part.configs],
            "device": run.device,
            "smoke": run.smoke,
            "warmup": part.warmup,
            "steps": part.steps,
        }
        rows = train_worker(job) if run.smoke else _run_worker(job, timeout=max(run.left_s(), 10.0))
        run.training.extend(rows)
        for row in rows:
            print(f"  {row['model']} {row['method']} {row['dtype']} b{row['batch']}: {_train_summary(row)}", flush=True)
        wall_s = time.monotonic() - began
        run.parts.append(
            {"part": f"{name} {method}", "estimate_s": part.estimate_s, "wall_s": wall_s, "status": "done"}
        )
        run.save()


def _train_summary(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return row["status"]
    return f"{fmt(row['step_ms_median'])} ms/step, peak {fmt(row.get('peak_mb'))} MB"


def _value(rows: Sequence[dict[str, Any]], model: str, method: str, column: str) -> float | None:
    for row in rows:
        if (row["model"], row["method"], row["dtype"], row["batch"]) == (
            model,
            method,
            "bf16",
            64 if model == "vit_b16" else 2,
        ):
            return row.get(column) if row["status"] == "ok" else None
    return None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


TARGET_SETTING = "ViT-B/16, bf16 autocast, batch 64"


def targets(run: Run) -> list[Target]:
    """The issue's targets: ViT-B/16, bf16 autocast, batch 64 (the tiny stand-in at batch 2 in a smoke run)."""
    model = "vit_tiny_test" if run.smoke else "vit_b16"
    step = {m: _value(run.training, model, m, "step_ms_median") for m in VIT_METHODS}
    peak = {m: _value(run.training, model, m, "peak_mb") for m in VIT_METHODS}
    shape = "512x300" if run.smoke else "11008x4096"
    selection = next(
        (r["ratio_to_gemm_fp32"] for r in run.selection if r["shape"] == shape and r["method"].startswith("library")),
        None,
    )
    ours = "snell8_s0.9"
    return [
        Target("step: SNELL-8 s=0.9 / peft LoRA-8", _ratio(step[ours], step["lora8"]), 1.15),
        Target("step: SNELL-8 s=0.9 / reference-style SNELL-8", _ratio(step[ours], step["reference_snell8"]), 0.45),
        Target("peak memory: SNELL-8 s=0.9 / peft LoRA-8", _ratio(peak[ours], peak["lora8"]), 1.0),
        Target("peak memory: SNELL-8 s=0.9 / full fine-tuning", _ratio(peak[ours], peak["full"]), 0.6),
        Target(f"threshold {shape} / one fp32 GEMM with {TOKENS} tokens", selection, 0.2),
    ]


def selection_verdicts(run: Run) -> list[list[Any]]:
    """Per shape: the library's method, the fastest exact host-sync-free method, and whether they agree."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in run.selection):
        rows = [r for r in run.selection if r["shape"] == shape]
        chosen = sparsify.selection_method(run.device, rows[0]["numel"])
        best, overall = fastest_exact(rows, sync_free=True), fastest_exact(rows, sync_free=False)
        agrees = None if best is None else ("yes" if best["method"] == chosen else "NO")
        lines.append(
            [shape, chosen, best and best["method"], best and best["ms"], agrees, overall and overall["method"]]
        )
    return lines


def measured_table_row(run: Run) -> tuple[tuple[int, str], ...]:
    """The SELECTION_TABLE row these measurements support: from each measured size on, its fastest exact method
    without host reads (sizes in between take the smaller size's), merged where neighbours agree."""
    best = {}
    for r in run.selection:
        winner = fastest_exact([x for x in run.selection if x["shape"] == r["shape"]], sync_free=True)
        if winner is not None:
            best[r["numel"]] = winner["method"]
    row: list[tuple[int, str]] = []
    for index, (numel, method) in enumerate(sorted(best.items())):
        if not row or row[-1][1] != method:
            row.append((0 if index == 0 else numel, method))
    return tuple(row)


def _driver() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "unknown"


def _commit(given: str | None) -> str:
    if given:
        return given
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "benchmarks", "tests", ":!benchmarks/results"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown (no git; pass --commit)"
    commit = done.stdout.strip() or "unknown (not a git checkout; pass --commit)"
    return commit + (" + uncommitted changes" if status.stdout.strip() else "")


def environment(device: str, commit: str | None) -> dict[str, str]:
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        device_text = f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB"
    else:
        device_text = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    env = {
        "device": device_text,
        "driver": _driver() if device == "cuda" else "n/a",
        "CUDA (torch build)": str(torch.version.cuda),
        "cuDNN": str(torch.backends.cudnn.version()) if device == "cuda" else "n/a",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for package in ("timm", "transformers", "peft", "accelerate", "safetensors", "numpy"):
        env[package] = _version(package)
    env["snell commit"] = _commit(commit)
    env["fp32 matmul precision"] = torch.get_float32_matmul_precision()
    return env


def write_results(run: Run, out: Path, env: dict[str, str], command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "checks.csv", run.checks, CHECK_COLUMNS)
    write_csv(out / "selection.csv", run.selection, SELECTION_COLUMNS)
    write_csv(out / "training.csv", run.training, TRAIN_COLUMNS)
    write_csv(out / "parts.csv", run.parts, PART_COLUMNS)
    write_csv(out / "layers.csv", run.layers, LAYER_COLUMNS)
    failed = [c for c in run.checks if c["status"] == "FAIL"]
    skipped = [p for p in run.parts if p["status"].startswith("skipped")]
    lines = ["# SNELL on a GPU: `benchmarks.gpu`", ""]
    if run.smoke:
        lines += ["**SMOKE RUN: tiny models on the CPU, one step. These numbers are not results.**", ""]
    if not run.finished:
        done = run.parts[-1]["part"] if run.parts else "nothing"
        lines += [f"**UNFINISHED: written after `{done}`; a complete run overwrites this.**", ""]
    lines += [markdown_table(["", ""], env.items()), "", f"Command: `{command}`", f"Budget: {run.budget_s:.0f} s", ""]
    lines += [
        f"## Targets ({'the tiny ViT stand-in, bf16 autocast, batch 2' if run.smoke else TARGET_SETTING})",
        "",
    ]
    lines += [
        markdown_table(
            ["target", "value", "limit", "verdict"], [[t.name, t.value, t.limit, t.verdict] for t in targets(run)]
        )
    ]
    lines += ["", "## Parts", "", markdown_table(PART_COLUMNS, [[p[c] for c in PART_COLUMNS] for p in run.parts])]
    lines += ["", f"Skipped: {', '.join(p['part'] for p in skipped) if skipped else 'nothing'}."]
    lines += ["", f"## Checks: {len(failed)} of {len(run.checks)} fail", ""]
    families: dict[str, list[str]] = {}
    for check in run.checks:
        families.setdefault(check["check"].split(":")[0], []).append(check["status"])
    summary = [
        [family, len(statuses), *(statuses.count(s) for s in ("PASS", "FAIL", "n/a"))]
        for family, statuses in families.items()
    ]
    lines += [markdown_table(["checks", "count", "PASS", "FAIL", "n/a"], summary), ""]
    notable = [c for c in run.checks if c["status"] != "PASS" or c["detail"]]
    lines += ["Failures and checks with something to say (every row is in checks.csv):", ""]
    lines += [markdown_table(CHECK_COLUMNS, [[c[k] for k in CHECK_COLUMNS] for c in notable])]
    lines += ["", "## Selection of τ (s = 0.9)", "", "Whether the library's choice was the fastest exact method:", ""]
    headers = ["shape", "library uses", "fastest exact without host sync", "ms", "library fastest?", "fastest overall"]
    lines += [markdown_table(headers, selection_verdicts(run)), ""]
    lines += [f"Row of `SELECTION_TABLE[{run.device!r}]` these measurements support: `{measured_table_row(run)}`", ""]
    lines += [markdown_table(SELECTION_COLUMNS, [[r.get(c) for c in SELECTION_COLUMNS] for r in run.selection])]
    lines += ["", "## One SNELL layer per ΔW row-block size (forward + backward, bf16 autocast)", ""]
    lines += [markdown_table(LAYER_COLUMNS, [[r.get(c) for c in LAYER_COLUMNS] for r in run.layers])]
    lines += [
        "",
        "## Training steps",
        "",
        markdown_table(TRAIN_COLUMNS, [[r.get(c) for c in TRAIN_COLUMNS] for r in run.training]),
    ]
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


PARTS: tuple[tuple[str, float, Callable[[Run], None]], ...] = (
    ("correctness", 30, part_correctness),
    ("sync", 10, part_sync),
    ("compile", 30, part_compile),
    ("selection", 45, part_selection),
    ("blocks", 15, part_blocks),
)
"""The checks before training, with a guess at their seconds on an H200."""


def main(argv: Sequence[str] | None = None) -> Run | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="skip parts that would not fit")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, one step, a temp folder")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/gpu, or a temp folder)")
    parser.add_argument("--commit", help="the snell commit, for a checkout without .git")
    names = [name for name, _, _ in PARTS] + [f"train_{p.key}" for p in train_parts(False)]
    parser.add_argument("--parts", nargs="+", choices=names, default=names, help="run only these (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        train_worker(json.loads(args.worker), _emit_json)
        return None
    if args.smoke:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke")
    run = Run(device, args.smoke, args.budget_s)
    command = command_line("benchmarks.gpu", sys.argv[1:] if argv is None else argv)
    env = environment(device, args.commit)
    out = args.out or (Path(tempfile.mkdtemp(prefix="snell-gpu-smoke-")) if args.smoke else FULL_OUT)
    run.save = lambda: write_results(run, out, env, command)
    print(f"results (rewritten after every part): {out}")
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    plan = [(name, estimate_s) for name, estimate_s, _ in PARTS]
    plan += [(f"train_{p.key}", p.estimate_s * len(p.methods)) for p in train_parts(args.smoke)]
    print(f"plan (estimated s on an H200; budget {run.budget_s:.0f} s): " + ", ".join(f"{n} {e:.0f}" for n, e in plan))
    for name, estimate_s in plan:
        if name not in args.parts:
            run.parts.append(
                {"part": name, "estimate_s": estimate_s, "wall_s": None, "status": "skipped: not in --parts"}
            )
    for name, estimate_s, part in PARTS:
        if name in args.parts and run.fits(name, estimate_s):
            print(f"[{name}]", flush=True)
            began = time.monotonic()
            try:
                part(run)
                status = "done"
            except Exception:  # one broken part must not cost the others
                status = "error: " + traceback.format_exc().strip().splitlines()[-1][:200]
                print(traceback.format_exc(), flush=True)
            run.parts.append(
                {"part": name, "estimate_s": estimate_s, "wall_s": time.monotonic() - began, "status": status}
            )
            run.save()
    if device == "cuda":
        torch.cuda.empty_cache()  # the workers have the device to themselves
    for part in train_parts(args.smoke):
        if f"train_{part.key}" in args.parts:
            run_train_part(run, part)
    run.finished = True
    path = run.save()
    failed = [c["check"] for c in run.checks if c["status"] == "FAIL"]
    print(f"\nchecks: {len(failed)} of {len(run.checks)} fail" + (f"; FAILED: {failed}" if failed else ""))
    for shape, chosen, best, _, agrees, _ in selection_verdicts(run):
        print(f"selection {shape}: library uses {chosen}, fastest exact without host sync {best}: {agrees}")
    print(f"SELECTION_TABLE[{device!r}] these measurements support: {measured_table_row(run)}")
    for target in targets(run):
        print(f"{target.verdict}: {target.name} = {fmt(target.value)} (limit {target.limit})")
    skipped = [p["part"] for p in run.parts if p["status"].startswith("skipped")]
    print(f"skipped: {', '.join(skipped) if skipped else 'nothing'}")
    print(f"results: {path} ({time.monotonic() - run.started:.0f} s)")
    return run


if __name__ == "__main__":
    main()
