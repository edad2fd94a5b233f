"""Backbones, the five fine-tuning methods, and how each method's result is saved, reloaded and merged.

Every method runs on the same backbone object built the same way, so a comparison differs only in what
is trained: ``snell`` (SNELL adapters), ``lora``/``dora`` (peft, on the layers of SNELL's preset), ``full``
(everything) and ``linear`` (the head only). The classification head, and any module the checkpoint did
not provide, is always trained fully.
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import snell
from snell.layers import call_through_forward
from snell.model import enclosing_module, resolve_targets
from snell.sharded import like
from snell.train.config import SNELL_METHODS, TrainConfig, UserError

STATE_FILE = "model_state.safetensors"
EXTRA_FILE = "extra_trainable.safetensors"
MERGED_FILE = "model.safetensors"
#: What a merged model is saved as (timm, or transformers' single and sharded safetensors): never overwritten silently.
MERGED_FILES = (MERGED_FILE, "model.safetensors.index.json")
#: Parameters (not modules) that the reference code trains fully next to the adapters.
TOKEN_PARAMS = ("cls_token",)


@dataclass
class Backbone:
    """A classifier with its new head, and what the data pipeline needs to feed it."""

    model: nn.Module
    kind: str  # "timm" or "transformers"
    head_names: list[str]
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    img_size: int = 224
    tokenizer: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    #: Where the backbone's weights came from: "random", "pretrained" (timm's hub weights) or a file or folder.
    weights: str = "random"


def is_transformers_dir(model: str) -> bool:
    return Path(model).is_dir() and (Path(model) / "config.json").is_file()


def build_backbone(config: TrainConfig, num_classes: int) -> Backbone:
    """The model of ``config`` with a fresh ``num_classes`` head, weights loaded and checked."""
    if is_transformers_dir(config.model):
        return _build_transformers(config, num_classes)
    return _build_timm(config, num_classes)


def _build_transformers(config: TrainConfig, num_classes: int) -> Backbone:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    for flag, value in (("--drop-path-rate", config.drop_path_rate), ("--checkpoint", config.checkpoint)):
        if value:  # the folder holds the weights a transformers model loads
            raise UserError(f"{flag} applies to timm models only; {config.model} is a transformers model folder")
    hf_logging.set_verbosity_error()  # the "newly initialized head" notice is expected: the head is trained
    hf_logging.disable_progress_bar()  # its "Loading weights" bar: the run's own bars follow --progress
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            config.model, num_labels=num_classes, output_loading_info=True, ignore_mismatched_sizes=True
        )
        tokenizer = AutoTokenizer.from_pretrained(config.model)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{config.model}: cannot load a transformers classifier from this folder: {err}") from None
    check_positions(model, config.max_length, "--max-length")
    new = {key.rsplit(".", 1)[0] for key in list(info["missing_keys"]) + [k[0] for k in info["mismatched_keys"]]}
    head = _classifier_names(model) | new
    return Backbone(
        model,
        "transformers",
        _outermost(head),
        tokenizer=tokenizer,
        info={"new_modules": sorted(new)},
        weights=config.model,
    )


def check_positions(model: nn.Module, tokens: int, what: str) -> None:
    """Refuse sequences longer than a transformers model's positions: learned position embeddings (BERT, GPT-2) fail
    on them with an IndexError deep inside torch, and rotary ones (LLaMA) run past what the model was trained on."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and tokens > positions:
        raise UserError(f"{what} {tokens} exceeds the model's {positions} positions (max_position_embeddings)")


def _classifier_names(model: nn.Module) -> set[str]:
    for name in ("classifier", "score", "head"):
        if isinstance(getattr(model, name, None), nn.Module):
            return {name}
    raise UserError(f"{type(model).__name__}: cannot find its classification head")


def _outermost(names: set[str]) -> list[str]:
    return sorted(n for n in names if not any(n.startswith(o + ".") for o in names if o != n))


