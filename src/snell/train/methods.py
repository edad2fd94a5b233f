"""The six fine-tuning methods on a backbone, and how each method's result is saved, reloaded and merged.

``snell`` and ``snella`` (SNELL adapters), ``lora``/``dora`` (peft, on the layers of SNELL's preset), ``full``
(everything) and ``linear`` (the head only). The classification head, and any module the checkpoint did not
provide, is always trained fully.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

import snell
from snell.config import METHOD_KEY
from snell.io import open_safetensors_modes, savable, write_safetensors
from snell.layers import call_through_forward
from snell.model import check_merge_targets, enclosing_module, resolve_targets
from snell.sharded import like
from snell.train.backbones import Backbone
from snell.train.config import SNELL_METHODS, TrainConfig, UserError

STATE_FILE = "model_state.safetensors"
EXTRA_FILE = "extra_trainable.safetensors"
MERGED_FILE = "model.safetensors"
#: What a merged model is saved as (timm, or transformers' single and sharded safetensors): never overwritten silently.
MERGED_FILES = (MERGED_FILE, "model.safetensors.index.json")
#: Parameters (not modules) that the reference code trains fully next to the adapters.
TOKEN_PARAMS = ("cls_token",)


def _token_parameters(model: nn.Module, config: TrainConfig) -> list[str]:
    """The token parameters (cls_token) ``model`` has and the run trains fully."""
    if not config.train_cls_token:
        return []
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_parameters()}
    return [name for name in TOKEN_PARAMS if name in names]


def snell_config(config: TrainConfig, model: nn.Module, head_names: list[str]) -> snell.SnellConfig:
    """The SNELL adapter of a snell or snella run (snella: mixk, every layer starting at ``--init-sparsity``)."""
    snella = config.method == "snella"
    try:
        return snell.SnellConfig(
            r=config.r,
            kernel="mixk" if snella else config.kernel,
            num_pieces=config.num_pieces,
            coefficients=config.coefficients,
            learnable_coefficients=config.learnable_coefficients,
            sparsity=config.init_sparsity if snella else config.sparsity,
            sparsify_mode=config.sparsify_mode,
            target_modules=config.target_modules,
            exclude_modules=config.exclude_modules,
            modules_to_save=head_names,
            parameters_to_save=_token_parameters(model, config) or None,
            dropout=config.adapter_dropout,
            undropped_modules=config.undropped_modules,
            drop_path=config.adapter_drop_path,
            split_fused_qkv=config.split_fused_qkv,
        )
    except ValueError as err:
        raise UserError(str(err)) from None


def adapted_layer_names(model: nn.Module, config: TrainConfig, head_names: list[str]) -> list[str]:
    """The layers SNELL would adapt (preset or --target-modules); LoRA and DoRA get the same ones, at any rank: only
    the targets are read, not SNELL's kernel (whose pieces must divide r)."""
    targets_only = replace(config, kernel="linear", num_pieces=1, coefficients=None)
    try:
        layers = replace(snell_config(targets_only, model, head_names), undropped_modules=None)
        return sorted(resolve_targets(model, layers))
    except (TypeError, ValueError) as err:
        raise UserError(str(err)) from None


def _peft_config(config: TrainConfig, targets: list[str], head_names: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.r,
        lora_dropout=config.adapter_dropout,
        target_modules=targets,
        modules_to_save=head_names,
        use_dora=config.method == "dora",
        bias="none",
    )


