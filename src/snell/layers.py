"""SNELL layers: an existing Linear / Conv2d / Conv1D gains factors A, B in place.

Injection changes the module's class to a subclass of its own class (minLoRA's spirit: no model surgery),
so the module tree, isinstance checks and the state_dict keys of the base weights stay as they were;
the adapter adds ``snell_A`` and ``snell_B`` next to ``weight``. Unloading restores the original class.
Frozen normalisation layers with running statistics are held in eval mode the same way (FrozenStatsNorm).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils import parametrize

from snell.config import PIECEWISE_KERNELS, SnellConfig, unmatched
from snell.dispatch import implementation, kernel_path
from snell.dropout import FusedSnellDropout
from snell.function import FusedSnell, sparse_delta
from snell.spec import SnellSpec, to_weight_layout, with_sparsities

# Fused projections whose output rows stack several matrices that the reference code adapts and sparsifies
# separately (q, k, v), and how many: Phi-3 fuses q/k/v as qkv_proj, and its MLP's gate and up as gate_up_proj.
FUSED_PARTS = {"qkv": 3, "c_attn": 3, "qkv_proj": 3, "Wqkv": 3, "gate_up_proj": 2}


# Subclasses of nn.Linear whose own forward computes x·Wᵀ + b as nn.Linear's does (timm's casts for TorchScript only;
# Falcon's adds the bias after the product). Any other subclass with its own forward is refused: the SNELL layer
# replaces the forward, and would silently drop what it did (timm's Conv2dSame pads, StdConv2d standardises W).
_PLAIN_FORWARDS = frozenset({"timm.layers.linear.Linear", "transformers.models.falcon.modeling_falcon.FalconLinear"})


def _own_forward(module: nn.Module, base: type[nn.Module]) -> type[nn.Module] | None:
    """The subclass of ``base`` that gives ``module`` a forward other than ``base``'s, or None."""
    owner = next(cls for cls in type(module).__mro__ if "forward" in vars(cls))
    if owner is base or f"{owner.__module__}.{owner.__qualname__}" in _PLAIN_FORWARDS:
        return None
    return owner


_BASES = {"linear": nn.Linear, "conv2d": nn.Conv2d}  # the torch layers whose forward a SNELL layer replaces


def describe_support(module: nn.Module) -> str | None:
    """The op SNELL uses for ``module``'s layer type, or None when the type is not supported (a subclass with a
    forward of its own is refused by :func:`build_spec`)."""
    for op, base in _BASES.items():
        if isinstance(module, base):
            return op
    # transformers' Conv1D (GPT-2 family): a linear layer whose weight is stored (in, out).
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2 and hasattr(module, "nf"):
        return "linear_t"
    return None


def takes_adapter(name: str, module: nn.Module, parent: nn.Module) -> bool:
    """Whether ``module`` (``name``, a child of ``parent``) is a layer that :func:`build_spec` and
    :func:`check_forward_called` accept whatever the config: the presets' block rule adapts only such layers, so that
    a default never names one they refuse."""
    return adapter_refusal(name, module, parent) is None


def adapter_refusal(name: str, module: nn.Module, parent: nn.Module) -> Exception | None:
    """The error :func:`build_spec` or :func:`check_forward_called` raises for ``module`` whatever the config, or None
    when it takes an adapter."""
    refusal = _refusal(name, module)
    if refusal is None:
        try:
            check_forward_called(name, parent)
        except TypeError as err:
            return err
    return refusal


def _refusal(name: str, module: nn.Module) -> Exception | None:
    """The error :func:`build_spec` raises for ``module``'s layer itself (its type, its forward, a conv's padding),
    whatever the config; None when it takes an adapter."""
    op = describe_support(module)
    base = _BASES.get(op)
    owner = _own_forward(module, base) if base is not None else None
    if owner is not None:
        return TypeError(
            f"module {name!r} is a {type(module).__name__}, whose {owner.__name__}.forward does more than "
            f"{base.__name__}'s (SNELL replaces the forward and would drop it): it cannot take a SNELL adapter"
        )
    if op is None:
        return TypeError(
            f"module {name!r} of type {type(module).__name__} cannot take a SNELL adapter; supported: "
            "nn.Linear, nn.Conv2d, transformers Conv1D"
        )
    if op != "conv2d":
        return None
    if module.padding_mode != "zeros":
        return ValueError(f"conv {name!r} uses padding_mode={module.padding_mode!r}; only 'zeros' is supported")
    padding = module.padding
    if isinstance(padding, str) and padding != "valid" and module.kernel_size != (1, 1):
        return ValueError(f"conv {name!r} uses padding={padding!r}; give explicit integer padding")
    return None


