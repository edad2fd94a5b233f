"""Injecting SNELL into a model, and everything done to an adapted model as a whole."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from torch import nn

from snell.config import HEAD_TASK_TYPES, SnellConfig, name_matches, unmatched
from snell.layers import (
    FrozenStatsNorm,
    SnellLayer,
    attach,
    build_spec,
    call_through_forward,
    check_forward_called,
    check_layer_names,
    check_mergeable,
    detach,
    freeze_running_stats,
    has_running_stats,
    iter_snell_layers,
    restore_forward,
    thaw_running_stats,
)
from snell.presets import declared_classifiers, detect_preset
from snell.spec import SnellSpec

logger = logging.getLogger("snell")
T = TypeVar("T")


def enclosing_module(name: str, modules: Iterable[str]) -> str | None:
    """The first of ``modules`` (full module names) that is the module or parameter ``name`` or holds it, else None."""
    return next((module for module in modules if name == module or name.startswith(f"{module}.")), None)


def check_not_adapted(model: nn.Module) -> None:
    """ValueError when ``model`` has SNELL adapters already: one set of adapters per model."""
    if any(True for _ in iter_snell_layers(model)):
        raise ValueError("this model already has SNELL adapters; merge_and_unload() it or use a fresh model")


def resolve_targets(model: nn.Module, config: SnellConfig) -> dict[str, SnellSpec]:
    """The layers ``config`` adapts in ``model``, each with its spec. Changes nothing; raises on bad input."""
    check_not_adapted(model)  # first: an adapted layer would otherwise be refused as a Linear subclass
    selector = config.target_modules
    if selector is None:
        preset = detect_preset(model)
        logger.info("snell: target_modules=None, using preset %r (%s)", preset.name, preset.pattern)
        selector = preset.pattern
    modules = dict(model.named_modules())
    names = [n for n in modules if n and name_matches(n, selector)]
    sample = ", ".join(n for n in list(modules)[1:9])
    if not names:
        raise ValueError(
            f"target_modules={selector!r} matches no module of {type(model).__name__} "
            f"(module names look like: {sample}, ...)"
        )
    # Every list entry must match: a typo in one would silently adapt fewer layers (or exclude none).
    if isinstance(selector, list):
        missing = unmatched(selector, names)
        if missing:
            raise ValueError(
                f"target_modules entries {missing} match no module of {type(model).__name__} "
                f"(module names look like: {sample}, ...)"
            )
    excluded = config.exclude_modules
    if isinstance(excluded, list):
        idle = unmatched(excluded, names)
        if idle:
            raise ValueError(
                f"exclude_modules {idle} match none of the {len(names)} modules that target_modules selects in "
                f"{type(model).__name__}, so they would exclude nothing"
            )
    if excluded is not None:
        names = [n for n in names if not name_matches(n, excluded)]
        if not names:
            raise ValueError(f"exclude_modules={excluded!r} excludes every module target_modules={selector!r} selects")
    check_layer_names(config, names, model)
    for name in names:
        check_forward_called(name, modules[name.rpartition(".")[0]])
    return {name: build_spec(name, modules[name], config, modules[name.rpartition(".")[0]]) for name in names}


def _named_matches(
    model: nn.Module, named: Iterable[tuple[str, T]], setting: str, selectors: list[str]
) -> dict[str, T]:
    """The (name, object) pairs whose name ``selectors`` match; ValueError naming any selector matching none."""
    found = {n: obj for n, obj in named if n and name_matches(n, selectors)}
    missing = unmatched(selectors, found)
    if missing:
        kind = setting.removesuffix("s_to_save")
        raise ValueError(f"{setting} {missing} match no {kind} of {type(model).__name__}")
    return found


#: Where classifiers keep their head: transformers (classifier, score, qa_outputs), timm (head, fc, classifier).
_HEAD_NAMES = ("classifier", "score", "qa_outputs", "head", "fc")


def uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped, whose names an adapter records (not the wrapper's ``_orig_mod.``)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def head_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s classification heads: timm's ``pretrained_cfg["classifier"]`` where the model has
    one (e.g. ``head.fc`` for ConvNeXt; both of a distilled model's, DeiT's ``head`` and ``head_dist``, whose
    outputs it averages in eval mode); for a transformers task model, every child with parameters beside its base
    model (``base_model_prefix``): what a base checkpoint leaves newly initialised, DeBERTa's ``pooler`` with its
    ``classifier``, XLM's ``sequence_summary``; else the first of classifier, score, qa_outputs, head, fc that is a
    child module with parameters. ValueError if there is none."""
    model = uncompiled(model)  # torch.compile's wrapper has neither the model's pretrained_cfg nor its names
    modules = dict(model.named_modules())

    def has_parameters(name: str) -> bool:
        return name in modules and any(True for _ in modules[name].parameters())

    names = declared_classifiers(model)
    if names and all(has_parameters(name) for name in names):
        return names
    base = getattr(model, "base_model_prefix", None)
    children = [name for name, _ in model.named_children()]
    if isinstance(base, str) and base in children:
        beside = [name for name in children if name != base and has_parameters(name)]
        if beside:
            return beside
    for name in _HEAD_NAMES:
        if has_parameters(name):
            return [name]
    raise ValueError(
        f"cannot find the classification head of {type(model).__name__} (looked for {list(_HEAD_NAMES)}); "
        "name it in modules_to_save"
    )


