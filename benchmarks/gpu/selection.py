"""The selection part (every exact way to find τ, timed against one GEMM) and the blocks part (one SNELL layer
per ΔW row-block size)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.gpu.run import Run, timed_ms
from benchmarks.report import fmt
from benchmarks.threshold import piecewise_delta, quantile_call
from snell import function, sparsify
from snell import spec as layout
from snell.layers import init_factors

SPARSITY = 0.9
TOKENS = 2048
SELECTION_SHAPES = ((768, 768), (3072, 768), (4096, 4096), (11008, 4096), (4096, 14336))
LAYER_SHAPES = ((3072, 768), (11008, 4096))


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
    saved = layout.BLOCK_ENTRIES
    try:
        for entries in block_entries:
            layout.BLOCK_ENTRIES = entries or m * n
            ms = timed_ms(snell_layer, device, repeats)
            rows_per_block = max(1, layout.BLOCK_ENTRIES // n)
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
        layout.BLOCK_ENTRIES = saved
    return rows


def part_blocks(run: Run) -> None:
    """Does ΔW's row-block size, chosen for a CPU's cache, cost a GPU? One layer per block size."""
    if run.smoke:
        run.layers.extend(layer_rows(256, 128, run.device, 64, (1 << 12, None), repeats=2))
        return
    for m, n in LAYER_SHAPES:
        run.layers.extend(layer_rows(m, n, run.device, TOKENS, (1 << 20, 1 << 22, 1 << 24, None), repeats=10))
