"""Small adapter files: the factors (and modules/parameters_to_save) as safetensors, the config as JSON.

A directory holds ``adapter_model.safetensors`` and ``adapter_config.json``. The safetensors metadata
records every adapted layer's op and weight shape, so loading into another architecture fails with a
clear message before the model is touched, and a sha256 of the tensors, so a corrupted file is refused
(safetensors has no checksum of its own). The JSON adds the base model and the adapted layers to the
config, for people reading it. Files are written to temporary names and renamed, so an interrupted save
never leaves a half-written adapter behind; they end with the mode the umask gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from snell import __version__
from snell.config import FORMAT_VERSION, METHOD, METHOD_KEY, SnellConfig
from snell.layers import SnellLayer, build_spec, check_layer_names, factor_shapes, iter_snell_layers
from snell.model import (
    check_not_adapted,
    inject,
    resolve_modules_to_save,
    resolve_parameters_to_save,
    resolve_targets,
    task_heads,
    uncompiled,
)
from snell.presets import detect_preset
from snell.spec import SnellSpec

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_FORMAT_TAG = "snell"

# peft writes the same two file names. Both libraries tell the folders apart by the method that
# adapter_config.json names under "peft_type" (peft dispatches on it). snell writes "SNELL" there; folders
# saved before that name nothing and are SNELL too.


def _check_method(directory: Path, text: str) -> None:
    """ValueError in one sentence for a folder of another peft method, or a SNELL adapter written by peft
    (whose tensors are named for PeftModel)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return  # SnellConfig.from_json reports it
    if not isinstance(data, dict):
        return
    method = data.get(METHOD_KEY, METHOD)
    if method != METHOD:
        raise ValueError(f"{directory} holds a peft {method} adapter, not a SNELL one: load it with peft")
    if "peft_version" in data:
        raise ValueError(
            f"{directory} holds a SNELL adapter saved by peft: load it with PeftModel.from_pretrained after "
            "`import snell.integrations.peft`"
        )


def _layer_record(spec: SnellSpec) -> dict:
    return {"op": spec.op, "weight_shape": list(spec.weight_shape), "groups": spec.groups}


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in name order: independent of the file layout."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(np.from_dlpack(tensor.reshape(-1).view(torch.uint8)))  # .numpy() would pin a parameter's storage
    return digest.hexdigest()


def base_model_record(model: nn.Module) -> dict[str, str | None]:
    """The base model's class and, where its library records one, its name: transformers' name_or_path,
    timm's architecture with its pretrained tag."""
    # Classes made on the fly around the model's own: SNELL's layers and FSDP2's FSDP<Name> (a sharded run).
    wrappers: tuple[type, ...] = (SnellLayer,)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        wrappers += (FSDPModule,)
    cls = next(c for c in type(model).__mro__ if not issubclass(c, wrappers))
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    pretrained = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not name and isinstance(pretrained, dict) and pretrained.get("architecture"):
        name = ".".join(str(part) for part in (pretrained["architecture"], pretrained.get("tag")) if part)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "name_or_path": name if isinstance(name, str) and name else None,
    }


def _describe(record: dict) -> str:
    name = record.get("name_or_path")
    return f"{record.get('class')}" + (f" ({name})" if name else "")


