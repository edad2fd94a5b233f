"""Faithful re-implementation of the SNELL authors' reference layout, used as the benchmark baseline.

This module deliberately keeps the reference code's slow, memory-hungry design so that our fused
implementation is measured against what the paper's numbers came from:

* a parallel adapter branch per target linear, y = W0 x + b + DropPath(ΔWˢ · Dropout(x));
* factors stored as (P, n, r/P) and (P, m, r/P) with P = 2, Kaiming-uniform(a=√5) on those shapes;
* the piecewise-linear kernel via ``torch.cdist`` with fixed α = (+0.1, −0.1);
* τ = ``torch.quantile`` of |ΔW| pulled to the host with ``.item()`` (fp32/fp64 only, at most 2^24
  entries, raising torch's own errors);
* kept entries become ΔW·|ΔW| with |ΔW| detached; sparsity 0 silently switches to the dense ΔW;
* the whole branch is wrapped in non-reentrant gradient checkpointing, so ΔW and τ are rebuilt in
  backward.

Do not optimise anything here: the point is to be the slow baseline.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

PIECES = 2
"""Number of contiguous slices P of each factor row used by the piecewise-linear kernel."""

ALPHAS = (0.1, -0.1)
"""Fixed per-piece weights α_p of the reference code (the paper calls them learnable)."""

KERNELS = ("piecewise_linear", "linear")

QUANTILE_MAX_NUMEL = 2**24
"""torch.quantile's input cap in the reference's torch 1.12; newer torch lifted it, we keep it."""


def split_pieces(factor: Tensor, pieces: int = PIECES) -> Tensor:
    """Turn a 2-D factor (rows, r) into this module's (P, rows, r/P) layout.

    Lets other tests express factors in the paper's (n, r) notation: piece p is the p-th contiguous
    slice of width r/P of every row.
    """
    rows, rank = factor.shape
    if rank % pieces:
        raise ValueError(f"rank {rank} is not divisible by {pieces} pieces")
    return factor.reshape(rows, pieces, rank // pieces).transpose(0, 1)


def piecewise_linear_kernel(A: Tensor, B: Tensor) -> Tensor:
    """ΔW[j, i] = Σ_p α_p ‖A[p, i] − B[p, j]‖₂, computed the reference way with ``torch.cdist``."""
    distances = torch.cdist(B, A)  # (P, m, n)
    return sum(alpha * distances[p] for p, alpha in enumerate(ALPHAS))


def linear_kernel(A: Tensor, B: Tensor) -> Tensor:
    """ΔW = B Aᵀ over the concatenated pieces: plain LoRA, the paper's linear-kernel ablation."""
    return torch.einsum("pmk,pnk->mn", B, A)


def kernel_delta(A: Tensor, B: Tensor, kernel: str = "piecewise_linear") -> Tensor:
    """Dense merged update ΔW with shape (m, n) for factors A (P, n, r/P) and B (P, m, r/P)."""
    # Looked up by name at call time so tests can count kernel evaluations by patching the module.
    if kernel == "piecewise_linear":
        return piecewise_linear_kernel(A, B)
    if kernel == "linear":
        return linear_kernel(A, B)
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")


def sparsify(delta: Tensor, sparsity: float) -> Tensor:
    """Reference competition: keep |ΔW| >= τ as ΔW·|ΔW| (|ΔW| detached), zero the rest.

    τ is ``torch.quantile`` (linear interpolation) pulled to the host, exactly like the reference,
    including the device sync and its limits: fp32/fp64 only (torch still checks that) and at most
    2^24 entries (checked here with torch 1.12's error, since recent torch no longer refuses).
    Sparsity 0 returns the dense ΔW without the |ΔW| factor, which is what the reference code does.
    """
    if sparsity == 0:
        return delta
    if delta.numel() > QUANTILE_MAX_NUMEL:
        raise RuntimeError("quantile() input tensor is too large")
    magnitude = delta.abs()
    tau = torch.quantile(magnitude.flatten(), sparsity).item()
    return torch.where(magnitude >= tau, delta * magnitude.detach(), 0.0)


def reference_delta(A: Tensor, B: Tensor, sparsity: float, kernel: str = "piecewise_linear") -> Tensor:
    """Sparsified update ΔWˢ (m, n) for factors in this module's (P, rows, r/P) layout.

    Exposed so other test suites can compare their implementation with the reference formula.
    """
    return sparsify(kernel_delta(A, B, kernel), sparsity)