def _build_timm(config: TrainConfig, num_classes: int) -> Backbone:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

    kwargs = dict(config.model_kwargs)
    if config.drop_path_rate:
        kwargs["drop_path_rate"] = config.drop_path_rate
    try:
        model = _create_timm(config, num_classes, kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise UserError(f"unknown timm model {config.model!r} (and not a transformers model folder)") from None
        raise
    except TypeError as err:
        raise UserError(f"timm model {config.model!r} does not accept these --model-kwargs: {err}") from None
    classifier = model.get_classifier()  # a tuple for distilled models (DeiT's head and head_dist, LeViT, ...)
    classifiers = classifier if isinstance(classifier, tuple) else (classifier,)
    heads = [name for name, module in model.named_modules() if any(module is c for c in classifiers)]
    for projection in (m for c in classifiers for m in c.modules() if isinstance(m, (nn.Linear, nn.Conv2d))):
        # A zero output projection starts every method at loss ln(C) instead of first unlearning a random projection
        # of large pretrained features (timm's default head init gave first-epoch losses of 4-5 for 10 classes).
        # Only the projections: a zeroed norm in front of one (RepViT's head) would leave every gradient at zero.
        for param in projection.parameters(recurse=False):
            nn.init.zeros_(param)
    info: dict[str, Any] = {}
    if config.checkpoint:
        info = load_timm_checkpoint(model, Path(config.checkpoint), skip_prefix=tuple(heads))
    data_config = resolve_data_config({}, model=model)
    img_size = config.img_size or int(kwargs.get("img_size") or data_config["input_size"][-1])
    _check_image_size(model, int(data_config["input_size"][0]), img_size, config.model)
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    if config.normalize == "imagenet":
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    weights = config.checkpoint or ("pretrained" if config.pretrained else "random")
    return Backbone(model, "timm", heads, mean, std, img_size, info=info, weights=weights)


def _check_image_size(model: nn.Module, channels: int, size: int, name: str) -> None:
    """One blank image at the run's size through the model, in eval mode and without gradients: a size it cannot
    take (a ViT patch larger than the image, ConvNeXt's stride-2 stages below 32 px) fails here, in one line, and
    not in the first training step with a traceback."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, size, size))
    except (RuntimeError, AssertionError, ValueError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{name} cannot run on {size}×{size} images (--img-size {size}): {detail}") from None
    finally:
        model.train(training)


def _create_timm(config: TrainConfig, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """The timm model, built for ``--img-size`` when it takes an ``img_size`` (ViTs fix their position
    embeddings to it). Models without one (CNNs) pool globally and run at any input size as they are."""
    import timm

    if config.img_size is not None and "img_size" not in kwargs:
        try:
            return timm.create_model(
                config.model, pretrained=config.pretrained, num_classes=num_classes, img_size=config.img_size, **kwargs
            )
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return timm.create_model(config.model, pretrained=config.pretrained, num_classes=num_classes, **kwargs)


# ------------------------------------------------------------------------------------------------------
# Checkpoints for timm backbones


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's weights-only loader runs no code from the file
        raise UserError(
            f"{path}: not a readable checkpoint: it holds Python objects besides tensors, which torch's safe loader "
            f"refuses ({str(err).splitlines()[0]}); save its state dict alone with torch.save"
        ) from None
    except Exception as err:  # any bytes reach the unpickler: IndexError, KeyError, ... on garbage
        raise UserError(f"{path}: not a readable checkpoint (corrupt, truncated or not a state dict?): {err}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def efficientnet_keys_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet state dict in the ``_blocks.<i>._expand_conv`` style (the EfficientNet-PyTorch
    naming, used by the efficientnet-lite0 package) to timm's ``blocks.<stage>.<block>.conv_pw`` names.

    The flat block index is mapped onto timm's stages in order; a block without ``_expand_conv`` is a
    depthwise-separable block, whose projection timm calls ``conv_pw`` rather than ``conv_pwl``.
    """
    positions = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    expanding = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            if index >= len(positions):
                raise UserError(
                    f"checkpoint block {index} does not exist in {len(positions)}-block {type(model).__name__}"
                )
            table = inverted if index in expanding else separable
            if parts[2] not in table:
                raise UserError(f"checkpoint key {key!r} has no counterpart in timm's EfficientNet")
            stage, block = positions[index]
            renamed[".".join(["blocks", str(stage), str(block), table[parts[2]], *parts[3:]])] = value
        elif parts[0] in top:
            renamed[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise UserError(f"checkpoint key {key!r} has no counterpart in timm's EfficientNet")
    return renamed


def load_timm_checkpoint(model: nn.Module, path: Path, skip_prefix: str | tuple[str, ...]) -> dict[str, Any]:
    """Load backbone weights; every key except the classifier's (``skip_prefix``: its module name, or names) must be
    present and fit exactly."""
    prefixes = (skip_prefix,) if isinstance(skip_prefix, str) else skip_prefix
    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise UserError(f"{path}: .npz checkpoints are only supported for timm vision transformers")
        try:
            model.load_pretrained(str(path))
        except (KeyError, RuntimeError, ValueError, OSError, zipfile.BadZipFile) as err:
            raise UserError(f"{path}: does not fit {type(model).__name__}: {err}") from None
        return {"checkpoint": str(path), "format": "npz"}
    state = _read_state_dict(path)
    if any(k.startswith("_blocks.") for k in state) and hasattr(model, "blocks"):
        state = efficientnet_keys_to_timm(state, model)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except (KeyError, RuntimeError, ValueError) as err:
            raise UserError(f"{path}: does not fit {type(model).__name__}: {err}") from None
    own = {k: v for k, v in model.state_dict().items() if enclosing_module(k, prefixes) is None}
    given = {k: v for k, v in state.items() if enclosing_module(k, prefixes) is None}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    wrong = [
        f"{k}: {tuple(given[k].shape)} in file, {tuple(own[k].shape)} in model"
        for k in sorted(set(own) & set(given))
        if given[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            text
            for text in (
                f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                f"shape mismatch: {wrong[:3]}" if wrong else "",
            )
            if text
        )
        raise UserError(f"{path}: checkpoint does not fit {type(model).__name__}: {details}")
    model.load_state_dict(given, strict=False)
    return {"checkpoint": str(path), "loaded_keys": len(given), "skipped_head_keys": len(state) - len(given)}


# ------------------------------------------------------------------------------------------------------
# Methods


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
    """The layers SNELL would adapt (preset or --target-modules); LoRA and DoRA get the same ones."""
    try:
        layers = replace(snell_config(config, model, head_names), undropped_modules=None)  # SNELL's own
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
    return model


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
        model.save_pretrained(str(directory))
    else:
        state, stored = {}, set()
        for name, tensor in mutable_state(model).items():
            if tensor.data_ptr() not in stored:  # tied weights (a causal LM's lm_head = embeddings) are stored once
                stored.add(tensor.data_ptr())
                state[name] = tensor.detach().cpu().contiguous()
        save_file(state, str(directory / STATE_FILE))
    extra = {  # peft adapters cannot hold a bare parameter; a SNELL adapter holds it (parameters_to_save)
        n: p.detach().cpu().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad and n.rsplit(".", 1)[-1] in TOKEN_PARAMS and config.method in ("lora", "dora")
    }
    if extra:
        save_file(extra, str(directory / EXTRA_FILE))
    return directory


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

            if not (directory / "adapter_config.json").is_file():
                raise UserError(f"{directory}: no peft adapter (adapter_config.json is missing)")
            model = PeftModel.from_pretrained(model, str(directory))
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
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(directory / MERGED_FILE))
    return directory