def apply_method(backbone: Backbone, config: TrainConfig) -> nn.Module:
    """The trainable model: ``backbone.model`` with the method's trainable parts switched on."""
    model = backbone.model
    heads = backbone.head_names
    if config.method in SNELL_METHODS:
        try:
            model = snell.get_snell_model(model, snell_config(config, model, heads))
        except (TypeError, ValueError) as err:
            raise UserError(str(err)) from None
    elif config.method in ("lora", "dora"):
        from peft import get_peft_model

        targets = adapted_layer_names(model, config, heads)
        for target in targets:  # peft fails on it with its own traceback; SNELL's injection refuses it as this does
            head = enclosing_module(target, heads)
            if head is not None:
                raise UserError(f"{target!r} is in the head {head!r}, trained fully; leave it out of --target-modules")
        modules = dict(model.named_modules())
        for target in targets:  # BEiT/EVA/Swin V2 attention must call its qkv, or LoRA's adapter there never acts
            call_through_forward(target, modules[target.rpartition(".")[0]])
            layer = modules[target]
            if isinstance(layer, nn.Conv2d) and config.r % layer.groups:  # peft refuses it with a traceback
                raise UserError(
                    f"{config.method} cannot adapt {target!r}, a conv with {layer.groups} groups, at --rank "
                    f"{config.r}: peft needs a rank divisible by a conv's groups; give a multiple of {layer.groups}, "
                    "or leave such convs out with --exclude-modules"
                )
        model = get_peft_model(model, _peft_config(config, targets, heads))
    elif config.method == "full":
        model.requires_grad_(True)
    else:  # linear
        model.requires_grad_(False)
        for name, module in model.named_modules():
            if name in heads:
                module.requires_grad_(True)
    if config.method in ("lora", "dora"):  # SNELL trains them through its config's parameters_to_save
        tokens = _token_parameters(model, config)
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in tokens:
                param.requires_grad_(True)
    if config.merge:
        check_merge_possible(model, config)
    return model


def check_merge_possible(model: nn.Module, config: TrainConfig) -> None:
    """UserError when the trained update could not be merged: ``--merge`` would fail after the whole run (SNELL into a
    tied or parametrized weight; peft's LoRA and DoRA into a grouped conv, which peft does not merge)."""
    if config.method in SNELL_METHODS:
        try:
            check_merge_targets(model, snell.snell_layers(model))
        except ValueError as err:
            raise UserError(f"--merge: {err}") from None
    elif config.method in ("lora", "dora"):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in model.named_modules():
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else None
            if isinstance(base, nn.Conv2d) and base.groups > 1:
                raise UserError(
                    f"--merge: peft cannot merge {config.method} into {name.removeprefix('base_model.model.')!r}, "
                    f"a conv with {base.groups} groups; train without --merge (the adapter is saved), or leave "
                    "grouped convs out with --exclude-modules"
                )


def set_train_mode(model: nn.Module) -> None:
    """Training mode, except frozen normalisation layers, whose running statistics stay the pretrained ones.

    Batch-norm statistics are state too: if they drifted while the backbone is frozen, the saved adapter
    (factors + head) would not reproduce the trained model. Full fine-tuning trains them as usual.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters(recurse=False)
        ):
            module.eval()


def mutable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: trainable parameters and the buffers of modules with trainable parameters."""
    state = {}
    for module_name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not any(p.requires_grad for p in own.values()):
            continue
        prefix = f"{module_name}." if module_name else ""
        for name, param in own.items():
            if param.requires_grad:
                state[prefix + name] = param
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[prefix + name] = buffer
    return state


def load_mutable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    targets = mutable_state(model)
    if set(targets) != set(state):
        raise UserError(f"saved training state does not match the model ({len(state)} vs {len(targets)} tensors)")
    with torch.no_grad():
        for name, tensor in targets.items():
            tensor.copy_(like(tensor, state[name]))  # a shard (--fsdp) takes its slice of the whole tensor


