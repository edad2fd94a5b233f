"""Recipes: the paper's settings as YAML files of `snell train` options (``--recipe vtab/cifar``), or a user's own file.

A recipe's values sit between TrainConfig's defaults and the command line's flags; errors name the file and line.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from snell.train.config import TrainConfig, UserError


def _recipe_root() -> Path:
    return Path(str(resources.files("snell") / "recipes"))


def known_recipes() -> list[str]:
    """Names accepted by --recipe, such as "vtab/cifar", "fgvc/cub" and "snella/vtab/cifar" (any depth)."""
    root = _recipe_root()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def _key_line(text: str, key: str) -> int | None:
    match = re.search(rf"^{re.escape(key)}\s*:", text, flags=re.MULTILINE)
    return None if match is None else text.count("\n", 0, match.start()) + 1


def load_recipe(name_or_path: str) -> tuple[dict[str, Any], str]:
    """The values of a recipe and where they came from; errors name the file and line."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        if name_or_path not in known_recipes():
            raise UserError(f"unknown recipe {name_or_path!r}; known recipes: {', '.join(known_recipes())}")
        path = _recipe_root() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    text = path.read_text(encoding="utf-8")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(err, 'problem', None) or err}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"{path}:1: a recipe must be a mapping of option: value")
    known = {f.name for f in fields(TrainConfig)}
    for key in values:
        if key not in known:
            line = _key_line(text, str(key))
            where = f"{path}:{line}" if line else str(path)
            raise UserError(f"{where}: unknown option {key!r} (options are the `snell train` flags, with underscores)")
    return values, str(path)


def resolve_config(recipe: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < recipe < overrides (the flags given on the command line)."""
    values: dict[str, Any] = {}
    source = "command line"
    if recipe is not None:
        values, source = load_recipe(recipe)
    values = {**values, **overrides}
    values = {k: _normalise(k, v, source) for k, v in values.items()}
    try:
        return TrainConfig.from_dict(values, source)
    except TypeError as err:
        raise UserError(f"{source}: {err}") from None


def _normalise(key: str, value: Any, source: str) -> Any:
    """Bring YAML values to the types the flags produce (YAML reads 1e-3 as a string, for one)."""
    default = next(f for f in fields(TrainConfig) if f.name == key)
    kind = default.type
    if value is None:
        return None
    try:
        if kind in ("float", "float | None") and isinstance(value, (str, int)) and not isinstance(value, bool):
            return float(value)
        if kind in ("int", "int | None") and isinstance(value, str):
            return int(value)
    except ValueError:
        raise UserError(f"{source}: {key} must be a number, got {value!r}") from None
    if key in ("target_modules", "exclude_modules", "undropped_modules") and isinstance(value, str):
        return parse_modules(value)
    if key == "coefficients" and isinstance(value, str):
        return parse_floats(value, key)
    if key == "coefficients" and isinstance(value, list):
        return [float(v) for v in value]
    return value


def parse_modules(text: str) -> list[str] | str:
    """ "re:<regex>" is a regular expression over full module names; anything else a comma-separated list."""
    if text.startswith("re:"):
        return text[3:]
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_floats(text: str, name: str = "value") -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be comma-separated numbers, got {text!r}") from None