# A Mamba mixer (the selective-scan SSM of Mamba, Mamba-2 and their hybrids: the module holding the parameters
# ``A_log`` and ``D``; gated-delta-rule layers have A_log without D and call their projections) hands these layers'
# weights to its fused kernels, and Mamba's and Jamba's own paths multiply by dt_proj.weight on every device.
_SSM_WEIGHTS_READ = ("x_proj", "dt_proj", "out_proj")


def _weight_read_by(parent: nn.Module, child: str) -> bool:
    """Whether ``parent`` may compute with its child ``child``'s weight without calling the child's forward."""
    if isinstance(parent, (nn.MultiheadAttention, nn.TransformerEncoderLayer)):
        return True
    selective_scan = all(isinstance(getattr(parent, p, None), nn.Parameter) for p in ("A_log", "D"))
    return selective_scan and child in _SSM_WEIGHTS_READ


def check_forward_called(name: str, parent: nn.Module) -> None:
    """TypeError when module ``name``'s parent does not call its forward: nn.MultiheadAttention reads out_proj's weight
    itself, nn.TransformerEncoderLayer's inference fast path reads linear1's and linear2's, and a Mamba mixer passes
    x_proj's, dt_proj's and out_proj's to its kernels, so an adapter there would never act, or act in training and not
    in eval (or on the CPU and not on a GPU), while merging it would change the outputs."""
    if _weight_read_by(parent, name.rpartition(".")[2]):
        raise TypeError(
            f"module {name!r} belongs to a {type(parent).__name__}, which reads its weight without calling its "
            "forward: it cannot take a SNELL adapter"
        )


#: Marks a module whose ``qkv_bias_separate`` :func:`call_through_forward` set, for :func:`restore_forward`.
_SWITCHED = "_snell_set_qkv_bias_separate"


def call_through_forward(name: str, parent: nn.Module) -> None:
    """Make ``parent`` call module ``name``'s forward where it has a switch for it. timm's BEiT, EVA and Swin V2
    attention compute ``F.linear(x, qkv.weight, q/k/v bias)`` when they have q and v biases, never calling qkv, so
    an adapter there would never act (and a merge would change the outputs). Their own ``qkv_bias_separate``
    computes ``qkv(x)`` and adds the same bias after it: x·Wᵀ + b in two steps. Call after every check has passed;
    :func:`restore_forward` turns the switch back when the adapters are removed."""
    if (
        name.rpartition(".")[2] == "qkv"
        and getattr(parent, "q_bias", None) is not None
        and getattr(parent, "qkv_bias_separate", None) is False
    ):
        parent.qkv_bias_separate = True
        setattr(parent, _SWITCHED, True)


def restore_forward(model: nn.Module) -> None:
    """Undo :func:`call_through_forward` in ``model`` once its adapters are gone, so that an unloaded model computes
    exactly as before injection (one F.linear with the bias, not a product and an addition)."""
    for module in model.modules():
        if module.__dict__.pop(_SWITCHED, False):
            module.qkv_bias_separate = False


def _fused_groups(name: str, out_features: int, config: SnellConfig, parent: nn.Module | None) -> int:
    """How many matrices the output rows of layer ``name`` stack, to adapt one by one (1: one matrix). A fused
    q/k/v of grouped-query attention (its ``parent`` has ``num_key_value_groups`` > 1) stacks unequal q, k and v,
    which equal groups would straddle: it is adapted as one matrix, with a warning."""
    parts = FUSED_PARTS.get(name.rpartition(".")[2], 1) if config.split_fused_qkv else 1
    if parts == 1 or out_features % parts:
        return 1
    if parts == 3 and getattr(parent, "num_key_value_groups", 1) != 1:
        warnings.warn(
            f"{type(parent).__name__} fuses q, k and v of unequal sizes (grouped-query attention): its fused "
            "projection is adapted and sparsified as one matrix, not as q, k and v apart",
            stacklevel=3,
        )
        return 1
    return parts


