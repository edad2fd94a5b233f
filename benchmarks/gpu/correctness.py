"""The parts that check before anything is timed: the fused function against the naive formulas and the
model-level checks (tests/checks.py), no host synchronisation in a training step, and torch.compile graph breaks."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.gpu.run import Run, _record, _synchronize
from benchmarks.report import REPO
from snell import sparsify
from snell import spec as layout


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
        snella = checks.check_snella_under_fp16_autocast
        _record(run, "SNELLA: allocator under fp16 autocast and a GradScaler", lambda: snella(device, min(depth, 2)))


def _several_blocks(spec, device: str) -> None:
    """A q/k/v matrix whose groups span several row blocks (blocks of 2^16 entries, as the unit test sets them)."""
    checks = _load_test_checks()
    saved = layout.BLOCK_ENTRIES
    layout.BLOCK_ENTRIES = 1 << 16
    try:
        checks.assert_matches_naive(spec, checks.make_inputs(spec, tokens=5, device=device))
    finally:
        layout.BLOCK_ENTRIES = saved


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