def _branch(x: Tensor, A: Tensor, B: Tensor, sparsity: float, kernel: str) -> Tensor:
    """Kernel + quantile + sparsify + matmul: the unit the reference wraps in checkpointing."""
    return F.linear(x, reference_delta(A, B, sparsity, kernel))


class ReferenceSnellBranch(nn.Module):
    """One adapter branch for one weight matrix (m, n): own A, B, dropout, DropPath and quantile."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        sparsity: float = 0.9,
        dropout: float = 0.1,
        drop_path: float = 0.1,
        kernel: str = "piecewise_linear",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
        if r % PIECES:
            raise ValueError(f"rank {r} is not divisible by {PIECES} pieces")
        self.sparsity = sparsity
        self.kernel = kernel
        piece = r // PIECES
        self.A = nn.Parameter(torch.empty(PIECES, in_features, piece, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(PIECES, out_features, piece, device=device, dtype=dtype))
        # Kaiming on the 3-D shapes: fan_in = rows·r/P, and ΔW is not zero at step 0, as in the reference.
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """DropPath(ΔWˢ · Dropout(x)), with ΔWˢ rebuilt in backward by checkpointing."""
        out = checkpoint(_branch, self.dropout(x), self.A, self.B, self.sparsity, self.kernel, use_reentrant=False)
        return self.drop_path(out)


class ReferenceSnellLinear(nn.Module):
    """Frozen ``nn.Linear`` plus parallel SNELL branches, one per equal slice of its outputs.

    ``splits=3`` reproduces the reference's q/k/v split of timm's fused qkv: each of q, k and v gets
    its own factors and its own quantile. The base output comes from the original module untouched.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        sparsity: float = 0.9,
        dropout: float = 0.1,
        drop_path: float = 0.1,
        kernel: str = "piecewise_linear",
        splits: int = 1,
    ) -> None:
        super().__init__()
        if base.out_features % splits:
            raise ValueError(f"{base.out_features} outputs cannot be split into {splits} equal parts")
        self.base = base.requires_grad_(False)
        self.branches = nn.ModuleList(
            ReferenceSnellBranch(
                base.in_features,
                base.out_features // splits,
                r=r,
                sparsity=sparsity,
                dropout=dropout,
                drop_path=drop_path,
                kernel=kernel,
                device=base.weight.device,
                dtype=base.weight.dtype,
            )
            for _ in range(splits)
        )

    def forward(self, x: Tensor) -> Tensor:
        """W0 x + b from the original module plus the (concatenated) adapter branch outputs."""
        out = self.base(x)
        if len(self.branches) == 1:
            return out + self.branches[0](x)
        return out + torch.cat([branch(x) for branch in self.branches], dim=-1)


def inject_reference_snell(
    model: nn.Module,
    r: int = 8,
    sparsity: float = 0.9,
    dropout: float = 0.1,
    drop_path: float = 0.1,
    kernel: str = "piecewise_linear",
) -> nn.Module:
    """Add reference SNELL adapters to every block of a timm ViT/Swin, in place, and freeze the rest.

    Targets attn.qkv (split into q, k, v), attn.proj (no input dropout, as in the reference),
    mlp.fc1 and mlp.fc2. Only the adapters, the classifier head and cls_token stay trainable.
    The reference also trains with backbone drop-path 0.1: pass ``drop_path_rate`` to
    ``timm.create_model`` for that, it is not this function's job.
    """
    model.requires_grad_(False)
    options = {"r": r, "sparsity": sparsity, "drop_path": drop_path, "kernel": kernel}
    blocks = [
        module
        for module in model.modules()
        if isinstance(getattr(getattr(module, "attn", None), "qkv", None), nn.Linear)
        and isinstance(getattr(getattr(module, "mlp", None), "fc1", None), nn.Linear)
    ]
    if not blocks:
        raise ValueError("no timm ViT/Swin blocks (attn.qkv + mlp.fc1) found in the model")
    for block in blocks:
        attn, mlp = block.attn, block.mlp
        attn.qkv = ReferenceSnellLinear(attn.qkv, dropout=dropout, splits=3, **options)
        attn.proj = ReferenceSnellLinear(attn.proj, dropout=0.0, **options)
        mlp.fc1 = ReferenceSnellLinear(mlp.fc1, dropout=dropout, **options)
        mlp.fc2 = ReferenceSnellLinear(mlp.fc2, dropout=dropout, **options)
    model.get_classifier().requires_grad_(True)
    cls_token = getattr(model, "cls_token", None)
    if cls_token is not None:
        cls_token.requires_grad_(True)
    return model
