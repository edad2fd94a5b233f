"""SNELLA's bi-level sparsity allocation: layers compete for a shrinking budget of non-zero ΔW entries, and inside
each layer entries compete for its share by magnitude (SNELL's top-k).

What the authors' code does (``sparse_allocator.py``, class ``Allocator``; driven by ``train_alloc.py`` and
``train_alloc_ema.py`` through ``engine.train_one_epoch``), which this module follows:

- A unit is one adapted matrix: q, k and v of a fused projection are three units, as in the authors' ViT, where
  each is a module of its own. Its size is its entry count m·n.
- Sensitivity, after every optimizer step (``update_ipt``): per factor entry I = |θ ⊙ ∇θ| over A and B (the
  authors' ``In_Qs`` and ``Out_Qs``; not over α, γ, β), NaN counted as 0; Ī ← β1·Ī + (1 − β1)·I, then
  Ū ← β2·Ū + (1 − β2)·|I − Ī| with the new Ī. Both start at 0.
- A unit's score (``mask_to_target_ratio``): mean(Ī ⊙ Ū) over A plus the same over B, for its group's slice.
  Shares are the scores over their sum (equal shares when they sum to 0).
- Budget (``schedule_threshold``), at schedule step t of T: V0 = Σ (1 − s0)·size with s0 each unit's sparsity
  at the start, V1 = Σ (1 − target)·size. For t <= init_warmup, V0 and no re-allocation; for
  t > T − final_warmup, V1, re-allocated at every call; between them int(V1 + (V0 − V1)·(1 − (t − w0) /
  (T − w1 − w0))³), re-allocated when t is a multiple of ``mask_interval``.
- Allocation (``param_alloc``): each unit gets int(V·share), capped at its size; what is left goes to the units
  below their size in proportion to their shares, capped again, until nothing is left; then truncated to an
  integer. Its sparsity becomes 1 − allocation / size, clipped to [0, 1]: it may reach 1 (nothing kept).
- The authors' scripts call the schedule once per epoch (t = the epoch, T = ``--alloc_epoch``, 100) and the
  sensitivity once per optimizer step.

Where this module differs, on purpose: it computes in float64, not float32; the left-over budget is handed out at
most once per unit (water-filling) instead of looping until a float32 sum stops moving; non-finite sensitivities
(NaN and ±inf) count as 0, where the authors' code catches only NaN, so one inf would stay in Ī for good. Where
their NaN came from: ``torch.cdist``'s backward is finite where two rows coincide (checked on torch 2.14, in its
direct and its matrix-product modes), so not the distance. Their VTAB scripts train under ``--amp``. timm's
``NativeScaler`` leaves inf/NaN gradients in ``.grad`` on the steps its GradScaler skips, and ``update_ipt`` reads
them. This package's kernels give finite gradients by construction (the zero subgradient of ‖a − b‖ at a = b, a
max-subtracted softmax), so only such a skipped step can bring one here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from snell.layers import SnellLayer, iter_snell_layers
from snell.sharded import full, like
from snell.spec import SnellSpec, with_sparsities

#: The factors whose sensitivity is measured (the authors' ``In_Qs`` and ``Out_Qs``), by their attribute names.
FACTORS = ("snell_A", "snell_B")


@dataclass(frozen=True)
class AllocatorConfig:
    """The allocation schedule (the authors' ``train_alloc*.py`` flags of the same names in brackets).

    Attributes:
        target_sparsity: the average fraction of entries zeroed at the end, over all units weighted by size, in
            [0, 1) [``--target_ratio``]. The start is each layer's own sparsity when the allocator is made
            [``--init_thres``].
        total_steps: T, the schedule's length in calls of :meth:`SparsityAllocator.update` [``--alloc_epoch``].
        init_warmup: steps at the initial budget [``--init_warmup``].
        final_warmup: steps at the target budget at the end [``--final_warmup``]; init_warmup + final_warmup
            must be below total_steps.
        mask_interval: re-allocate every this many steps while the budget shrinks [``--mask_interval``].
        beta1: EMA factor of the sensitivity, in (0, 1) [``--beta1``].
        beta2: EMA factor of its uncertainty, in (0, 1) [``--beta2``].
    """

    target_sparsity: float
    total_steps: int
    init_warmup: int = 0
    final_warmup: int = 0
    mask_interval: int = 1
    beta1: float = 0.85
    beta2: float = 0.85

    def __post_init__(self) -> None:
        if not isinstance(self.target_sparsity, (int, float)) or not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {self.target_sparsity!r}")
        for name in ("total_steps", "init_warmup", "final_warmup", "mask_interval"):
            value = getattr(self, name)
            least = 1 if name in ("total_steps", "mask_interval") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.init_warmup + self.final_warmup >= self.total_steps:
            raise ValueError(
                f"init_warmup + final_warmup must be below total_steps, got {self.init_warmup} + "
                f"{self.final_warmup} >= {self.total_steps}"
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")


class AdapterSlot(Protocol):
    """One adapted layer as the allocator sees it: its factors and its spec, read and replaced through this, so that
    the same allocator drives snell's own layers and other homes of the same adapter (a peft layer keeps one per
    adapter name, see :func:`snell.integrations.peft.snella_allocator`). Looked up at every use, never cached: a
    factor can be replaced by a new Parameter (a dtype cast) between steps."""

    def factor(self, name: str) -> Tensor:
        """The factor ``name`` ("snell_A" or "snell_B"), a Parameter whose ``.grad`` is read."""
        ...

    def spec(self) -> SnellSpec:
        """The layer's current spec (its per-group sparsities)."""
        ...

    def set_spec(self, spec: SnellSpec) -> None:
        """Make ``spec`` the layer's spec: the next forward uses its sparsities."""
        ...

    def merged(self) -> bool:
        """Whether the adapter's ΔWˢ is folded into the base weight (unmerging rebuilds it from the spec)."""
        ...


