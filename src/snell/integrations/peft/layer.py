"""SnellPeftLayer: peft's tuner layer around one adapted module, computing with the core's functions."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn

from snell.config import SnellConfig
from snell.layers import (
    adapted_forward,
    build_spec,
    check_mergeable,
    delta_weight,
    fold_delta,
    kernel_coefficients,
    load_kernels,
    new_factors,
    new_mix,
    unfold_delta,
)
from snell.spec import SnellSpec

# What a model may read off a Linear / Conv2d / Conv1D it calls (``in_features``/``out_features`` are set in __init__).
_LAYER_GEOMETRY = frozenset(
    {"kernel_size", "stride", "padding", "dilation", "groups", "padding_mode", "in_channels", "out_channels"}
    | {"nf", "nx"}  # Conv1D's
)


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
                unfold_delta(self.snell_specs[name], *self._factors(name), weight)

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

    def __getattr__(self, name: str) -> Any:
        # Models read their layers' geometry (DaViT's downsampling reads `conv.kernel_size`); the core's class swap
        # keeps those attributes, a wrapper must forward them. Only these: forwarding every name would also answer
        # for hooks and flags that belong to the wrapped module alone (accelerate's `_hf_hook`, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in _LAYER_GEOMETRY:
                raise
        return getattr(self.get_base_layer(), name)

    def __repr__(self) -> str:
        return "snell." + super().__repr__()