def task_heads(model: nn.Module, task_type: str | None, named: bool) -> list[str]:
    """The heads that ``task_type`` trains besides ``modules_to_save``: none unless it is a classification type;
    else :func:`head_names`, and none when no head can be found but ``named`` says the user's ``modules_to_save``
    names modules of the model (their head under another name, as the lookup's error asks them to do)."""
    if task_type not in HEAD_TASK_TYPES:
        return []
    try:
        heads = head_names(model)
    except ValueError:
        if named:
            return []
        raise
    inner = uncompiled(model)
    output_embeddings = getattr(inner, "get_output_embeddings", lambda: None)()
    lm_heads = [head for head in heads if inner.get_submodule(head) is output_embeddings is not None]
    if lm_heads:  # a language model given a classification task: its vocabulary-sized head is no classifier
        raise ValueError(
            f"task_type={task_type!r} trains the classification head, but {lm_heads[0]!r} is the language-model head "
            f"of {type(inner).__name__} (its output embeddings): load the model as a classifier "
            "(AutoModelForSequenceClassification, ...ForTokenClassification), or use task_type None or 'CAUSAL_LM' "
            "to train it as a language model"
        )
    return heads


def resolve_modules_to_save(model: nn.Module, config: SnellConfig) -> dict[str, nn.Module]:
    """modules_to_save by full name, plus the head when ``config.task_type`` is a classification."""
    selectors = list(config.modules_to_save or [])
    for head in task_heads(model, config.task_type, named=bool(selectors)):
        if not any(name_matches(head, [s]) for s in selectors):
            selectors.append(head)
    if not selectors:
        return {}
    found = _named_matches(model, model.named_modules(), "modules_to_save", selectors)
    # A module inside another saved module is saved with it.
    return {n: m for n, m in found.items() if not any(n.startswith(o + ".") for o in found)}


def resolve_parameters_to_save(model: nn.Module, config: SnellConfig) -> dict[str, nn.Parameter]:
    """The parameters ``config.parameters_to_save`` names, by full name, except those of modules_to_save
    (saved with their module already)."""
    if not config.parameters_to_save:
        return {}
    found = _named_matches(model, model.named_parameters(), "parameters_to_save", config.parameters_to_save)
    in_saved_modules = tuple(f"{n}." for n in resolve_modules_to_save(model, config))
    return {n: p for n, p in found.items() if not n.startswith(in_saved_modules)}


def _frozen_running_stats(model: nn.Module, to_save: dict[str, nn.Module]) -> list[nn.Module]:
    """Normalisation layers whose running statistics the adapter would not save: those outside modules_to_save
    (whose buffers are saved with it). One whose affine parameters are in parameters_to_save trains them on frozen
    statistics: the adapter saves parameters, not buffers."""
    saved = tuple(f"{name}." for name in to_save)
    return [
        module
        for name, module in model.named_modules()
        if has_running_stats(module) and name not in to_save and not name.startswith(saved)
    ]


def inject(model: nn.Module, config: SnellConfig, specs: dict[str, SnellSpec]) -> nn.Module:
    """Attach adapters per ``specs``; on any failure the model is restored exactly as it was."""
    check_not_adapted(model)
    to_save = resolve_modules_to_save(model, config)
    for name in specs:
        outer = enclosing_module(name, to_save)
        if outer is not None:
            raise ValueError(
                f"{name!r} is adapted and lies in modules_to_save entry {outer!r}, which trains it fully: choose "
                "one (exclude_modules for the adapter, or a module of modules_to_save that does not hold it)"
            )
    parameters_to_save = resolve_parameters_to_save(model, config)
    modules = dict(model.named_modules())
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    attached: list[SnellLayer] = []
    frozen: list[tuple[nn.Module, bool]] = []
    try:
        for param in model.parameters():
            param.requires_grad_(False)
        for name, spec in specs.items():
            attached.append(attach(modules[name], spec, config, name))
        for module in to_save.values():
            module.requires_grad_(True)
        for param in parameters_to_save.values():
            param.requires_grad_(True)
        for module in _frozen_running_stats(model, to_save):
            training = module.training
            freeze_running_stats(module)
            frozen.append((module, training))
    except BaseException:
        for layer in attached:
            detach(layer)
        for module, training in frozen:
            thaw_running_stats(module, training)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        raise
    for name in specs:
        call_through_forward(name, modules[name.rpartition(".")[0]])
    model.snell_config = copy.deepcopy(config)
    return model