def build_spec(
    name: str, module: nn.Module, config: SnellConfig, parent: nn.Module | None = None, groups: int | None = None
) -> SnellSpec:
    """Describe how ``module`` (a child of ``parent``) is adapted; raises TypeError/ValueError before anything is
    changed. ``groups`` is the grouping an adapter file records for the layer (files from before Phi-3's gate_up_proj
    and grouped-query qkv_proj were grouped as they are now keep theirs); None: this version's rule."""
    refusal = _refusal(name, module)
    if refusal is not None:
        raise refusal
    op = describe_support(module)
    weight_shape = tuple(module.weight.shape)
    conv = {}
    if op == "conv2d":
        # a string here is "valid", or "same" on a 1x1 kernel (_refusal): both pad nothing
        padding = (0, 0) if isinstance(module.padding, str) else module.padding
        conv = dict(
            stride=tuple(module.stride),
            padding=tuple(padding),
            dilation=tuple(module.dilation),
            conv_groups=module.groups,
        )
    out_features = weight_shape[1] if op == "linear_t" else weight_shape[0]
    if groups is None:
        groups = _fused_groups(name, out_features, config, parent)
    elif groups < 1 or out_features % groups:
        raise ValueError(f"layer {name!r}: {groups} adapter groups do not divide its {out_features} output features")
    spec = SnellSpec(
        op=op,
        weight_shape=weight_shape,
        kernel=config.kernel,
        num_pieces=config.num_pieces if config.kernel in PIECEWISE_KERNELS else 1,
        mode=config.sparsify_mode,
        sparsity=float(config.sparsity),
        groups=groups,
        **conv,
    )
    saved = (config.layer_sparsity or {}).get(name)
    if saved is None:
        return spec
    try:
        return with_sparsities(spec, saved)
    except ValueError as err:
        raise ValueError(f"layer_sparsity[{name!r}]: {err}") from None


def check_layer_names(config: SnellConfig, adapted: list[str], model: nn.Module) -> None:
    """ValueError when a setting that names layers names one that is not among ``adapted``: a ``layer_sparsity``
    key (a typo or a short name would silently leave that layer at ``sparsity``), or an entry of an
    ``undropped_modules`` list (dropout would silently stay on every layer; a regex may match none: the recipes' one
    serves any backbone)."""
    unknown = sorted(set(config.layer_sparsity or {}) - set(adapted))
    if unknown:
        raise ValueError(
            f"layer_sparsity names {unknown}, which are not among the {len(adapted)} layers adapted in "
            f"{type(model).__name__} (full module names, such as {adapted[0]!r})"
        )
    idle = unmatched(config.undropped_modules, adapted) if isinstance(config.undropped_modules, list) else []
    if idle:
        raise ValueError(
            f"undropped_modules {idle} match none of the {len(adapted)} layers adapted in {type(model).__name__}, "
            "so they would keep dropout on none"
        )


def sample_keep_scale(x: Tensor, p: float, spec: SnellSpec) -> Tensor | None:
    """Stochastic depth's per-sample factor, shaped to broadcast over a layer output of x's rank: 0 with
    probability p, else 1 / (1 − p); None when p = 0. A split fused q/k/v layer draws one per sample and group,
    as the reference code's separate q, k and v adapters each have their own DropPath."""
    if p == 0.0:
        return None
    features = 1 if spec.op == "conv2d" else x.dim() - 1  # where the output's features are
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[features] = spec.groups
    keep = torch.empty(shape, device=x.device, dtype=torch.float32).bernoulli_(1.0 - p).div_(1.0 - p)
    if spec.groups == 1:
        return keep
    return keep.repeat_interleave(spec.matrix_shape[0] // spec.groups, dim=features)


def adapted_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    coefficients: Tensor,
    spec: SnellSpec,
    dropout: float = 0.0,
    drop_path: float = 0.0,
) -> Tensor:
    """op(x, W0 + ΔWˢ) + b for one adapted layer: the one forward every SNELL layer runs (the in-place
    SnellLayer here, the peft integration's wrapper layer), so there is a single implementation of the method.
    Pass dropout = drop_path = 0 in eval mode. With ``weight`` and ``bias`` None it is the adapter branch alone,
    op(x, ΔWˢ) (what a further active adapter of a peft layer adds)."""
    if spec.op == "conv2d" and x.dim() == 3:  # an unbatched (C, H, W) image, as nn.Conv2d takes: a batch of one
        return adapted_forward(x.unsqueeze(0), weight, bias, a, b, coefficients, spec, dropout, drop_path).squeeze(0)
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    if dropout == 0.0 and drop_path == 0.0:
        return FusedSnell.apply(x, weight, bias, a, b, coefficients, spec)
    keep = sample_keep_scale(x, drop_path, spec)
    return FusedSnellDropout.apply(x, weight, bias, a, b, coefficients, spec, dropout, keep)


