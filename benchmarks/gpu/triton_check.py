"""The Triton path on the device: the suite's piecewise-linear and mixk checks with ``SNELL_KERNELS=fused``, its
training step without host synchronisation, and one layer's forward + backward (piecewise-linear, and SNELLA's mixk)
timed against the torch path and a dense layer whose weight trains, with the ``_TRITON_MIN_NUMEL`` bound those
timings support.

In a smoke run on the CPU the same parts run under the Triton interpreter (``SNELL_KERNELS=triton``) at tiny
sizes when TRITON_INTERPRET=1 was set before triton was imported (the test suite's conftest.py does); otherwise
their rows say why they could not run.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.gpu.correctness import _load_test_checks, _no_tf32
from benchmarks.gpu.run import Run, _record, _synchronize, timed_ms
from benchmarks.report import fmt
from snell import dispatch
from snell.function import FusedSnell
from snell.layers import init_factors
from snell.spec import SnellSpec

SPARSITY = 0.9
# (m, n), dtype of x and W0, tokens, kernel, rank: ViT-B's MLP in fp32 with a batch of 8 at 197 tokens, LLaMA-2-7B's
# attention projection and MLP in bf16 with a sequence of 256; the LLaMA ones again at r = 32 (the paper's LLM rank:
# issue 25 asks what the wider pieces cost on the Triton path); SNELLA's mixk on ViT-B's MLP and LLaMA's projection.
TIMED_LAYERS = (
    ((768, 3072), torch.float32, 1576, "piecewise_linear", 8),
    ((4096, 4096), torch.bfloat16, 256, "piecewise_linear", 8),
    ((11008, 4096), torch.bfloat16, 256, "piecewise_linear", 8),
    ((4096, 4096), torch.bfloat16, 256, "piecewise_linear", 32),
    ((11008, 4096), torch.bfloat16, 256, "piecewise_linear", 32),
    ((768, 3072), torch.float32, 1576, "mixk", 8),
    ((4096, 4096), torch.bfloat16, 256, "mixk", 8),
)
SMOKE_LAYERS = (
    ((96, 80), torch.float32, 16, "piecewise_linear", 8),
    ((130, 64), torch.bfloat16, 8, "piecewise_linear", 8),
    ((130, 64), torch.bfloat16, 8, "piecewise_linear", 32),
    ((96, 80), torch.float32, 16, "mixk", 8),
)
_SNELLA_COEFFICIENTS = (0.1, -0.1, 1.0, 1.0, 0.0)  # mixk: the piecewise ones, then (α, γ, β) at the authors' start


def _triton_choice(device: str) -> str:
    """SNELL_KERNELS for the Triton path: ``fused`` on CUDA (what a user sets), ``triton`` on the CPU (interpreter)."""
    return "fused" if device == "cuda" else "triton"


@contextlib.contextmanager
def kernels(choice: str) -> Iterator[None]:
    """SNELL_KERNELS set to ``choice`` inside, restored after."""
    saved = os.environ.get("SNELL_KERNELS")
    os.environ["SNELL_KERNELS"] = choice
    try:
        yield
    finally:
        if saved is None:
            del os.environ["SNELL_KERNELS"]
        else:
            os.environ["SNELL_KERNELS"] = saved


def _why_not(device: str) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (an "n/a" detail), or None when they can."""
    from snell import triton_path

    if triton_path.available(torch.device(device)):
        return None
    hint = " (on the CPU only under TRITON_INTERPRET=1, set before triton is imported)" if device == "cpu" else ""
    return f"n/a: the Triton kernels cannot run on {device}{hint}"


def _assert_triton_path(spec: SnellSpec, device: str, rank: int, *dtypes: torch.dtype) -> None:
    path = dispatch.kernel_path(spec, torch.device(device), rank, *dtypes)
    if path != "triton":
        raise AssertionError(f"dispatch chose {path!r}, not the Triton path")