def save_trained(model: nn.Module, config: TrainConfig, directory: Path, training: dict | None = None) -> Path:
    """Write the result in the method's own format: SNELL adapter, peft adapter, or a state dict.

    ``training`` (what a later user of the adapter must repeat, e.g. the prompt format) goes into a SNELL
    adapter's config; peft's loader warns on keys it does not know, so its adapters leave it to the run folder.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if config.method in SNELL_METHODS:
        snell.save_adapter(model, directory, training)
    elif config.method in ("lora", "dora"):
        # The harness never adapts embeddings; "auto" would look for the base model's config.json to compare vocab
        # sizes, and warn for a GGUF model's folder, which has none.
        model.save_pretrained(str(directory), save_embedding_layers=False)
        open_safetensors_modes(directory)
    else:
        state, stored = {}, set()
        for name, tensor in mutable_state(model).items():
            if tensor.data_ptr() not in stored:  # tied weights (a causal LM's lm_head = embeddings) are stored once
                stored.add(tensor.data_ptr())
                state[name] = tensor.detach().cpu().contiguous()
        write_safetensors(state, directory / STATE_FILE)
    extra = {  # peft adapters cannot hold a bare parameter; a SNELL adapter holds it (parameters_to_save)
        n: p.detach().cpu().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad and n.rsplit(".", 1)[-1] in TOKEN_PARAMS and config.method in ("lora", "dora")
    }
    if extra:
        write_safetensors(extra, directory / EXTRA_FILE)
    return directory


def _check_peft_adapter(directory: Path, method: str) -> None:
    """A `--method lora`/`dora` run's adapter folder holds a peft LoRA adapter (DoRA is LoRA with use_dora): another
    kind (a SNELL one given with --adapter) ended in a KeyError traceback inside peft."""
    path = directory / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{directory}: no peft adapter (adapter_config.json is missing)")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({err})") from None
    kind = saved.get(METHOD_KEY) if isinstance(saved, dict) else None
    dora = bool(saved.get("use_dora")) if isinstance(saved, dict) else False
    if kind != "LORA" or dora != (method == "dora"):
        found = "a peft DoRA adapter" if kind == "LORA" and dora else f"a {kind or 'non-peft'} adapter"
        raise UserError(f"{directory} holds {found}, not the {method} adapter of this run")


def load_trained(backbone: Backbone, config: TrainConfig, directory: Path) -> nn.Module:
    """``backbone`` with a result saved by :func:`save_trained` applied (for evaluation or merging)."""
    model = backbone.model
    if not directory.is_dir():
        raise UserError(f"{directory}: adapter folder not found")
    try:
        if config.method in SNELL_METHODS:
            model = snell.load_adapter(model, directory)
        elif config.method in ("lora", "dora"):
            from peft import PeftModel

            _check_peft_adapter(directory, config.method)
            try:
                model = PeftModel.from_pretrained(model, str(directory))
            except RuntimeError as err:  # torch's load_state_dict: shapes of another model
                detail = " ".join(line.strip() for line in str(err).splitlines()[1:2])
                raise UserError(f"{directory}: the adapter was made for another model ({detail})") from None
        else:
            path = directory / STATE_FILE
            if not path.is_file():
                raise UserError(f"{path}: file not found")
            state = load_file(str(path))
            own = model.state_dict()
            bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
            if bad:
                raise UserError(f"{path}: does not fit this model (e.g. {bad[:3]})")
            model.load_state_dict(state, strict=False)
    except (FileNotFoundError, ValueError, SafetensorError) as err:
        raise UserError(str(err)) from None
    extra_path = directory / EXTRA_FILE
    if extra_path.is_file():
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(str(extra_path)).items():
                if name not in params or params[name].shape != tensor.shape:
                    raise UserError(f"{extra_path}: {name} does not fit this model")
                params[name].copy_(tensor)
    return model


def merge_trained(model: nn.Module, config: TrainConfig) -> nn.Module:
    """The plain backbone class with the update folded into its weights (inference costs the base model)."""
    check_merge_possible(model, config)  # `snell merge` of a run trained without --merge: one line, not a traceback
    if config.method in SNELL_METHODS:
        return snell.merge_and_unload(model)
    if config.method in ("lora", "dora"):
        return model.merge_and_unload()
    return model


def save_merged(model: nn.Module, backbone: Backbone, directory: Path) -> Path:
    """A merged model as safetensors: ``save_pretrained`` for transformers, ``model.safetensors`` for timm."""
    directory.mkdir(parents=True, exist_ok=True)
    if backbone.kind == "transformers":
        model.save_pretrained(str(directory), safe_serialization=True)
        backbone.tokenizer.save_pretrained(str(directory))
        open_safetensors_modes(directory)
    else:
        # A module registered under several names (CoaT shares MLPs and position encodings) puts one tensor under
        # several keys.
        write_safetensors(savable(model.state_dict()), directory / MERGED_FILE)
    return directory