def _new_file(path: str) -> int:
    """Create the empty file ``path`` and return its mode: 0o666 less the umask, as the kernel applies it."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return os.stat(path).st_mode & 0o777


def _atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Write via a temporary file and a rename, so an interrupted save leaves no half-written file. The file
    ends with mode 0o666 less the umask, like any new file (mkstemp, and safetensors' writer, give 0o600,
    which hides adapters from the rest of a group)."""
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    mode = _new_file(tmp)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors' ``save_file``, written atomically and readable as any new file is (its writer gives 0o600)."""
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def open_safetensors_modes(directory: str | Path) -> None:
    """Give the ``*.safetensors`` files that a ``save_pretrained`` (transformers', peft's) wrote in ``directory`` the
    mode any new file gets, 0o666 less the umask: safetensors' writer leaves them 0o600, which hides a merged model or
    an adapter from the rest of a group."""
    directory = Path(directory)
    probe = str(directory / f".mode.{secrets.token_hex(8)}.tmp")
    try:
        mode = _new_file(probe)
    finally:
        Path(probe).unlink(missing_ok=True)
    for path in directory.glob("*.safetensors"):
        os.chmod(path, mode)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything an adapter file holds: factors, learnable coefficients, modules_to_save and
    parameters_to_save tensors."""
    model = uncompiled(model)
    config: SnellConfig | None = getattr(model, "snell_config", None)
    layers = list(iter_snell_layers(model))
    if config is None or not layers:
        raise ValueError(f"{type(model).__name__} has no SNELL adapters to save")
    tensors = {}
    for name, layer in layers:
        tensors[f"{name}.snell_A"] = layer.snell_A
        tensors[f"{name}.snell_B"] = layer.snell_B
        if config.learnable_coefficients:
            tensors[f"{name}.snell_coefficients"] = layer.snell_coefficients
        if layer.snell_mix is not None:
            tensors[f"{name}.snell_mix"] = layer.snell_mix
    for module_name, module in resolve_modules_to_save(model, config).items():
        for key, value in module.state_dict().items():
            tensors[f"{module_name}.{key}"] = value
    tensors.update(resolve_parameters_to_save(model, config))
    sharded = next((key for key, value in tensors.items() if isinstance(value, DTensor)), None)
    if sharded is not None:  # saving this process's shard would fail deep inside safetensors, or save a slice
        raise ValueError(
            f"{sharded!r} is a shard of an FSDP-sharded model (a DTensor): save from whole tensors, e.g. inside "
            "snell.train.fsdp.unsharded(model) on every process (it gathers), then save_adapter on the first"
        )
    # Tied weights saved twice (embeddings and LM head both in modules_to_save) share a storage.
    return savable(tensors)


def savable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` detached, on the CPU and contiguous, as safetensors writes them. safetensors refuses tensors that
    share memory (a tensor under several keys: tied weights, a module registered under two names), and each key must
    load back alone: every key after the first on a storage gets its own copy, and loading writes the same values."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        storage = value.untyped_storage().data_ptr()
        out[key] = value.clone() if storage in seen else value
        seen.add(storage)
    return out


def layer_sparsity(model: nn.Module) -> dict[str, list[float]] | None:
    """Each adapted layer's sparsities where they differ from the config's (what an allocator set), else None."""
    config: SnellConfig = model.snell_config
    found = {}
    for name, layer in iter_snell_layers(model):
        spec = layer.snell_spec
        sparsities = [spec.sparsity_of(g) for g in range(spec.groups)]
        if any(s != config.sparsity for s in sparsities):
            found[name] = sparsities
    return found or None


def save_adapter(model: nn.Module, directory: str | os.PathLike, training: dict[str, Any] | None = None) -> Path:
    """Write the adapter of ``model`` to ``directory`` (created if needed) and return the directory.

    ``training``: how the adapter was trained, for whoever uses it later (``snell train`` records the causal-LM
    prompt format there); stored in adapter_config.json as is and not needed to load the adapter.
    """
    model = uncompiled(model)
    tensors = adapter_state_dict(model)
    config: SnellConfig = model.snell_config
    if any(layer.snell_merged for _, layer in iter_snell_layers(model)):
        raise ValueError("adapters are merged into the weights; unmerge_adapters(model) before saving")
    out = Path(directory)
    metadata = {
        "format": _FORMAT_TAG,
        "format_version": str(FORMAT_VERSION),
        "snell_version": __version__,
        "layers": json.dumps({name: _layer_record(layer.snell_spec) for name, layer in iter_snell_layers(model)}),
        "tensors_sha256": tensors_digest(tensors),
    }
    config_file = {
        **config.to_dict(),
        "layer_sparsity": layer_sparsity(model),
        METHOD_KEY: METHOD,
        "base_model": base_model_record(model),
        "adapted_modules": [name for name, _ in iter_snell_layers(model)],
        **({"training": training} if training else {}),
    }
    try:  # before any file is written: a record that is not JSON must not leave new weights beside an old config
        config_text = json.dumps(config_file, indent=2, sort_keys=True) + "\n"
    except TypeError as err:
        raise ValueError(f"the adapter config cannot be written as JSON ({err}); nothing was saved") from None
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out / WEIGHTS_NAME, metadata)
    _atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text))
    return out


def read_adapter(directory: Path) -> tuple[SnellConfig, dict | None, dict, dict[str, torch.Tensor]]:
    """The config, the base model record (None in older files), the layer records and the tensors, checked."""
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"no SNELL adapter at {directory}: {path.name} is missing")
    text = config_path.read_text()
    _check_method(directory, text)
    try:
        config_file = json.loads(text)
        config = SnellConfig.from_dict(config_file)
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: SNELL config is not valid JSON: {err}") from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{config_path}: {err}") from None
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{weights_path} is not a readable adapter file (corrupt or truncated?): {err}") from None
    if metadata.get("format") != _FORMAT_TAG or "layers" not in metadata:
        raise ValueError(f"{weights_path} is not a SNELL adapter file (no snell metadata)")
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{weights_path} has format_version {version}, but this snell reads versions <= {FORMAT_VERSION}; "
            "upgrade snell to load it"
        )
    digest = metadata.get("tensors_sha256")
    if digest is None:
        warnings.warn(
            f"{weights_path} records no checksum (saved before snell recorded one), so it cannot be checked for "
            "corruption; load and save it again to add one",
            stacklevel=3,
        )
    elif digest != tensors_digest(tensors):
        raise ValueError(
            f"{weights_path} is corrupt: its tensors do not match the sha256 recorded when it was saved; "
            "the model was not changed"
        )
    return config, config_file.get("base_model"), json.loads(metadata["layers"]), tensors


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Inject the adapter saved in ``directory`` into ``model`` (in place) and load its tensors.

    Everything is checked against the model first (layer names, ops, shapes, tensor shapes); on any
    mismatch a ValueError names it and the model is left untouched.
    """
    compiled, model = model, uncompiled(model)
    check_not_adapted(model)
    directory = Path(directory)
    config, base_model, records, tensors = read_adapter(directory)
    modules = dict(model.named_modules())
    specs: dict[str, SnellSpec] = {}
    used: set[str] = set()  # the tensors of the file that the config reads
    for name, record in records.items():
        if name not in modules:
            raise ValueError(
                f"the adapter in {directory} was made for another architecture: {type(model).__name__} "
                f"has no module {name!r}"
            )
        parent = modules[name.rpartition(".")[0]]
        spec = build_spec(name, modules[name], config, parent)
        if {**_layer_record(spec), "groups": record.get("groups")} == record != _layer_record(spec):
            # the same layer, grouped by an older rule (Phi-3's gate_up_proj, a grouped-query qkv_proj): keep the
            # file's grouping, which its factors have
            spec = build_spec(name, modules[name], config, parent, record["groups"])
        if _layer_record(spec) != record:
            raise ValueError(
                f"the adapter in {directory} was made for another architecture: layer {name!r} is "
                f"{record} in the file but {_layer_record(spec)} in the model"
            )
        specs[name] = spec
        expected = dict(zip(("snell_A", "snell_B"), factor_shapes(spec, config.r), strict=True))
        if config.learnable_coefficients:
            expected["snell_coefficients"] = (len(config.kernel_coefficients),)
        if config.kernel == "mixk":
            expected["snell_mix"] = (spec.groups, 3)
            if config.learnable_coefficients:
                expected["snell_coefficients"] = (spec.num_pieces,)
        used.update(f"{name}.{key}" for key in expected)
        for key, shape in expected.items():
            tensor = tensors.get(f"{name}.{key}")
            if tensor is None or tuple(tensor.shape) != shape:
                found = None if tensor is None else tuple(tensor.shape)
                raise ValueError(f"{directory / WEIGHTS_NAME}: {name}.{key} should have shape {shape}, found {found}")
    try:  # as get_snell_model refuses it: a layer it names would silently stay at the config's sparsity
        check_layer_names(config, list(specs), model)
    except ValueError as err:
        raise ValueError(f"{directory / CONFIG_NAME}: {err}") from None
    module_states: dict[nn.Module, dict[str, torch.Tensor]] = {}
    heads = task_heads(model, config.task_type, named=bool(config.modules_to_save))
    for module_name, module in resolve_modules_to_save(model, config).items():
        if len(heads) > 1 and module_name in heads and not any(k.startswith(f"{module_name}.") for k in tensors):
            warnings.warn(
                f"the adapter in {directory} holds no {module_name!r}, a head of this {type(model).__name__} (saved "
                f"before task_type={config.task_type!r} trained every head: a distilled model's second one, "
                "DeBERTa's pooler): it keeps the model's own",
                stacklevel=2,
            )
            continue
        state = {}
        for key, value in module.state_dict().items():
            tensor = tensors.get(f"{module_name}.{key}")
            if tensor is None or tensor.shape != value.shape:
                found = None if tensor is None else tuple(tensor.shape)
                raise ValueError(
                    f"{directory / WEIGHTS_NAME}: {module_name}.{key} should have shape {tuple(value.shape)} "
                    f"for this model, found {found}"
                )
            state[key] = tensor
            used.add(f"{module_name}.{key}")
        module_states[module] = state
    parameters = resolve_parameters_to_save(model, config)
    for name, param in parameters.items():
        tensor = tensors.get(name)
        if tensor is None or tensor.shape != param.shape:
            found = None if tensor is None else tuple(tensor.shape)
            raise ValueError(
                f"{directory / WEIGHTS_NAME}: {name} should have shape {tuple(param.shape)} for this model, "
                f"found {found}"
            )
    unused = sorted(set(tensors) - used - set(parameters))
    if unused:  # trained values the config would drop: an edited config, or weights of another adapter
        raise ValueError(
            f"{directory / WEIGHTS_NAME} holds {len(unused)} tensor(s) that {directory / CONFIG_NAME} does not use "
            f"(e.g. {unused[0]!r}): the config and the weights are not of one adapter"
        )
    try:  # what the saved config's targets select in this model: a deeper model of the same widths selects more
        selected = set(resolve_targets(model, config))
    except (TypeError, ValueError):  # a target list entry this model lacks: the records above are what counts
        selected = set(records)
    if selected - set(records):
        extra = sorted(selected - set(records))
        warnings.warn(
            f"the adapter in {directory} adapts {len(records)} layers, but its target_modules select {len(selected)} "
            f"in this {type(model).__name__} (e.g. {extra[0]!r} is not in the file): those stay unadapted; check "
            "that this is the base model the adapter was trained on"
            + (
                " (or, its target_modules being None, that it was not saved before the default became every "
                "projection of the blocks: OPT, Phi, DeBERTa and other families no preset names got fewer layers then)"
                if config.target_modules is None and detect_preset(model).name == "blocks"
                else ""
            ),
            stacklevel=2,
        )
    current = base_model_record(model)
    if isinstance(base_model, dict) and base_model.get("class") != current["class"]:
        warnings.warn(
            f"the adapter in {directory} was saved from a {_describe(base_model)} and is loaded into a "
            f"{_describe(current)}: the layer shapes match, but check that this is the base model you meant",
            stacklevel=2,
        )
    inject(model, config, specs)
    with torch.no_grad():
        for name, layer in iter_snell_layers(model):
            layer.snell_A.copy_(tensors[f"{name}.snell_A"])
            layer.snell_B.copy_(tensors[f"{name}.snell_B"])
            if config.learnable_coefficients:
                layer.snell_coefficients.copy_(tensors[f"{name}.snell_coefficients"])
            if layer.snell_mix is not None:
                layer.snell_mix.copy_(tensors[f"{name}.snell_mix"])
        for name, param in parameters.items():
            param.copy_(tensors[name])
    for module, state in module_states.items():
        module.load_state_dict(state)
    return compiled