class LayerSlot:
    """An :class:`AdapterSlot` over a layer adapted in place by :func:`snell.get_snell_model`."""

    def __init__(self, layer: SnellLayer) -> None:
        self.layer = layer

    def factor(self, name: str) -> Tensor:
        return getattr(self.layer, name)

    def spec(self) -> SnellSpec:
        return self.layer.snell_spec

    def set_spec(self, spec: SnellSpec) -> None:
        self.layer.snell_spec = spec

    def merged(self) -> bool:
        return self.layer.snell_merged


def _unit_sizes(spec: SnellSpec) -> list[int]:
    groups, rows, n = spec.grouped_shape
    return [rows * n] * groups


def budget(config: AllocatorConfig, initial: float, target: float, step: int) -> tuple[float, bool]:
    """(non-zero entries allowed at schedule step ``step``, whether to re-allocate now)."""
    if step <= config.init_warmup:
        return initial, False
    if step > config.total_steps - config.final_warmup:
        return target, True
    span = config.total_steps - config.final_warmup - config.init_warmup
    remaining = 1.0 - (step - config.init_warmup) / span
    return float(int(target + (initial - target) * remaining**3)), step % config.mask_interval == 0


def scheduled_end(config: AllocatorConfig, init_sparsity: float) -> float | None:
    """The overall sparsity the schedule's last re-allocation gives (steps 0 … total_steps − 1, as the authors' loop
    steps it) to an adapter whose layers start at ``init_sparsity``, or None when no step re-allocates. Without final
    warm-up it falls (1/T)³ of the way short of the target, more where ``mask_interval`` skips the last steps."""
    scale = 1e12  # budget() counts whole entries: these are fractions of a notional 10^12-entry adapter
    initial, target = (1.0 - init_sparsity) * scale, (1.0 - config.target_sparsity) * scale
    ends = [volume for volume, due in (budget(config, initial, target, t) for t in range(config.total_steps)) if due]
    return 1.0 - ends[-1] / scale if ends else None


def allocate(scores: Tensor, volume: float, sizes: Tensor) -> Tensor:
    """Integer entry counts per unit: ``volume`` shared by ``scores``, each capped at its size (float64 in and out)."""
    total = scores.sum()
    shares = scores / total if total > 0 else torch.full_like(scores, 1.0 / scores.numel())
    counts = torch.minimum(torch.floor(volume * shares), sizes)
    for _ in range(scores.numel()):  # each round either hands out the rest or fills at least one more unit
        left = volume - counts.sum()
        weights = torch.where(counts < sizes, shares, 0.0)
        if left <= 0 or weights.sum() <= 0:
            break
        counts = counts + torch.minimum(left * weights / weights.sum(), sizes - counts)
    return torch.floor(counts)