def kernel_coefficients(coefficients: Tensor, mix: Tensor | None) -> Tensor:
    """The coefficients the kernel takes: ``coefficients`` alone, or for mixk one row per adapter group, the P
    piecewise coefficients followed by that group's trained (α, γ, β) from ``mix`` (G, 3)."""
    if mix is None:
        return coefficients
    return torch.cat([coefficients.to(mix.dtype).expand(mix.shape[0], -1), mix], -1)


@torch.no_grad()
def delta_weight(spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor, dtype: torch.dtype) -> Tensor:
    """ΔWˢ in the layout of the layer's weight, in ``dtype`` (what merging adds to the weight)."""
    delta_s, _ = sparse_delta(spec, a, b, coefficients)
    return to_weight_layout(spec, delta_s).to(dtype)


def check_mergeable(name: str, module: nn.Module) -> None:
    """ValueError when ``module``'s weight is computed on every forward (a torch parametrization, or the hook of
    torch.nn.utils.weight_norm / spectral_norm): ΔWˢ added to it would be recomputed away, and a merge that
    reports success would lose the adapter."""
    hooked = [h for h in module._forward_pre_hooks.values() if getattr(h, "name", None) == "weight"]
    if parametrize.is_parametrized(module, "weight") or hooked:
        raise ValueError(
            f"the weight of {name} is computed from other tensors on every forward (a parametrization such as "
            "weight_norm): ΔW cannot be merged into it; keep this adapter unmerged, or remove the parametrization first"
        )


@torch.no_grad()
def fold_delta(spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor, weight: Tensor) -> None:
    """weight ← weight + ΔWˢ in place, built the way the adapted forward of a model in the weight's dtype builds the
    weight it multiplies by, by the same path (:func:`snell.dispatch.kernel_path`): a merged model computes what the
    adapted one did, bit for bit. (Adding ΔWˢ to W0 apart would round twice: the torch path's forward adds with a fused
    multiply-add.)"""
    path = kernel_path(spec, weight.device, a.shape[-1], weight.dtype, a.dtype, weight.dtype)
    merged, _ = implementation(path).merged_and_tau(spec, a, b, coefficients, weight, weight.dtype)
    weight.copy_(to_weight_layout(spec, merged.reshape(spec.grouped_shape)).to(weight.dtype))


@torch.no_grad()
def unfold_delta(spec: SnellSpec, a: Tensor, b: Tensor, coefficients: Tensor, weight: Tensor) -> None:
    """weight ← weight − ΔWˢ in place, subtracted in float32 (or wider) and rounded once to the weight's dtype: a
    half-precision W0 comes back to within a unit in its last place."""
    wide = torch.promote_types(torch.promote_types(weight.dtype, a.dtype), torch.float32)
    delta = delta_weight(spec, a, b, coefficients, wide)
    if weight.dtype == wide:  # nothing to round: subtract in place (``weight.to(wide)`` would be weight itself)
        weight.sub_(delta)
    else:
        weight.copy_(weight.to(wide).sub_(delta))


class _Mixin(nn.Module):
    """What snell puts in front of a module's own class at run time (:func:`_mixed_class`)."""

    #: the mixed class's name is this followed by the base class's
    class_prefix: str

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its parts: the mixed class exists in a process only once made there, so pickling it by name
        # would make a model saved whole (torch.save) unloadable elsewhere, and two base classes of the same name
        # (timm's Linear, torch's) would share one.
        mixin, base = type(self).__bases__
        return _remix, (mixin, base), self.__getstate__()


def _remix(mixin: type[_Mixin], base: type[nn.Module]) -> nn.Module:
    """An empty instance of the mixed class, for unpickling (which then sets its state)."""
    cls = _mixed_class(mixin, base)
    return cls.__new__(cls)


