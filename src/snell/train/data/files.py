"""Reading data files with errors that name the file and line, and where shipped data lives."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Transform = Callable[[Any], Any]

#: Committed subsets, written by scripts/make_data_subsets.py.
DATA_DIR = Path(__file__).resolve().parents[2] / "data"


class DataFormatError(ValueError):
    """A data file that cannot be used as it is; the message starts with ``file:line:`` when a line is known."""


def _read_text(path: Path) -> str:
    """Whole file as UTF-8 text; a decoding error names the line, which Python's own message does not."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataFormatError(f"{path}:{line}: not UTF-8 text ({err.reason})") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) for each non-blank line; split on newlines only so numbers match editors."""
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if line.strip():
            yield number, line.strip()


def package_dir(package: str, extra: str) -> Path:
    """Where an installed data package lives, found without importing it (some run code on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; install snell[{extra}]")
    return Path(next(iter(spec.submodule_search_locations)))
