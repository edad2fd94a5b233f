"""Competition-based sparsification: keep the largest-magnitude entries of ΔW, with no stored indices.

The threshold τ is the k-th largest |ΔW| of each matrix (k = round((1 − s)·N), at least 1 below s = 1:
:func:`keep_count`), found by selection, not by a sort or torch.quantile (which refuses anything but fp32/fp64, and
under the reference code's torch 1.12 more than 2^24 entries). It stays a tensor on ΔW's device, so no host
synchronisation happens on an accelerator.
τ is one scalar per matrix: the forward saves it and the backward reuses it instead of selecting again. Which exact
selection runs is decided in one place, :func:`selection_method` over :data:`SELECTION_TABLE`, per device and size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("reference", "mask", "soft")

_SAMPLE_SIZE = 1 << 16  # entries sampled to bracket the answer, at most (see sample_size)
# float16/32/64 go to numpy as they are; anything else (bfloat16) as float32, which holds it exactly.
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def sample_size(n: int) -> int:
    """Entries sampled to bracket the k-th largest of n (here and in the fused kernels' selection): 2^16, or a 32nd
    of them where that is fewer. Drawing and partitioning 2^16 values takes about 1 ms, which made τ cost six times
    the merge on SmolLM2's 576×576 matrices; a smaller sample only widens the band that is gathered."""
    return min(_SAMPLE_SIZE, n // 32)


def sample_bracket(q: float, size: int) -> tuple[int, int]:
    """0-based positions (low, high) in a sorted sample of ``size`` entries that bracket the whole's q-quantile: six
    standard errors of the sample quantile either side, and two positions for rounding. Either may lie outside the
    sample: the bracket is then open on that side."""
    margin = 6.0 * math.sqrt(max(q * (1.0 - q), 1.0 / size) / size) + 2.0 / size
    return math.floor((q - margin) * size), math.ceil((q + margin) * size)


@functools.cache
def _sample_positions(n: int) -> np.ndarray:
    """Fixed random sample positions for a matrix of n entries, sorted (the gather then reads memory in order):
    drawn once per size, read-only afterwards, so concurrent threads share no generator state. ΔW changes
    every step, so a fixed set of positions is still a fresh sample of it; the answer is exact either way."""
    positions = torch.randint(n, (sample_size(n),), generator=torch.Generator().manual_seed(n)).numpy()
    positions.sort()
    positions.flags.writeable = False
    return positions


def keep_count(numel: int, sparsity: float) -> int:
    """Number of entries a matrix of ``numel`` entries keeps at ``sparsity`` (fraction zeroed): round((1 − s)·N), and
    at least one below s = 1, as the reference's threshold (strictly above an interpolated quantile) keeps the
    largest entry; a small matrix at a high sparsity would otherwise keep none, its factors never getting a gradient.
    """
    if sparsity >= 1.0:
        return 0
    return max(1, round((1.0 - sparsity) * numel))


def _beyond(array: np.ndarray, cut: float, magnitude: bool) -> np.ndarray:
    """value > cut, or |value| > cut as (value > cut) | (value < −cut): no |values| array is made."""
    mask = array > cut
    if magnitude:
        mask |= array < -cut
    return mask


@torch.compiler.disable  # numpy and host-side control flow: torch.compile runs it as it is
def _kth_largest_banded(values: Tensor, k: int, magnitude: bool) -> Tensor | None:
    """Exact k-th largest entry (or |entry|) of a flat CPU tensor from a small random sample and two counts.

    Two sample quantiles, six standard errors either side of the answer's, bracket it. One comparison counts
    the entries above the bracket, a second marks the band inside it (about 1.4 % of the entries at s = 0.9),
    only the band is gathered, and an in-place partition of it picks the answer. Temporaries: the sample,
    boolean masks and the band; with ``magnitude`` the comparisons are two-sided, so ΔW's selection needs no
    m×n |ΔW| (abs-then-select took ~1.4× as long at s = 0.9: 3072×768 5.6 against 3.9 ms). The
    earlier way, gathering every entry beyond one cut with torch (boolean indexing makes int64 indices,
    ``kthvalue`` a copy and more int64 indices) took twice as long at ViT-B sizes and allocated almost twice
    the bytes. numpy does the gather and the partition because they allocate nothing beyond their result.
    Returns None in the rare case the answer lies outside the bracket, so the caller can fall back to a
    full selection.
    """
    n = values.numel()
    array = values.detach().to(values.dtype if values.dtype in _NUMPY_FLOATS else torch.float32).numpy()
    q = 1.0 - k / n  # the answer's quantile
    positions = _sample_positions(n)
    size = len(positions)
    low, high = sample_bracket(q, size)
    sample = array[positions]
    if magnitude:
        np.abs(sample, out=sample)
    sample.partition([i for i in (low, high) if 0 <= i < size] or [0])
    lower = sample[low] if low >= 0 else -math.inf
    upper = sample[high] if high < size else math.inf
    above = _beyond(array, upper, magnitude)
    count_above = int(np.count_nonzero(above))
    inside = _beyond(array, lower, magnitude)
    np.logical_xor(inside, above, out=inside)  # lower < value <= upper
    band = array[inside]
    if magnitude:
        np.abs(band, out=band)
    position = band.size - (k - count_above)  # the answer's 0-based position from below within the band
    if not 0 <= position < band.size:
        return None
    band.partition(position)
    return values.new_tensor(band[position].item())


def _select_banded(values: Tensor, k: int, magnitude: bool) -> Tensor:
    """Row by row, :func:`_kth_largest_banded` (CPU only: numpy and host reads), or kthvalue if its sample misses."""
    rows = []
    for row in values:
        tau = _kth_largest_banded(row, k, magnitude)
        if tau is None:
            tau = torch.kthvalue(row.abs() if magnitude else row, row.numel() - k + 1).values
        rows.append(tau)
    return torch.stack(rows).unsqueeze(-1)


def _select_kthvalue(values: Tensor, k: int, magnitude: bool) -> Tensor:
    return torch.kthvalue(values.abs() if magnitude else values, values.shape[1] - k + 1, dim=-1, keepdim=True).values


def _select_topk(values: Tensor, k: int, magnitude: bool) -> Tensor:
    """The k-th largest as the smallest of the k largest, or as the largest of the n − k + 1 smallest, whichever
    set is smaller (topk returns the whole set: values and int64 indices)."""
    values = values.abs() if magnitude else values
    n = values.shape[1]
    if k <= n - k + 1:
        return torch.topk(values, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return torch.topk(values, n - k + 1, dim=-1, largest=False, sorted=False).values.amax(-1, keepdim=True)


SELECTION_METHODS: dict[str, Callable[[Tensor, int, bool], Tensor]] = {
    "banded": _select_banded,
    "kthvalue": _select_kthvalue,
    "topk": _select_topk,
}
"""Exact selections of the k-th largest entry per row of a (G, N) tensor: (values, k, magnitude) -> (G, 1)."""

SELECTION_TABLE: dict[str, tuple[tuple[int, str], ...]] = {
    # The numpy sample-and-band selection from 2^17 entries, kthvalue below (as before the table existed); its
    # CPU timings: benchmarks/README.md, "Selection by counting and a small band".
    "cpu": ((0, "kthvalue"), (1 << 17, "banded")),
    # An educated default, not a measurement: no CUDA device has run benchmarks.gpu yet. torch.topk's CUDA
    # radix select splits one large slice over many thread blocks, while kthvalue launches one block (at most
    # 1024 threads) per slice, and ΔW is one huge slice per matrix. `python -m benchmarks.gpu` times both at
    # every size and prints whether this row was the fastest and the row its measurements support.
    "cuda": ((0, "topk"),),
}
"""Per device type, (smallest N, method) rows in increasing N: the last row with N >= its bound decides.

The one place the selection method is chosen. Accelerators must use methods without host reads (no
``banded``), so that a training step never waits for the threshold. Devices not listed use ``kthvalue``.
"""

_device_path_on_cpu = False


@contextmanager
def device_path_on_cpu() -> Iterator[None]:
    """Run CPU tensors through the accelerator path (CUDA's selection table, no numpy, no host reads).

    For tests: the path a GPU takes can then be checked for exactness and for a torch.compile graph without
    breaks on a machine that has no GPU.
    """
    global _device_path_on_cpu
    previous, _device_path_on_cpu = _device_path_on_cpu, True
    try:
        yield
    finally:
        _device_path_on_cpu = previous


def _path(device_type: str) -> str:
    """The device type whose code path a tensor on ``device_type`` takes."""
    return "cuda" if device_type == "cpu" and _device_path_on_cpu else device_type


def selection_method(device_type: str, numel: int) -> str:
    """The name of the exact selection used for rows of ``numel`` entries on ``device_type`` (a key of
    :data:`SELECTION_METHODS`), from :data:`SELECTION_TABLE`."""
    method = "kthvalue"
    for bound, name in SELECTION_TABLE.get(_path(device_type), ()):
        if numel >= bound:
            method = name
    return method


def _kth_largest(values: Tensor, k: int, magnitude: bool) -> Tensor:
    groups, n = values.shape
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0:
        return values.new_full((groups, 1), math.inf)
    return SELECTION_METHODS[selection_method(values.device.type, n)](values, k, magnitude)


def kth_largest(values: Tensor, k: int) -> Tensor:
    """Per row of ``values`` (shape (G, N)), the k-th largest entry, shape (G, 1).

    ``k = 0`` gives +inf (nothing is kept). Ties at the threshold are all kept.
    """
    return _kth_largest(values, k, magnitude=False)


def kth_largest_magnitude(values: Tensor, k: int) -> Tensor:
    """Per row of ``values`` (shape (G, N)), the k-th largest |entry|, shape (G, 1), without making |values|
    on the CPU. ``k = 0`` gives +inf."""
    return _kth_largest(values, k, magnitude=True)


def threshold(delta: Tensor, sparsity: float) -> Tensor:
    """τ per matrix for ΔW of shape (G, m, n): entries with |ΔW| >= τ survive. Shape (G, 1, 1)."""
    flat = delta.detach().flatten(1)
    return kth_largest_magnitude(flat, keep_count(flat.shape[1], sparsity)).unsqueeze(-1)


def _zero_below_(magnitude: Tensor, tau: Tensor) -> Tensor:
    """|ΔW| with the entries below τ zeroed, in place.

    On the CPU this is one ``threshold_`` pass per matrix (x > the float just below τ is x >= τ): there
    ``masked_fill_`` and the comparison that builds its mask took about 20 times as long (341×3072: 1.3 vs
    0.05 ms). Elsewhere the comparison stays a tensor, so no device synchronisation reads τ. NaN entries are
    zeroed by the fast path and kept by the other; ΔW ⊙ S is NaN there either way. torch.compile takes the other
    path: the host read broke its graph in every layer, and the graph after the break was compiled again for every
    new τ (a float constant there) until the recompile limit sent the rest of the run to eager mode.
    """
    if _path(magnitude.device.type) == "cpu" and tau.dtype == magnitude.dtype and not torch.compiler.is_compiling():
        if tau.numel() == 1:
            below = torch.nextafter(tau, tau.new_tensor(-math.inf)).item()
            return F.threshold_(magnitude, below, 0.0)
        if tau.dim() == magnitude.dim() and tau.shape[0] == magnitude.shape[0] == tau.numel():
            for matrix, matrix_tau in zip(magnitude, tau, strict=True):
                _zero_below_(matrix, matrix_tau)
            return magnitude
    return magnitude.masked_fill_(magnitude < tau, 0.0)


def survivor_scale_(magnitude: Tensor, tau: Tensor, mode: str) -> Tensor:
    """The factor S with ΔWˢ = ΔW ⊙ S, computed in place over ``magnitude`` (= |ΔW|, consumed).

    reference: S = |ΔW| on survivors (ΔW·|ΔW|); mask: S = 1 on survivors; soft: S = max(|ΔW| − τ, 0).
    In the reference and mask modes S is also the factor the gradient w.r.t. ΔW gets (|ΔW| is detached).
    """
    if mode == "reference":
        return _zero_below_(magnitude, tau)
    if mode == "mask":
        return (magnitude >= tau).to(magnitude.dtype)
    if mode == "soft":
        return magnitude.sub_(tau).clamp_min_(0.0)
    raise ValueError(f"sparsify_mode must be one of {MODES}, got {mode!r}")


def gradient_scale(scale: Tensor, tau: Tensor, mode: str) -> Tensor:
    """dΔWˢ/dΔW element-wise, from the survivor factor S of :func:`survivor_scale_`.

    reference and mask: S itself. soft: ∂(ΔW·(|ΔW| − τ))/∂ΔW = 2|ΔW| − τ = 2S + τ above τ, with τ treated
    as a constant (it is a selection, not a differentiable function of one entry).
    """
    if mode == "soft":
        return torch.where(scale > 0, scale * 2.0 + tau, 0.0)
    return scale


def apply(delta: Tensor, tau: Tensor, mode: str) -> Tensor:
    """The sparsified update ΔWˢ (a new tensor). ``tau`` broadcasts against ``delta``."""
    return delta * survivor_scale_(delta.abs(), tau, mode)


def backward(delta: Tensor, tau: Tensor, mode: str, grad: Tensor) -> Tensor:
    """Gradient w.r.t. the dense ΔW given the gradient w.r.t. ΔWˢ (dropped entries get zero)."""
    return grad * gradient_scale(survivor_scale_(delta.abs(), tau, mode), tau, mode)