class SnellLayer(_Mixin):
    """Mixin placed in front of the original layer class; never instantiated directly."""

    class_prefix = "Snell"

    snell_spec: SnellSpec
    snell_dropout: float
    snell_drop_path: float
    snell_merged: bool
    snell_disabled: bool
    snell_mix: nn.Parameter | None

    @property
    def A(self) -> nn.Parameter:
        """(in_features, r), or (groups, in_features, r) for a split fused projection."""
        return self.snell_A

    @property
    def B(self) -> nn.Parameter:
        """(out_features, r), or (groups, out_features / groups, r) for a split fused projection."""
        return self.snell_B

    def forward(self, x: Tensor) -> Tensor:
        if self.snell_merged and self.training and torch.is_grad_enabled() and self.snell_A.requires_grad:
            # The factors would get no gradient (W0 + ΔWˢ is one frozen tensor): say so now, not at backward.
            raise RuntimeError(
                "adapters are merged into the weights, which is for inference: call unmerge_adapters(model) "
                "before training, or run the merged model in eval mode or under torch.no_grad()"
            )
        if self.snell_merged or self.snell_disabled:
            return super().forward(x)
        factors = (self.snell_A, self.snell_B, self.kernel_coefficients())
        dropout = (self.snell_dropout, self.snell_drop_path) if self.training else (0.0, 0.0)
        return adapted_forward(x, self.weight, self.bias, *factors, self.snell_spec, *dropout)

    def kernel_coefficients(self) -> Tensor:
        """The coefficients this layer's kernel takes (see :func:`kernel_coefficients`)."""
        return kernel_coefficients(self.snell_coefficients, self.snell_mix)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """The sparsified update ΔWˢ in the layout and dtype of the base weight (no gradient)."""
        return delta_weight(self.snell_spec, self.snell_A, self.snell_B, self.kernel_coefficients(), self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔWˢ into the base weight: inference then costs exactly the base layer."""
        if not self.snell_merged:
            fold_delta(self.snell_spec, self.snell_A, self.snell_B, self.kernel_coefficients(), self.weight)
            self.snell_merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔWˢ out of the base weight again; an error when it is not in (that would corrupt W0)."""
        if not self.snell_merged:
            raise ValueError("adapters are not merged into this layer's weight; there is nothing to unmerge")
        self.snell_merged = False
        unfold_delta(self.snell_spec, self.snell_A, self.snell_B, self.kernel_coefficients(), self.weight)

    def extra_repr(self) -> str:
        spec = self.snell_spec
        return (
            f"{super().extra_repr()}, snell(r={self.snell_A.shape[-1]}, kernel={spec.kernel}, "
            f"sparsity={spec.group_sparsity or spec.sparsity}, mode={spec.mode}, groups={spec.groups})"
        )


class FrozenStatsNorm(_Mixin):
    """Mixin for a frozen normalisation layer with running statistics: it stays in eval mode whatever
    ``model.train()`` says, because the adapter does not store those statistics (training would otherwise
    move them and the saved adapter would not reproduce the trained model)."""

    class_prefix = "FrozenStats"

    def train(self, mode: bool = True) -> FrozenStatsNorm:
        return super().train(False)


_mixed_classes: dict[tuple[type, type], type] = {}


def _mixed_class(mixin: type[_Mixin], base_cls: type[nn.Module]) -> type:
    """The subclass of ``base_cls`` with ``mixin`` in front (one per pair; its instances pickle as the pair)."""
    if (mixin, base_cls) not in _mixed_classes:
        name = f"{mixin.class_prefix}{base_cls.__name__}"
        _mixed_classes[mixin, base_cls] = type(name, (mixin, base_cls), {"__module__": __name__, "__qualname__": name})
    return _mixed_classes[mixin, base_cls]


def _unmixed_class(module: _Mixin) -> type:
    """The class ``module`` had before :func:`_mixed_class` put a mixin in front of it."""
    _, base = type(module).__bases__
    return base


def has_running_stats(module: nn.Module) -> bool:
    return isinstance(module, _NormBase) and module.track_running_stats


def freeze_running_stats(module: nn.Module) -> None:
    """Keep the normalisation layer ``module`` in eval mode from now on (see FrozenStatsNorm)."""
    module.__class__ = _mixed_class(FrozenStatsNorm, type(module))
    module.train(False)


def thaw_running_stats(module: FrozenStatsNorm, mode: bool) -> None:
    """Give ``module`` its own class back, in training mode ``mode``."""
    module.__class__ = _unmixed_class(module)
    module.train(mode)


def factor_shapes(spec: SnellSpec, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    m, n = spec.matrix_shape
    if spec.groups == 1:
        return (n, r), (m, r)
    return (spec.groups, n, r), (spec.groups, m // spec.groups, r)


def init_factors(a: Tensor, b: Tensor, num_pieces: int) -> None:
    """The reference code's initialisation: kaiming_uniform(a=√5) on (P, n, r/P) and (P, m, r/P) tensors.

    That is A ~ U(±1/√(n·r/P)) and B ~ U(±1/√(m·r/P)); ΔW is therefore not zero at step 0.
    """
    r = a.shape[-1]
    with torch.no_grad():
        for t in (a, b):
            bound = 1.0 / math.sqrt(t.shape[-2] * r / num_pieces)
            t.uniform_(-bound, bound)


def factor_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The factors' dtype: at least float32, whatever the base weight's (peft does the same for LoRA).

    A bf16 factor has 8 bits of mantissa: an AdamW step of lr·1e-3 on an entry of 1e-2 is below half its ulp
    and rounds away, so bf16 factors stop learning once the updates get small. The fused function computes
    ΔW in float32 either way; only the stored factors (r·(m+n) per layer) grow.
    """
    return torch.promote_types(weight_dtype, torch.float32)


def new_factors(spec: SnellSpec, config: SnellConfig, weight: Tensor) -> tuple[nn.Parameter, nn.Parameter, Tensor]:
    """Freshly initialised A and B (on ``weight``'s device, in at least float32, see :func:`factor_dtype`) and
    the float32 kernel coefficients (for mixk, the piecewise ones only: see :func:`new_mix`)."""
    shape_a, shape_b = factor_shapes(spec, config.r)
    dtype = factor_dtype(weight.dtype)
    a = nn.Parameter(torch.empty(shape_a, device=weight.device, dtype=dtype))
    b = nn.Parameter(torch.empty(shape_b, device=weight.device, dtype=dtype))
    init_factors(a, b, spec.num_pieces)
    coefficients = config.kernel_coefficients[: spec.num_pieces if config.kernel == "mixk" else None]
    return a, b, torch.tensor(coefficients, device=weight.device, dtype=torch.float32)


def new_mix(spec: SnellSpec, config: SnellConfig, weight: Tensor) -> nn.Parameter | None:
    """mixk's trained (α, γ, β), one row per adapter group (the authors' q, k and v modules each have their own),
    initialised from the config (1, 1, 0 by default), in the factors' dtype; None for the other kernels."""
    if config.kernel != "mixk":
        return None
    initial = torch.tensor(config.kernel_coefficients[spec.num_pieces :], dtype=factor_dtype(weight.dtype))
    return nn.Parameter(initial.to(weight.device).repeat(spec.groups, 1))


def load_kernels(spec: SnellSpec, weight: Tensor, factor: Tensor) -> None:
    """Load the fused kernels now if a layer like this one takes them, rather than inside its first forward: on the
    CPU, numba's compiled kernels (compiled once, then read from its on-disk cache) and its thread pool, a one-time
    cost of about 60 MB and a second that would otherwise land in the first training step's memory and time."""
    kernel_path(spec, weight.device, factor.shape[-1], factor.dtype, weight.dtype)


def attach(module: nn.Module, spec: SnellSpec, config: SnellConfig, name: str) -> SnellLayer:
    """Turn ``module`` (named ``name`` in its model) into a SNELL layer in place and return it."""
    a, b, coefficients = new_factors(spec, config, module.weight)
    load_kernels(spec, module.weight, a)
    module.__class__ = _mixed_class(SnellLayer, type(module))
    module.snell_A = a
    module.snell_B = b
    if config.learnable_coefficients:
        module.snell_coefficients = nn.Parameter(coefficients)
    else:
        module.register_buffer("snell_coefficients", coefficients, persistent=False)
    module.register_parameter("snell_mix", new_mix(spec, config, module.weight))
    module.snell_spec = spec
    module.snell_dropout = config.dropout_for(name)
    module.snell_drop_path = float(config.drop_path)
    module.snell_merged = False
    module.snell_disabled = False
    return module


def detach(module: SnellLayer) -> nn.Module:
    """Remove the adapter (without merging) and give the module back its original class."""
    for name in ("snell_A", "snell_B", "snell_coefficients", "snell_mix"):
        delattr(module, name)
    for name in ("snell_spec", "snell_dropout", "snell_drop_path", "snell_merged", "snell_disabled"):
        module.__dict__.pop(name, None)
    module.__class__ = _unmixed_class(module)
    return module


def iter_snell_layers(model: nn.Module) -> Iterator[tuple[str, SnellLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, SnellLayer):
            yield name, module
