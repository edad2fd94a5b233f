"""In-memory image tasks that need no download: IDX files (Fashion-MNIST, MNIST subsets), scikit-learn's
digits, and export to a VTAB-1k folder."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from snell.train.data.files import DATA_DIR, DataFormatError, Transform
from snell.train.data.images import VTAB_SPLITS

BUILTIN_TASKS = ("fashion_mnist", "mnist", "digits")

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
