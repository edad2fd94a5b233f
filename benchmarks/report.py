"""Shared result writing: environment facts, CSV and markdown tables, so every result file says where it came from."""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    """One measured ratio against its limit (``value`` None: not measured in this run)."""

    name: str
    value: float | None
    limit: float

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        return "PASS" if self.value <= self.limit else "MISS"

    @property
    def shown(self) -> str:
        """The value as the tables show numbers (:func:`fmt`), with the digits its verdict needs."""
        return self.show(fmt)

    def show(self, digits_format: Callable[[float, int], str]) -> str:
        """The value in ``digits_format`` (value, digits), from 3 digits up to as many as its verdict needs:
        1.000073 against a limit of 1.0 reads 1.0001, not a 1 that MISSes."""
        if self.value is None:
            return "–"
        for digits in range(3, 10):
            text = digits_format(self.value, digits)
            if (float(text) <= self.limit) == (self.value <= self.limit):
                return text
        return repr(self.value)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git_commit() -> str:
    """HEAD of the repo, and which library or benchmark files differ from it (those the numbers may include)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    paths = ["src", "benchmarks", ":!benchmarks/results"]
    changed = git("diff", "--name-only", "HEAD", "--", *paths).split()
    changed += git("ls-files", "--others", "--exclude-standard", "--", *paths).split()
    return commit + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    """Machine, load and versions, as label → value."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "load average (1, 5, 15 min) at start": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "peft": _version("peft"),
        "snell": f"{_version('snell')}, git {_git_commit()}",
    }


def command_line(module: str, argv: Sequence[str]) -> str:
    """The command as typed from the repo root."""
    python = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable
    return " ".join([python, "-m", module, *argv])


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _int_from(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of steps, rounds, pairs, ...), else argparse's one-line error."""
    return _int_from(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (warm-up steps), else argparse's one-line error."""
    return _int_from(text, 0)


def _float_from(text: str, low: float, strict: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {low:g}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (seconds of a timeout), else argparse's one-line error."""
    return _float_from(text, 0.0, strict=True)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (seconds of a budget: 0 plans and skips every part), else argparse's
    one-line error."""
    return _float_from(text, 0.0, strict=False)


def sparsity(text: str) -> float:
    """argparse type: a fraction of ΔW zeroed, in [0, 1), else argparse's one-line error."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a sparsity in [0, 1), got {text!r}")
    return value


def _shape(text: str, sides: tuple[int, ...], example: str) -> str:
    parts = text.lower().split("x")
    if len(parts) not in sides or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected a shape such as {example}, got {text!r}")
    return text.lower()


def matrix_shape(text: str) -> str:
    """argparse type: a matrix shape OUTxIN, each side an integer >= 1 (returned in lower case)."""
    return _shape(text, (2,), "11008x4096")


def layer_shape(text: str) -> str:
    """argparse type: a Linear's OUTxIN or a Conv2d's OUTxINxKHxKW, each side an integer >= 1."""
    return _shape(text, (2, 4), "11008x4096 or 64x32x3x3")


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_markdown(env: dict[str, str], command: str) -> str:
    return "\n".join([markdown_table(["", ""], env.items()), "", f"Command: `{command}`"])
