"""SNELL as a peft method: ``peft.get_peft_model(model, SnellPeftConfig(...))``.

How SNELL is registered, and why this way: peft's ``register_peft_method`` only accepts names of its closed
``PeftType`` enum. peft itself dispatches on ``config.peft_type`` through three plain dicts in ``peft.mapping``
(config class, tuner class, parameter prefix) in get_peft_model, save_pretrained, PeftModel.from_pretrained and
load_adapter, so this module adds the key ``"SNELL"`` to those three dicts and changes nothing else in peft.

SNELL's ``peft_type`` is :data:`SNELL`, a :class:`MethodType`: a ``str`` subclass equal to (and hashing as)
``"SNELL"`` that also answers ``.value`` and ``.name`` as a ``PeftType`` member does. peft code that reads
``config.peft_type.value`` (the mixed-model check, hotswap, gradient-checkpointing messages) then works, while the
dict lookups, ``==`` against strings or ``PeftType`` members (a ``str`` enum), JSON (written as ``"SNELL"``) and
``PeftConfig.from_pretrained`` (which reads the plain string back and finds this config class by it) see a string.
The alternative, adding a member to ``PeftType`` by patching the enum's private tables (``_member_map_``,
``_value2member_map_``, ``_member_names_``), would let ``register_peft_method`` accept SNELL, but it changes a
global that all of peft iterates over (every loop over ``PeftType`` would meet a method peft does not know), and
those private tables differ between Python versions: a larger blast radius for the same effect. The route is not
public API (peft 0.20 rejects it), so the peft versions it was tested with are pinned in :data:`SUPPORTED_PEFT` and
checked at import.

The tuner layer wraps the original module as peft's ``base_layer`` and keeps the factors per adapter name.
Its forward and its merge are the core's (:func:`snell.layers.adapted_forward`, :func:`snell.layers.delta_weight`):
there is one implementation of the method, and a peft SNELL adapter computes exactly what
``snell.get_snell_model`` computes with the same factors.

SNELLA through peft: ``kernel="mixk"`` keeps each adapter's trained (α, γ, β) in ``snell_mix`` next to its factors
(trained and saved with them), and :func:`snella_allocator` points a :class:`snell.allocator.SparsityAllocator` at one
adapter of a peft model. What it allocates is written into that adapter's config (``layer_sparsity``) as it goes,
so ``save_pretrained`` records it and ``PeftModel.from_pretrained`` rebuilds the same ΔW.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Any

import torch
from packaging.specifiers import SpecifierSet
from torch import nn

#: The peft versions this integration is tested with; outside them it refuses to import.
SUPPORTED_PEFT = ">=0.21.2,<0.22"


def check_peft_version(version: str) -> None:
    """Raise ImportError unless ``version`` is in :data:`SUPPORTED_PEFT` (the registration relies on peft internals)."""
    if not SpecifierSet(SUPPORTED_PEFT).contains(version, prereleases=True):
        raise ImportError(
            f"snell.integrations.peft supports peft{SUPPORTED_PEFT}, but peft {version} is installed; SNELL "
            f"registers itself through peft's internal lookup tables, which differ between releases. Install a "
            f'supported version: pip install "peft{SUPPORTED_PEFT}"'
        )


check_peft_version(importlib.metadata.version("peft"))

# After the version check: these names are only known to exist in the supported versions.
from peft import PeftConfig  # noqa: E402
from peft.mapping import (  # noqa: E402
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners.tuners_utils import (  # noqa: E402
    BaseTuner,
    BaseTunerLayer,
    _get_in_out_features,
    _maybe_include_all_linear_layers,
    check_adapters_to_merge,
)

from snell.allocator import AllocatorConfig, SparsityAllocator  # noqa: E402
from snell.config import FORMAT_VERSION, METHOD, SnellConfig  # noqa: E402
from snell.layers import (  # noqa: E402
    adapted_forward,
    build_spec,
    call_through_forward,
    check_forward_called,
    check_layer_names,
    check_mergeable,
    delta_weight,
    fold_delta,
    iter_snell_layers,
    kernel_coefficients,
    load_kernels,
    new_factors,
    new_mix,
)
from snell.model import check_merge_targets  # noqa: E402
from snell.presets import detect_preset  # noqa: E402
from snell.spec import SnellSpec  # noqa: E402


class MethodType(str):
    """A ``peft_type`` outside peft's closed ``PeftType`` enum that behaves like one of its members: it is the
    string itself (dict keys, ``==``, JSON) and has the members' ``.value`` and ``.name``, and ``str()`` of it reads
    ``PeftType.SNELL`` as ``str(PeftType.LORA)`` reads ``PeftType.LORA`` (peft's ``get_model_status`` takes the part
    after the dot)."""

    __slots__ = ()

    def __str__(self) -> str:
        return f"PeftType.{self.value}"

    @property
    def value(self) -> str:
        return str.__str__(self)  # the plain string

    @property
    def name(self) -> str:
        return self.value


#: The ``peft_type`` of SNELL adapters, in peft's configs and (as the plain string) in adapter_config.json.
SNELL = MethodType(METHOD)

_METHOD_FIELDS = (
    "r",
    "kernel",
    "num_pieces",
    "coefficients",
    "learnable_coefficients",
    "sparsity",
    "layer_sparsity",
    "sparsify_mode",
    "dropout",
    "undropped_modules",
    "drop_path",
    "split_fused_qkv",
    "format_version",
)


def _names(value: Any) -> list[str] | str | None:
    """peft may turn name lists into sets; SnellConfig takes lists (or a regex string)."""
    return sorted(value) if isinstance(value, (set, frozenset)) else value


@dataclass
class SnellPeftConfig(PeftConfig):
    """A SNELL adapter for peft. The method fields mean what they mean in :class:`snell.SnellConfig` and are
    validated by it; ``target_modules`` / ``exclude_modules`` take a list of name suffixes or a regex, and
    ``target_modules=None`` picks snell's preset for the model family. As in peft, a list entry that matches no
    module is skipped (``snell.get_snell_model`` refuses it).

    ``task_type="SEQ_CLS"`` makes peft add the classifier head (``classifier`` / ``score``) to
    ``modules_to_save``, so the new head is trained and saved by default, as with LoRA. The core's
    ``parameters_to_save`` (bare tensors such as a ViT's ``cls_token``) has no peft counterpart here.
    """

    r: int = field(default=8, metadata={"help": "rank of the factors A and B"})
    kernel: str = field(
        default="piecewise_linear", metadata={"help": "linear, piecewise_linear, rbf, sigmoid or mixk (SNELLA)"}
    )
    num_pieces: int = field(default=2, metadata={"help": "pieces of the piecewise_linear kernel"})
    coefficients: list[float] | None = field(default=None, metadata={"help": "kernel coefficients (None: defaults)"})
    learnable_coefficients: bool = field(default=False, metadata={"help": "train the kernel coefficients too"})
    sparsity: float = field(default=0.9, metadata={"help": "fraction of each ΔW that is zeroed"})
    layer_sparsity: dict[str, list[float]] | None = field(
        default=None,
        metadata={"help": "per-layer sparsities (one per adapter group) replacing sparsity; set by snella_allocator"},
    )
    sparsify_mode: str = field(default="reference", metadata={"help": "reference, mask or soft"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "name suffixes or a regex; None: snell's preset for the model family"}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules never adapted"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "modules trained fully and saved"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    undropped_modules: list[str] | str | None = field(
        default=None, metadata={"help": "adapted modules whose adapter input gets no dropout (the reference: proj)"}
    )
    drop_path: float = field(default=0.0, metadata={"help": "per-sample DropPath on the adapter output"})
    split_fused_qkv: bool = field(default=True, metadata={"help": "one adapter per q, k, v of a fused projection"})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "SNELL adapter format version"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SNELL
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        self.snell_config()  # validates every method field, with snell's messages

    def snell_config(self) -> SnellConfig:
        """The same adapter as a core :class:`snell.SnellConfig` (what builds and checks each layer)."""
        return SnellConfig(
            **{name: getattr(self, name) for name in _METHOD_FIELDS},
            target_modules=_names(self.target_modules),
            exclude_modules=_names(self.exclude_modules),
            modules_to_save=_names(self.modules_to_save),
        )

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Reject snell's own adapter folders with a clear message: their tensors are named for
        ``snell.load_adapter``, not for peft (peft's configs always carry ``peft_version``)."""
        if "peft_version" not in kwargs:
            raise ValueError(
                "this folder holds a SNELL adapter saved by snell.save_adapter (snell's own format), not by peft; "
                "load it with snell.load_adapter(model, path), or train with get_peft_model(model, "
                "SnellPeftConfig(...)) to get a peft adapter"
            )
        return super().check_kwargs(**kwargs)


class SnellPeftLayer(nn.Module, BaseTunerLayer):
    """peft's wrapper around one adapted Linear / Conv2d / Conv1D: factors per adapter name, the core's math."""

    adapter_layer_names = ("snell_A", "snell_B", "snell_coefficients", "snell_mix")
    other_param_names = ("snell_specs", "snell_dropouts", "snell_learnable")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: SnellConfig, name: str, parent: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.training = base_layer.training  # a model adapted in eval mode stays in eval mode (no adapter dropout)
        self.base_layer = base_layer
        # What peft's own tuner layers report (peft's helper, as LoRA's layers use it): a Linear's in/out_features,
        # a Conv2d's in/out_channels, a Conv1D's weight shape (in, out).
        self.in_features, self.out_features = _get_in_out_features(base_layer)
        self.snell_A = nn.ParameterDict()
        self.snell_B = nn.ParameterDict()
        # Fixed coefficients live here too (requires_grad False), so that adapters move with the model and
        # are deleted with it like the factors; their two floats are saved alongside the factors.
        self.snell_coefficients = nn.ParameterDict()
        # mixk's trained (α, γ, β), (groups, 3), for the adapters whose kernel is mixk only.
        self.snell_mix = nn.ParameterDict()
        self.snell_specs: dict[str, SnellSpec] = {}
        self.snell_dropouts: dict[str, tuple[float, float]] = {}
        self.snell_learnable: dict[str, bool] = {}
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, name, parent)

    def update_layer(self, adapter_name: str, config: SnellConfig, name: str, parent: nn.Module | None = None) -> None:
        """Add adapter ``adapter_name`` (spec and initial factors exactly as ``snell.get_snell_model`` makes them;
        ``parent``, the module holding this layer, tells a grouped-query fused q/k/v apart)."""
        spec = build_spec(name, self.base_layer, config, parent)
        a, b, coefficients = new_factors(spec, config, self.base_layer.weight)
        load_kernels(spec, self.base_layer.weight, a)
        self.snell_A[adapter_name] = a
        self.snell_B[adapter_name] = b
        self.snell_coefficients[adapter_name] = nn.Parameter(coefficients)
        mix = new_mix(spec, config, self.base_layer.weight)
        if mix is not None:
            self.snell_mix[adapter_name] = mix
        self.snell_specs[adapter_name] = spec
        self.snell_dropouts[adapter_name] = (config.dropout_for(name), float(config.drop_path))
        self.snell_learnable[adapter_name] = config.learnable_coefficients
        self.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._freeze_fixed_coefficients()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._freeze_fixed_coefficients()

    def _freeze_fixed_coefficients(self) -> None:
        # peft makes every entry of adapter_layer_names trainable for an active adapter; fixed ones stay fixed.
        for name, coefficients in self.snell_coefficients.items():
            if not self.snell_learnable[name]:
                coefficients.requires_grad_(False)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """To the base layer's device only. peft's version also casts to the base dtype and re-wraps each
        ParameterDict entry as a new, trainable Parameter: after ``from_pretrained(..., low_cpu_mem_usage=True)``
        the loaded factors were rounded to bf16 and the fixed coefficients trained. The dtypes stay what loading
        gave them (``_cast_adapter_dtype`` applies ``autocast_adapter_dtype``), and so does ``requires_grad``."""
        target = device if device is not None else self.get_base_layer().weight.device
        if target.type == "meta":
            return
        for name in self.adapter_layer_names:
            entries = getattr(self, name)
            old = entries.get(adapter_name)
            if old is not None and old.device != target and old.device.type != "meta":
                entries[adapter_name] = nn.Parameter(old.detach().to(target), requires_grad=old.requires_grad)

    def kernel_coefficients(self, adapter_name: str) -> torch.Tensor:
        """What the kernel of ``adapter_name`` takes: its coefficients, and for mixk its (α, γ, β) row per group."""
        mix = self.snell_mix.get(adapter_name)
        return kernel_coefficients(self.snell_coefficients[adapter_name], mix)

    def cast_factors(self, adapter_name: str, dtype: torch.dtype) -> None:
        """Store A and B of ``adapter_name`` in ``dtype`` (a floating dtype; others are left as they are)."""
        if not dtype.is_floating_point:
            return
        for factors in (self.snell_A, self.snell_B):
            old = factors[adapter_name]
            factors[adapter_name] = nn.Parameter(old.detach().to(dtype), requires_grad=old.requires_grad)

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.snell_A[adapter_name], self.snell_B[adapter_name], self.kernel_coefficients(adapter_name)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔWˢ of ``adapter_name`` in the base weight's layout and dtype (the core's computation)."""
        weight = self.get_base_layer().weight
        return delta_weight(self.snell_specs[adapter_name], *self._factors(adapter_name), weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold ΔWˢ into the base weight; ``safe_merge`` checks the result for inf/NaN before writing it."""
        check_mergeable(f"this {type(self.get_base_layer()).__name__}", self.get_base_layer())
        weight = self.get_base_layer().weight
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.snell_A:
                continue
            if safe_merge:
                merged = weight.detach().clone()
                fold_delta(self.snell_specs[name], *self._factors(name), merged)
                if not torch.isfinite(merged).all():
                    # peft's wording, as every peft method raises it; the weight is not written.
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                with torch.no_grad():
                    weight.copy_(merged)
            else:
                fold_delta(self.snell_specs[name], *self._factors(name), weight)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.snell_A:
                fold_delta(self.snell_specs[name], *self._factors(name), weight, sign=-1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        active = [name for name in self.active_adapters if name in self.snell_A]
        if self.disable_adapters or self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        # Several active adapters add up, as LoRA's do: y = op(x, W0 + Σᵢ ΔWᵢˢ) + b, each ΔWᵢ sparsified on its own
        # with its own τ. The first one rides on W0's GEMM; each further one adds its branch op(x, ΔWᵢˢ).
        base = self.get_base_layer()
        out = None
        for name in active:
            dropout = self.snell_dropouts[name] if self.training else (0.0, 0.0)
            factors = (self.snell_A[name], self.snell_B[name], self.kernel_coefficients(name))
            weight, bias = (base.weight, base.bias) if out is None else (None, None)
            y = adapted_forward(x, weight, bias, *factors, self.snell_specs[name], *dropout)
            out = y if out is None else out + y
        return out

    def __repr__(self) -> str:
        return "snell." + super().__repr__()


class SnellPeftModel(BaseTuner):
    """peft's tuner for SNELL: which modules to wrap, and how."""

    prefix = "snell_"
    tuner_layer_cls = SnellPeftLayer
    target_module_mapping: dict[str, list[str]] = {}  # noqa: RUF012 - peft's interface; presets come from snell

    def _pre_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        if any(True for _ in iter_snell_layers(model)):
            raise ValueError(
                "this model already has snell.get_snell_model adapters; use a fresh model for get_peft_model"
            )

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Refused by name (peft's LoRA combines its low-rank products): a weighted sum of SNELL factors is not the
        weighted sum of their kernelized, sparsified updates, so there is nothing exact to build."""
        raise TypeError(
            f"{type(self).__name__} does not support add_weighted_adapter: SNELL's ΔW is a sparsified kernel of "
            "its factors, so mixing factors does not mix updates; activate several adapters together instead "
            "(model.base_model.set_adapter([...]): their sparsified updates add up)"
        )

    def _check_merge_allowed(self) -> None:
        """peft calls this before merging any layer (merge_adapter, merge_and_unload): every layer is checked as
        the core checks them, before the first weight changes. A refusal found at a later layer used to leave the
        earlier ones merged, or merged and unloaded, and their adapters out of the next save."""
        super()._check_merge_allowed()
        layers = [(n, m.get_base_layer()) for n, m in self.model.named_modules() if isinstance(m, SnellPeftLayer)]
        check_merge_targets(self.model, layers)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft's ``autocast_adapter_dtype``: True (the default) keeps the factors in float32, as they are created
        (:func:`snell.layers.factor_dtype`); False stores A and B in the base weight's dtype, as LoRA does. The kernel
        coefficients stay float32 either way: the default ±0.1 has no exact bf16 value, and rounding it would change
        the kernel itself, not just the precision of what is trained."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if autocast_adapter_dtype:
            return
        for module in self.model.modules():
            if isinstance(module, SnellPeftLayer) and adapter_name in module.snell_A:
                module.cast_factors(adapter_name, module.get_base_layer().weight.dtype)

    def _prepare_adapter_config(self, peft_config: SnellPeftConfig, model_config: dict) -> SnellPeftConfig:
        """The preset for ``target_modules=None``; ``"all-linear"`` expanded to its layer names now, as peft does
        only after ``_prepare_model``, so that its checks see the layers it will wrap."""
        if peft_config.target_modules is None:
            peft_config.target_modules = detect_preset(self.model).pattern
        return _maybe_include_all_linear_layers(peft_config, self.model)

    def _prepare_model(self, peft_config: SnellPeftConfig, model: nn.Module) -> None:
        """Checks every module the config targets before peft wraps the first (peft wraps them one at a time, and
        a SNELL adapter changes its layer's output from the start, ΔW ≠ 0: one that cannot be adapted, found
        halfway, would leave the model half-adapted), and that ``layer_sparsity`` and ``undropped_modules`` name only
        those modules."""
        super()._prepare_model(peft_config, model)
        config = peft_config.snell_config()
        wrapped = tuple(name + "." for name, module in model.named_modules() if isinstance(module, BaseTunerLayer))
        targets = []
        modules = dict(model.named_modules())
        for name, module in modules.items():
            if name and not name.startswith(wrapped) and self._check_target_module_exists(peft_config, name):
                parent = modules[name.rpartition(".")[0]]
                check_forward_called(name, parent)
                base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
                build_spec(name, base, config, parent)
                targets.append(name)
        if targets:
            check_layer_names(config, targets, model)

    def _create_and_replace(
        self,
        peft_config: SnellPeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        config = peft_config.snell_config()
        if isinstance(target, SnellPeftLayer):
            target.update_layer(adapter_name, config, current_key, parent)
        else:
            layer = SnellPeftLayer(target, adapter_name, config, current_key, parent)
            self._replace_module(parent, target_name, layer, target)
            call_through_forward(current_key, parent)


class PeftAdapterSlot:
    """An :class:`snell.allocator.AdapterSlot` over one adapter of a peft SNELL layer. Setting its spec also records
    the sparsities in the adapter's config (``layer_sparsity``), which ``save_pretrained`` writes."""

    def __init__(self, layer: SnellPeftLayer, adapter_name: str, name: str, config: SnellPeftConfig) -> None:
        self.layer, self.adapter_name, self.name, self.config = layer, adapter_name, name, config

    def factor(self, name: str) -> torch.Tensor:
        return getattr(self.layer, name)[self.adapter_name]

    def spec(self) -> SnellSpec:
        return self.layer.snell_specs[self.adapter_name]

    def set_spec(self, spec: SnellSpec) -> None:
        self.layer.snell_specs[self.adapter_name] = spec
        layers = dict(self.config.layer_sparsity or {})
        layers[self.name] = [spec.sparsity_of(g) for g in range(spec.groups)]
        self.config.layer_sparsity = layers

    def merged(self) -> bool:
        return self.adapter_name in self.layer.merged_adapters


def snella_allocator(model: nn.Module, config: AllocatorConfig, adapter_name: str = "default") -> SparsityAllocator:
    """A SNELLA allocator over adapter ``adapter_name`` of a peft model made with ``SnellPeftConfig`` (mixk is what
    the authors pair it with; any SNELL kernel works). Layers are named as ``layer_sparsity`` and peft's injection
    name them (module names in the base model). Call ``accumulate()`` after each optimizer step and ``update(epoch)``
    before each epoch, or let :class:`snell.integrations.transformers.SnellaCallback` do it inside a Trainer."""
    peft_configs = getattr(model, "peft_config", None)
    if not isinstance(peft_configs, dict) or not isinstance(peft_configs.get(adapter_name), SnellPeftConfig):
        raise ValueError(f"{type(model).__name__} has no SNELL peft adapter named {adapter_name!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    slots = {
        name: PeftAdapterSlot(module, adapter_name, name, peft_configs[adapter_name])
        for name, module in base.named_modules()
        if isinstance(module, SnellPeftLayer) and adapter_name in module.snell_A
    }
    return SparsityAllocator(model, config, slots)


def _register() -> None:
    """Add SNELL to peft's lookup tables (idempotent; refuses to replace another package's "SNELL")."""
    for table, value in (
        (PEFT_TYPE_TO_CONFIG_MAPPING, SnellPeftConfig),
        (PEFT_TYPE_TO_TUNER_MAPPING, SnellPeftModel),
        (PEFT_TYPE_TO_PREFIX_MAPPING, SnellPeftModel.prefix),
    ):
        existing = table.get(SNELL)
        if existing is not None and existing != value and getattr(existing, "__module__", None) != __name__:
            raise RuntimeError(f"peft already has a method registered as {SNELL!r}: {existing!r}")
        table[SNELL] = value


_register()

__all__ = [
    "SNELL",
    "SUPPORTED_PEFT",
    "MethodType",
    "PeftAdapterSlot",
    "SnellPeftConfig",
    "SnellPeftLayer",
    "SnellPeftModel",
    "check_peft_version",
    "snella_allocator",
]