def get_snell_model(model: nn.Module, config: SnellConfig) -> nn.Module:
    """Inject SNELL adapters into ``model`` in place and return it.

    Every parameter is frozen except the adapter factors, ``config.modules_to_save`` and
    ``config.parameters_to_save``. Frozen normalisation layers with running statistics (BatchNorm) stay in
    eval mode even under ``model.train()``, since the adapter does not store their statistics. A ``torch.compile``
    wrapper is adapted through the model it wraps: its names (without ``_orig_mod.``) and its family's preset.
    """
    inner = uncompiled(model)
    inject(inner, config, resolve_targets(inner, config))
    return model


def snell_layers(model: nn.Module) -> Iterator[tuple[str, SnellLayer]]:
    """(name, layer) for every SNELL layer of ``model``."""
    return iter_snell_layers(model)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _require_adapters(model: nn.Module) -> list[SnellLayer]:
    layers = [layer for _, layer in iter_snell_layers(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SNELL adapters")
    return layers


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside this block (adapters off); modules_to_save keep their trained values."""
    layers = _require_adapters(model)
    if any(layer.snell_merged for layer in layers):
        raise ValueError("adapters are merged into the weights; unmerge_adapters(model) before disabling them")
    previous = [layer.snell_disabled for layer in layers]
    for layer in layers:
        layer.snell_disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous, strict=True):
            layer.snell_disabled = flag


def check_merge_targets(model: nn.Module, layers: Iterable[tuple[str, nn.Module]]) -> None:
    """ValueError, before any weight changes, when one of ``layers`` (name in ``model``, the layer holding the
    weight ΔWˢ goes into) cannot take ΔWˢ: its weight is shared with another module (an LM head tied to the input
    embeddings), so merging would change that module too, and the outputs with it; or it is computed on every
    forward (:func:`snell.layers.check_mergeable`). The peft route checks its base layers with it too."""
    owners: dict[int, dict[int, str]] = {}  # parameter -> the modules holding it (one name each)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(prefix=module_name, recurse=False):
            owners.setdefault(id(param), {}).setdefault(id(module), param_name)
    for name, layer in layers:
        check_mergeable(name, layer)
        # The same layer registered under several names (CoaT shares an MLP between branches) is one adapted
        # layer: each use computes with W0 + ΔWˢ, merged or not. Another module holding the weight is not.
        others = [n for module, n in owners.get(id(layer.weight), {}).items() if module != id(layer)]
        if others:
            raise ValueError(
                f"{name}.weight is shared with {others[0]} (tied weights): merging ΔW into it would change both; "
                "keep this adapter unmerged, or untie them first (give the layer its own copy of the weight)"
            )


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every ΔWˢ into its base weight (reversible with unmerge_adapters, up to the weight dtype's rounding:
    W0 + ΔWˢ is rounded once, so in bf16 an unmerged weight may differ from W0 by one unit in the last place; W0
    itself is not kept, which is what makes merging free of memory. ``unload`` without merging gives W0 exactly)."""
    layers = _require_adapters(model)
    check_merge_targets(model, iter_snell_layers(model))
    for layer in layers:
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Take every ΔWˢ out of the base weights again (to train or disable the adapters); an error, changing
    nothing, when some layer is not merged."""
    layers = _require_adapters(model)
    unmerged = [name for name, layer in iter_snell_layers(model) if not layer.snell_merged]
    if unmerged:
        raise ValueError(
            f"adapters are not merged into the weights of {len(unmerged)} of {len(layers)} layers "
            f"(e.g. {unmerged[0]!r}); only merge_adapters(model) output can be unmerged"
        )
    for layer in layers:
        layer.unmerge()
    return model


def _remove_adapters(model: nn.Module, merge: bool) -> nn.Module:
    layers = _require_adapters(model)
    if merge and not all(layer.snell_merged for layer in layers):
        check_merge_targets(model, iter_snell_layers(model))
    for layer in layers:
        if merge:
            layer.merge()
        elif layer.snell_merged:
            layer.unmerge()
        detach(layer)
    for module in model.modules():
        if isinstance(module, FrozenStatsNorm):
            thaw_running_stats(module, model.training)
    restore_forward(model)
    model.__dict__.pop("snell_config", None)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and return the plain model (original layer classes)."""
    return _remove_adapters(model, merge=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapters without merging: the base model's weights as they were before injection. Its parameters
    stay frozen (requires_grad False), as peft's unload leaves them; unfreeze what you want to train."""
    return _remove_adapters(model, merge=False)