class SparsityAllocator:
    """Sets every SNELL layer's sparsity during training from its factors' sensitivity (SNELLA).

    Call :meth:`accumulate` after every optimizer step, while the gradients are still there (unscaled, under a
    GradScaler), and :meth:`update` with the schedule step (the authors: once per epoch, with the epoch, before
    it). Per-layer sparsities go into each layer's spec, so the forward uses them at once, and are saved by
    :func:`snell.save_adapter`. :meth:`state_dict` / :meth:`load_state_dict` resume bit for bit.

    Under FSDP2 (factors and gradients sharded as DTensors) the averages are shards made like the factors and
    updated element by element, as whole tensors are; :meth:`update` and :meth:`state_dict` all-gather them (bits
    copied), so every process allocates as one unsharded process would. Those two are then collective: every process
    calls them, in the same order.

    ``slots`` (name → :class:`AdapterSlot`) replaces the model's own SNELL layers as what is allocated: how the peft
    integration points the allocator at one adapter of a peft model. The model is then only named in messages.
    """

    def __init__(
        self, model: nn.Module, config: AllocatorConfig, slots: Mapping[str, AdapterSlot] | None = None
    ) -> None:
        self.model = model
        self.config = config
        if slots is None:
            slots = {name: LayerSlot(layer) for name, layer in iter_snell_layers(model)}
        self.slots: dict[str, AdapterSlot] = dict(slots)
        if not self.slots:
            raise ValueError(f"{type(model).__name__} has no SNELL layers to allocate sparsity to")
        sizes = [size for slot in self.slots.values() for size in _unit_sizes(slot.spec())]
        self.sizes = torch.tensor(sizes, dtype=torch.float64)
        start = torch.tensor([s for sparsities in self.sparsity().values() for s in sparsities], dtype=torch.float64)
        self.initial_volume = float(((1.0 - start) * self.sizes).sum())
        self.target_volume = float((1.0 - config.target_sparsity) * self.sizes.sum())
        self.sensitivity: dict[str, Tensor] = {}
        self.uncertainty: dict[str, Tensor] = {}
        for name, slot in self.slots.items():
            for factor in FACTORS:
                param = slot.factor(factor)
                self.sensitivity[f"{name}.{factor}"] = torch.zeros_like(param, dtype=torch.float64)
                self.uncertainty[f"{name}.{factor}"] = torch.zeros_like(param, dtype=torch.float64)

    def sparsity(self) -> dict[str, list[float]]:
        """Each layer's current sparsities, one per adapter group."""
        found = {}
        for name, slot in self.slots.items():
            spec = slot.spec()
            found[name] = [spec.sparsity_of(g) for g in range(spec.groups)]
        return found

    def kept_ratio(self) -> float:
        """The fraction of all adapted entries kept now, weighted by size (1 − the overall sparsity; what
        ``target_sparsity`` is the complement of at the end)."""
        sparsity = torch.tensor([s for values in self.sparsity().values() for s in values], dtype=torch.float64)
        return float(((1.0 - sparsity) * self.sizes).sum() / self.sizes.sum())

    @torch.no_grad()
    def accumulate(self) -> None:
        """Fold the factors' current |θ ⊙ ∇θ| into the sensitivity and uncertainty EMAs (a factor without a
        gradient counts as 0)."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for name, slot in self.slots.items():
            for factor in FACTORS:
                param, key = slot.factor(factor), f"{name}.{factor}"
                if param.grad is None:
                    current = torch.zeros_like(self.sensitivity[key])
                else:
                    current = (param.double() * param.grad.double()).abs_().nan_to_num_(0.0, 0.0, 0.0)
                average = self.sensitivity[key].mul_(beta1).add_(current, alpha=1.0 - beta1)
                self.uncertainty[key].mul_(beta2).add_(current.sub_(average).abs_(), alpha=1.0 - beta2)

    def scores(self) -> Tensor:
        """Each unit's score, float64 on the CPU (where :func:`allocate` counts), in layer order (q, k, v of a fused
        projection one after the other). Collective when the factors are sharded."""
        scores = []
        for name, slot in self.slots.items():
            products = []
            for factor in FACTORS:
                key = f"{name}.{factor}"
                product = full(self.sensitivity[key] * self.uncertainty[key])
                products.append(product.reshape(slot.spec().groups, -1).mean(-1))
            scores.append(products[0] + products[1])
        return torch.cat(scores).cpu()

    def update(self, step: int) -> dict[str, list[float]] | None:
        """Apply the schedule at ``step``: re-allocate when it says so and return the new sparsities, else None."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        volume, reallocate = budget(self.config, self.initial_volume, self.target_volume, step)
        if not reallocate:
            return None
        self._check_unmerged()
        counts = allocate(self.scores(), volume, self.sizes)
        ratios = (1.0 - counts / self.sizes).clamp_(0.0, 1.0).tolist()
        sparsity, first = {}, 0
        for name, slot in self.slots.items():
            groups = slot.spec().groups
            sparsity[name] = ratios[first : first + groups]
            first += groups
        self._apply(sparsity)
        return sparsity

    def set_sparsity(self, sparsity: Mapping[str, list[float]]) -> None:
        """Give every layer the sparsities of ``sparsity`` (as :meth:`sparsity` returns them), e.g. to go back to
        the ones of a selected epoch; checked first, nothing changes on a mismatch. The EMAs are not touched."""
        self._check_sparsity(sparsity)
        self._check_unmerged()
        self._apply(sparsity)

    def _check_unmerged(self) -> None:
        """ValueError while an adapter is merged: unmerging subtracts the ΔWˢ its spec gives then, so a sparsity
        changed in between would leave W0 changed for good."""
        merged = [name for name, slot in self.slots.items() if slot.merged()]
        if merged:
            raise ValueError(
                f"{len(merged)} adapted layers (e.g. {merged[0]!r}) are merged into their weights: unmerge them "
                "before the allocator changes their sparsities"
            )

    def _check_sparsity(self, sparsity: Mapping[str, list[float]]) -> None:
        if set(sparsity) != set(self.slots) or any(
            len(sparsity[name]) != slot.spec().groups or not all(0.0 <= s <= 1.0 for s in sparsity[name])
            for name, slot in self.slots.items()
        ):
            raise ValueError("the sparsities given do not match this model's layers or are not in [0, 1]")

    def _apply(self, sparsity: Mapping[str, list[float]]) -> None:
        for name, slot in self.slots.items():
            slot.set_spec(with_sparsities(slot.spec(), list(sparsity[name])))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: the EMAs (whole tensors, also from a sharded model), the budgets and the
        current sparsities."""
        return {
            "config": asdict(self.config),
            "initial_volume": self.initial_volume,
            "target_volume": self.target_volume,
            "sensitivity": {k: full(v).clone() for k, v in self.sensitivity.items()},
            "uncertainty": {k: full(v).clone() for k, v in self.uncertainty.items()},
            "sparsity": self.sparsity(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; checked against this model first (nothing changes on a mismatch)."""
        if AllocatorConfig(**state["config"]) != self.config:
            raise ValueError(f"the allocator state was saved with {state['config']}, this allocator has {self.config}")
        for kind in ("sensitivity", "uncertainty"):
            mine, theirs = getattr(self, kind), state[kind]
            if set(theirs) != set(mine) or any(theirs[k].shape != mine[k].shape for k in mine):
                raise ValueError(f"the allocator state's {kind} does not match this model's SNELL layers")
        sparsity = state["sparsity"]
        try:
            self._check_sparsity(sparsity)
        except ValueError:
            raise ValueError(
                "the allocator state's sparsities do not match this model's layers or are not in [0, 1]"
            ) from None
        for kind in ("initial_volume", "target_volume"):
            if not math.isfinite(state[kind]):
                raise ValueError(f"the allocator state's {kind} must be finite, got {state[kind]!r}")
        self._check_unmerged()
        for kind in ("sensitivity", "uncertainty"):
            for key, value in getattr(self, kind).items():
                value.copy_(like(value, state[kind][key]))  # a shard takes its slice of the whole
        self.initial_volume, self.target_volume = float(state["initial_volume"]), float(state["target_volume"])
        self._apply(sparsity)