def part_triton_correctness(run: Run) -> None:
    """tests/checks.py's piecewise-linear and mixk cases on the Triton path (fp32 and bf16 autocast), τ by its
    definition on the kernels' own ΔW, the backward's merged weight against the forward's bit for bit, then a
    training step of one layer under ``torch.cuda.set_sync_debug_mode("error")``."""
    checks = _load_test_checks()
    device = run.device
    reason = _why_not(device)

    def matches_naive(spec: SnellSpec, inputs: list[torch.Tensor], autocast: torch.dtype | None) -> str | None:
        if reason:
            return reason
        _assert_triton_path(spec, device, inputs[3].shape[-1], autocast or torch.float32, torch.float32)
        checks.assert_matches_naive(spec, inputs, autocast)
        return None

    with _no_tf32(), kernels(_triton_choice(device)):
        for precision, autocast in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
            for spec in (s for s in checks.CASES if s.kernel in ("piecewise_linear", "mixk")):
                inputs = checks.make_inputs(spec, dtype=torch.float32, device=device)
                _record(
                    run,
                    f"triton = naive, {precision}: {checks.spec_id(spec)}",
                    lambda spec=spec, inputs=inputs, autocast=autocast: matches_naive(spec, inputs, autocast),
                )
        groups, rows, columns = (3, 70, 90) if run.smoke else (3, 4096, 4096)  # smoke: 2x2 partial 64x64 tiles
        for sparsity in (0.5, 0.9, 0.999):
            _record(
                run,
                f"triton τ = exact k-th largest |ΔW|: {groups}x{rows}x{columns} s={sparsity}",
                lambda sparsity=sparsity: (
                    reason or checks.assert_triton_tau_is_exact(groups, rows, columns, sparsity, device)
                ),
            )
        rows, columns = (70, 90) if run.smoke else (3000, 1000)  # smoke: 37 + 33 rows, across a 64-row tile
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            _record(
                run,
                f"triton backward merge = forward merge, bit for bit: 2x{rows}x{columns} {dtype}",
                lambda dtype=dtype: (
                    reason or checks.assert_triton_backward_merges_as_forward(rows, columns, dtype, device)
                ),
            )
        m, n = (172, 64) if run.smoke else (11008, 4096)
        for dtype in (torch.float32, torch.bfloat16):
            name = f"no host sync: {m}x{n} layer on the Triton path, {dtype}"
            _record(run, name, lambda dtype=dtype: reason or _step_without_sync(m, n, dtype, device))


def _step_without_sync(m: int, n: int, dtype: torch.dtype, device: str) -> str | None:
    """A SNELL layer's forward and backward (after a warm-up that compiles) with host reads of device values
    raising; on the CPU the step runs unchecked."""
    spec = SnellSpec("linear", (m, n), "piecewise_linear", 2, "reference", SPARSITY)
    _assert_triton_path(spec, device, 8, dtype, torch.float32)
    x, weight, a, b, coefficients, grad = _layer_inputs(m, n, dtype, 32, device, "piecewise_linear", 8)

    def step() -> None:
        FusedSnell.apply(x, weight, None, a, b, coefficients, spec).backward(grad)

    step()
    _synchronize(device)
    if device != "cuda":
        step()
        return "n/a: no CUDA device (the step ran unchecked)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return None


def _layer_inputs(m: int, n: int, dtype: torch.dtype, tokens: int, device: str, kernel: str, rank: int):
    """x (trainable), W0 and gy in ``dtype``; SNELL-``rank``'s factors (trainable) and coefficients in fp32 (mixk's
    (α, γ, β) trainable, as in a SNELLA layer)."""
    torch.manual_seed(0)
    x = torch.randn(tokens, n, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(m, n, device=device) / math.sqrt(n)).to(dtype)
    a, b = torch.empty(n, rank, device=device), torch.empty(m, rank, device=device)
    init_factors(a, b, num_pieces=2)
    coefficients = torch.tensor([0.1, -0.1], device=device)
    if kernel == "mixk":
        coefficients = torch.tensor(_SNELLA_COEFFICIENTS, device=device).requires_grad_()
    grad = torch.randn(tokens, m, device=device).to(dtype)
    return x, weight, a.requires_grad_(), b.requires_grad_(), coefficients, grad


