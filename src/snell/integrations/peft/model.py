"""SnellPeftModel: peft's tuner for SNELL, which checks and wraps the targeted modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from snell.config import name_matches
from snell.integrations.peft.config import SnellPeftConfig
from snell.integrations.peft.layer import SnellPeftLayer
from snell.layers import (
    build_spec,
    call_through_forward,
    check_forward_called,
    check_layer_names,
    iter_snell_layers,
    restore_forward,
)
from snell.model import check_merge_targets, task_heads
from snell.presets import detect_preset


@contextmanager
def as_before_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every module peft wrapped back in its place (a tuner layer's base layer, a saved module's
    original), put back as found on exit: the model a further adapter's preset must look at, as the first adapter's
    did (the wrappers are no ``nn.Linear``, and their ``base_layer`` children are not where an adapter goes)."""
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            original = module.get_base_layer()
        elif isinstance(module, ModulesToSaveWrapper):
            original = module.original_module
        else:
            continue
        if any(name.startswith(f"{outer}.") for outer, *_ in swaps):  # inside a wrapper already swapped
            continue
        parent, _, child = name.rpartition(".")
        swaps.append((name, model.get_submodule(parent), child, module, original))
    try:
        for _, parent, child, _, original in swaps:
            setattr(parent, child, original)
        yield model
    finally:
        for _, parent, child, wrapper, _ in reversed(swaps):
            setattr(parent, child, wrapper)


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

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Unloading a ``modules_to_save`` head gives back the head itself, onto which peft's generic replacement
        copies the wrapper's ``weight``: a head with none of its own (RoBERTa's, ELECTRA's, MPNet's classifier is a
        module with ``dense`` and ``out_proj``) failed ``merge_and_unload`` and ``unload``. LoRA's model does no such
        copy; SNELL layers wrap their base layer, so a head only needs to be put back."""
        if isinstance(child, AuxiliaryTrainingWrapper):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        """peft's unload (and merge), then the attention switches that injection set turned back
        (:func:`snell.layers.restore_forward`): the unloaded model computes as it did before."""
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        restore_forward(model)
        return model

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
        only after ``_prepare_model``, so that its checks see the layers it will wrap; and a classification
        task's heads added to ``modules_to_save`` as the core finds them."""
        if peft_config.target_modules is None:  # a further adapter's too: the layers the first one wrapped count
            with as_before_adapters(self.model) as model:
                peft_config.target_modules = detect_preset(model).pattern
        self._add_task_heads(peft_config)
        return _maybe_include_all_linear_layers(peft_config, self.model)

    def _add_task_heads(self, peft_config: SnellPeftConfig) -> None:
        """peft's ``SEQ_CLS`` / ``TOKEN_CLS`` put ``classifier`` and ``score`` in ``modules_to_save`` before the tuner
        is built. The core's task types train every head a base checkpoint leaves newly initialised
        (:func:`snell.model.head_names`): DeBERTa's ``pooler`` too, which peft left frozen at its random init, and
        XLM's ``sequence_summary``, which it did not train at all. Added here, so peft wraps, trains and saves them
        (and writes them into the adapter's config, which reloads them)."""
        saved = list(peft_config.modules_to_save or [])
        names = [name for name, _ in self.model.named_modules() if name]
        named = any(name_matches(name, saved) for name in names)
        missing = [
            head for head in task_heads(self.model, peft_config.task_type, named) if not name_matches(head, saved)
        ]
        if missing:
            peft_config.modules_to_save = saved + missing

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
