"""Backbones: the pretrained model of a run with a fresh head, its weights loaded and checked, and what the data
pipeline needs to feed it (timm image models and transformers text classifiers; causal LMs: snell.train.causal_lm).

Every method runs on the same backbone object built the same way, so a comparison differs only in what is trained.
"""

from __future__ import annotations

import json
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from snell.model import enclosing_module
from snell.train.config import TrainConfig, UserError, is_run_config


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
        if is_run_config(Path(config.model) / "config.json"):
            raise UserError(
                f"--model {config.model} is a snell run folder, not a model: give the model it was trained from "
                "(its config.json's model), or evaluate or merge the run with snell eval / snell merge"
            )
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
    except (ValueError, AssertionError) as err:  # timm's own checks of a name, or of the values of its arguments
        raise UserError(_timm_refusal(config, err)) from None
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


def _timm_refusal(config: TrainConfig, err: Exception) -> str:
    """One line for what timm refused: a path given as --model that holds no model, or the value timm's check named."""
    path = Path(config.model)
    if path.is_dir():
        return f"--model {config.model}: a folder without a transformers model (no config.json), and no timm name"
    if "/" in config.model or config.model.startswith("."):
        return (
            f"--model {config.model}: no such folder, and no timm model name (timm's names have no '/'; a hub model "
            "is 'hf-hub:org/name', with --pretrained and hub access)"
        )
    detail = str(err) or f"{type(err).__name__} in timm"
    kwargs = f" with --model-kwargs {json.dumps(config.model_kwargs)}" if config.model_kwargs else ""
    return f"timm cannot build {config.model!r}{kwargs}: {detail}"


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
        detail = f"{type(err).__name__}: {err}"  # a bare KeyError reads "101"
        message = f"not a readable checkpoint (corrupt, truncated or not a state dict?): {detail}"
        raise UserError(f"{path}: {message}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _has_block_stages(model: nn.Module) -> bool:
    """Whether ``model.blocks`` is timm's EfficientNet layout, stages of blocks (a ViT's blocks are one list)."""
    blocks = getattr(model, "blocks", None)
    return isinstance(blocks, nn.Sequential) and len(blocks) > 0 and all(isinstance(s, nn.Sequential) for s in blocks)


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
    if any(k.startswith("_blocks.") for k in state):
        if not _has_block_stages(model):
            raise UserError(
                f"{path}: an EfficientNet-PyTorch checkpoint (keys '_blocks.<i>...') does not fit "
                f"{type(model).__name__}, which has no EfficientNet block stages"
            )
        try:
            state = efficientnet_keys_to_timm(state, model)
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except (KeyError, RuntimeError, ValueError) as err:
            raise UserError(
                f"{path}: does not fit {type(model).__name__}: timm's conversion of its checkpoints failed "
                f"({type(err).__name__}: {err})"
            ) from None
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