def layer_rows(
    m: int,
    n: int,
    dtype: torch.dtype,
    tokens: int,
    device: str,
    repeats: int,
    kernel: str = "piecewise_linear",
    rank: int = 8,
) -> list[dict[str, Any]]:
    """One SNELL-``rank`` s = 0.9 layer's (``kernel``'s) forward + backward on the torch path and on the Triton path,
    and a dense layer whose weight trains (full fine-tuning's three GEMMs), median milliseconds of ``repeats``."""
    x, weight, a, b, coefficients, grad = _layer_inputs(m, n, dtype, tokens, device, kernel, rank)
    dense = weight.clone().requires_grad_()
    spec = SnellSpec("linear", (m, n), kernel, 2, "reference", SPARSITY)

    def snell_layer() -> None:
        x.grad = a.grad = b.grad = coefficients.grad = None
        FusedSnell.apply(x, weight, None, a, b, coefficients, spec).backward(grad)

    def dense_layer() -> None:
        x.grad = dense.grad = None
        F.linear(x, dense).backward(grad)

    dense_ms = timed_ms(dense_layer, device, repeats)
    base = {"shape": f"{m}x{n}", "numel": m * n, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens}
    base.update(kernel=kernel, rank=rank)
    rows = [{**base, "path": "dense layer, weight trains", "ms": dense_ms, "ratio_to_dense": 1.0, "note": ""}]
    reason = _why_not(device)
    for label, choice in (("torch", "torch"), ("triton", _triton_choice(device))):
        row = {**base, "path": label, "ms": None, "ratio_to_dense": None, "note": reason or ""}
        if label == "torch" or not reason:
            with kernels(choice):
                chosen = dispatch.kernel_path(spec, torch.device(device), rank, dtype, torch.float32)
                ms = timed_ms(snell_layer, device, repeats)
            row.update(ms=ms, ratio_to_dense=ms / dense_ms, note=f"dispatch: {chosen}")
        rows.append(row)
        timing = f"{fmt(row['ms'])} ms, {fmt(row['ratio_to_dense'])}x dense"
        print(f"  {m}x{n} {row['dtype']} {kernel} r={rank} {label}: {timing}", flush=True)
    return rows


def part_triton_timing(run: Run) -> None:
    """The Triton path against the torch path per layer size: what _TRITON_MIN_NUMEL should be."""
    layers = SMOKE_LAYERS if run.smoke else TIMED_LAYERS
    for (m, n), dtype, tokens, kernel, rank in layers:
        run.kernels.extend(layer_rows(m, n, dtype, tokens, run.device, 2 if run.smoke else 10, kernel, rank))
    print(f"  _TRITON_MIN_NUMEL these timings support: {triton_min_numel(run.kernels)}", flush=True)


def triton_min_numel(rows: list[dict[str, Any]]) -> int | None:
    """The smallest measured entries per matrix from which the Triton path was faster than the torch path at every
    measured size above, for every kernel and rank measured there (one bound serves them all); None when it was not
    faster at the largest (or nothing was measured)."""
    timed: dict[int, dict[tuple[str, int], dict[str, float]]] = {}
    for row in rows:
        if row["path"] in ("torch", "triton") and row["ms"] is not None:
            setting = (row.get("kernel", "piecewise_linear"), row.get("rank", 8))
            timed.setdefault(row["numel"], {}).setdefault(setting, {})[row["path"]] = row["ms"]
    bound = None
    for numel in sorted(timed, reverse=True):
        if not all(len(times) == 2 and times["triton"] < times["torch"] for times in timed[numel].values()):
            break
        bound = numel
    return bound


def rank_costs(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """Per shape, dtype and path where both were measured: one layer's SNELL-32 ms over its SNELL-8 ms (issue 25's
    question for the Triton path: what the wider pieces cost)."""
    ms = {
        (r["shape"], r["dtype"], r.get("kernel", "piecewise_linear"), r["path"], r.get("rank", 8)): r["ms"]
        for r in rows
        if r["path"] in ("torch", "triton") and r["ms"] is not None
    }
    return [
        [*key, ms[(*key, 8)], ms[(*key, 32)], ms[(*key, 32)] / ms[(*key, 8)]]
        for key in dict.fromkeys(k[:4] for k in ms)
        if (*key, 8) in ms and (*key, 32) in ms
    ]
