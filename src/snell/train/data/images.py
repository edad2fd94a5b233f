"""Image datasets on disk (VTAB-1k list files, FGVC JSON splits, class-per-folder trees) and the two
protocols' transforms."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from snell.train.data.files import DataFormatError, Transform, _lines, _read_text

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
FGVC_SPLITS = ("train", "val", "test")
#: The split files whose labels define a task's classes (ids 0 .. largest label); the test split's must fit.
VTAB_TRAINING_SPLITS = ("train800", "val200", "train800val200")
FGVC_TRAINING_SPLITS = ("train", "val")
PROTOCOLS = ("vtab", "fgvc")


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
        source = ""
        if classes_from:
            source = f", the classes of {classes_from} (if they lack the highest, set num_classes: --num-classes)"
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


def _training_classes(
    root: Path, split: str, training_splits: tuple[str, ...], suffix: str, read: Callable[[str], list[_Entry]]
) -> tuple[int, str]:
    """(head size, the files it came from): one more than the largest label of the training split files found
    at ``root`` (``split``'s own file when there is none), so every split of a task gets the same head."""
    sources = [s for s in training_splits if (root / f"{s}{suffix}").is_file()] or [split]
    labels = [entry.label for s in sources for entry in read(s)]
    return max(labels, default=-1) + 1, ", ".join(f"{s}{suffix}" for s in sources)


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
            num_classes, classes_from = _training_classes(
                root, split, VTAB_TRAINING_SPLITS, ".txt", lambda s: _read_vtab_list(root, s)
            )
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


#: Where VPT's FGVC folders keep their images, below the folder with the json files: CUB and NABirds in images/,
#: Stanford Dogs in Images/, Oxford Flowers and Stanford Cars beside the json files.
FGVC_IMAGE_DIRS = ("", "images", "Images")


def fgvc_image_dir(root: Path) -> Path:
    """The folder the paths of ``root/train.json`` are relative to: the first of :data:`FGVC_IMAGE_DIRS` holding
    its first image (``root`` itself when none does, so that the error names the path under ``root``)."""
    first = next(iter(_read_json_split(root / "train.json", Path())), None)
    if first is None:
        return root
    return next((root / d for d in FGVC_IMAGE_DIRS if (root / d / first.path).is_file()), root)


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
            num_classes, classes_from = _training_classes(
                root, split, FGVC_TRAINING_SPLITS, ".json", lambda s: _read_json_split(root / f"{s}.json", images)
            )
        super().__init__(entries, root / f"{split}.json", num_classes, transform, classes_from)


def image_folder(root: str | Path, transform: Transform | None = None) -> ImageFolder:
    """A class-per-folder image tree (torchvision ``ImageFolder``) whose decode errors name the image."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    return ImageFolder(root, transform=transform, loader=load_rgb)


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
