"""`snell train`'s flags, generated from TrainConfig's fields so that the flags, the recipes and the run record never
drift apart; and the warnings for flags that the chosen method or model does not read."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from typing import Any

from snell.train.config import SNELL_METHODS, TrainConfig, UserError, first_process, flag_name
from snell.train.recipes import parse_floats, resolve_config


def _parse_json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_train_arguments(parser: argparse.ArgumentParser, helps: dict[str, str] | None = None) -> None:
    """One flag per TrainConfig field; absent flags stay absent so recipes are not overridden by defaults. ``helps``
    replaces a field's help text (`snell search` writes elsewhere by default)."""
    parser.add_argument(
        "--recipe", default=None, help="vtab/<task>, fgvc/<dataset>, snella/{vtab,fgvc}/<task> or a recipe YAML file"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from its last checkpoint (none there yet: start it, and say so)",
    )
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = (helps or {}).get(f.name, f.metadata["help"])
        default = None if f.default is MISSING else f.default
        if f.default is MISSING and f.default_factory is not MISSING:
            default = f.default_factory()
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        kwargs["help"] = f"{help_text} [default: {default}]" if default not in (None, {}) else help_text
        if f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "model_kwargs":
            kwargs["type"] = _parse_json_dict
        elif f.name == "coefficients":
            kwargs["type"] = lambda text: parse_floats(text, "coefficients")
        elif f.type.startswith("int"):
            kwargs["type"] = int
        elif f.type.startswith("float"):
            kwargs["type"] = float
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        # --rank: torchrun's own parser takes "--r" for an ambiguous abbreviation of its options.
        names = {"sparsity": [flag, "-s"], "r": [flag, "--rank"]}.get(f.name, [flag])
        parser.add_argument(*names, **kwargs)


_SNELL_OPTIONS = (
    "kernel", "num_pieces", "coefficients", "learnable_coefficients", "sparsity", "sparsify_mode", "adapter_drop_path",
    "split_fused_qkv", "undropped_modules",
)  # fmt: skip
_ALLOCATION_OPTIONS = (
    "target_sparsity", "init_sparsity", "alloc_epochs", "alloc_init_warmup", "alloc_final_warmup",
    "alloc_mask_interval", "alloc_beta1", "alloc_beta2",
)  # fmt: skip
#: The options only some methods read, and those methods. Recipes carry them for any method (``--recipe vtab/cifar
#: --method lora`` compares LoRA in SNELL's recipe); given as a flag to another method, the flag changes nothing.
_METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(_SNELL_OPTIONS, SNELL_METHODS),
    **dict.fromkeys(("r", "target_modules", "exclude_modules", "adapter_dropout"), (*SNELL_METHODS, "lora", "dora")),
    "lora_alpha": ("lora", "dora"),
    **dict.fromkeys(_ALLOCATION_OPTIONS, ("snella",)),
}


#: Options only one kind of model reads: the causal-LM route (snell.train.causal_lm) and the classifier route.
_CAUSAL_LM_OPTIONS = (
    "model_dtype", "gradient_checkpointing", "prompt_format", "packing", "train_on_prompt", "max_new_tokens",
    "score_by", "num_beams",
)  # fmt: skip
_CLASSIFIER_OPTIONS = (
    "shots", "data_seed", "img_size", "num_classes", "augment", "color_jitter", "normalize", "model_kwargs",
    "pretrained", "drop_path_rate", "train_cls_token",
)  # fmt: skip


def ignored_model_flags(config: TrainConfig, flags: set[str] | dict[str, Any]) -> str | None:
    """A warning naming the flags among ``flags`` that ``config.model``'s kind (causal LM or classifier) does not
    read, or None: --model-dtype on a timm ViT trained in float32 without a word, and config.json recorded it."""
    from snell.train.causal_lm.instructions import holds_instructions
    from snell.train.causal_lm.source import is_causal_lm

    causal = is_causal_lm(config.model)
    if not causal and holds_instructions(config.data):  # the run refuses this pair in one line; no warning before it
        return None
    other = _CLASSIFIER_OPTIONS if causal else _CAUSAL_LM_OPTIONS
    unread = [flag_name(name) for name in sorted(flags) if name in other]
    if not unread:
        return None
    kind = "a causal LM" if causal else "not a causal LM"
    return f"warning: --model {config.model} is {kind}, which does not use {', '.join(unread)}; ignored"


def method_reads(method: str, name: str) -> bool:
    """Whether ``method`` reads the option ``name`` (every method reads the options no method owns)."""
    return name not in _METHOD_OPTIONS or method in _METHOD_OPTIONS[name]


def ignored_flags(config: TrainConfig, flags: set[str] | dict[str, Any]) -> list[str]:
    """The flags among ``flags`` (option names) that ``config.method`` does not read, as ``--flag`` strings."""
    return [flag_name(name) for name in sorted(flags) if not method_reads(config.method, name)]


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The resolved config of a `snell train` command line; a flag its method does not read is named on stderr
    (by the first process only, under torchrun), not refused: a script may give every method the same flags."""
    names = {f.name for f in fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    config = resolve_config(args.recipe, overrides)
    if config.method == "snella" and "sparsity" in overrides:  # a recipe's sparsity (vtab/dtd's 0.995) stays quiet
        raise UserError(
            f"--sparsity is SNELL's fixed ratio; --method snella starts every layer at --init-sparsity and ends at "
            f"--target-sparsity, so leave --sparsity out (got {overrides['sparsity']!r})"
        )
    ignored = ignored_flags(config, overrides)
    if ignored and first_process():
        print(f"warning: --method {config.method} does not use {', '.join(ignored)}; ignored", file=sys.stderr)
    unread = ignored_model_flags(config, overrides)
    if unread and first_process():
        print(unread, file=sys.stderr)
    if config.epochs <= config.warmup_epochs and first_process():  # a recipe's 10 warm-up epochs, --epochs 5
        print(
            f"warning: the warm-up (--warmup-epochs {config.warmup_epochs:g}) lasts the whole run (--epochs "
            f"{config.epochs}): the rate climbs from --warmup-lr all along and never follows the cosine; give "
            "--warmup-epochs below --epochs",
            file=sys.stderr,
        )
    if config.method == "snella":
        end = config.allocation_end()
        if end < config.target_sparsity - 0.005 and first_process():  # the authors' schedule, at a short T
            print(
                f"warning: SNELLA's schedule ends at sparsity {end:.3f}, short of --target-sparsity "
                f"{config.target_sparsity} (its last re-allocation is (1/T)^3 of the way short, at T = "
                f"{config.allocation_epochs()} epochs); --alloc-final-warmup 1 makes the last epoch run at the target",
                file=sys.stderr,
            )
    return config
