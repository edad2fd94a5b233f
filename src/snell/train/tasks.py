"""Which examples a run trains, selects and reports on, for every supported data layout.

The split roles follow the protocol: with ``select_on="val"`` the model trains on the training part
(VTAB's train800) and the epoch is chosen on the validation part (val200); otherwise it trains on both
(train800val200) and only the test split is evaluated. Datasets are built without transforms, so that
bad list files or labels fail before the model is loaded; the transforms come from the model later. Every
image file a run will read is opened and checked here too, so a broken one stops the run before training,
not after the last epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision.datasets import ImageFolder

from snell.train import data as D
from snell.train.config import BUILTIN_DATA, TrainConfig, UserError


@dataclass
class Task:
    """The datasets of one run: ``train`` always, ``val`` only when selecting on it, ``test`` always."""

    name: str
    kind: str  # "image" or "text"
    format: str
    num_classes: int
    class_names: list[str]
    train: Dataset
    test: Dataset
    val: Dataset | None = None
    sizes: dict[str, int] = field(default_factory=dict)


class WithTransform(Dataset):
    """Applies an image transform to the first element of each ``(image, label)`` item."""

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any]):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return self.transform(image), label


def detect_format(data: str) -> str:
    """The layout of ``data``: a built-in task name, or what the files in the folder look like."""
    path = Path(data)
    if not path.exists():
        if data in BUILTIN_DATA:
            return "builtin"
        raise UserError(f"{data}: no such file or folder (built-in tasks: {', '.join(BUILTIN_DATA)})")
    if path.is_dir():
        if (path / "train800.txt").is_file() or (path / "train800val200.txt").is_file():
            return "vtab"
        if (path / "train.json").is_file():
            return "fgvc"
        if any((path / f"train{ext}").is_file() for ext in (".csv", ".jsonl", ".ndjson")):
            return "text"
        if (path / "train").is_dir():
            return "imagefolder"
    raise UserError(
        f"{data}: cannot tell the data format; expected a VTAB-1k folder (train800.txt, ...), an FGVC folder "
        "(train.json, ...), a folder with train/ val/ test/ class folders, or train.csv/.jsonl text files; "
        "or pass --data-format"
    )


def _text_file(root: Path, split: str) -> Path | None:
    return next(
        (root / f"{split}{ext}" for ext in (".csv", ".jsonl", ".ndjson") if (root / f"{split}{ext}").is_file()), None
    )


def _concat(parts: Sequence[Dataset]) -> Dataset:
    return parts[0] if len(parts) == 1 else ConcatDataset(list(parts))


def _limit(dataset: Dataset | None, limit: int | None) -> Dataset | None:
    if dataset is None or limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, range(limit))


def load_task(config: TrainConfig) -> Task:
    """Read and check the data named by ``config`` (no transforms yet)."""
    if not config.data:
        raise UserError("no data given: pass --data <folder, file or built-in task>")
    fmt = detect_format(config.data) if config.data_format == "auto" else config.data_format
    select = config.select_on == "val"
    root = Path(config.data)
    if fmt != "builtin" and not root.exists():
        if config.data in BUILTIN_DATA:  # --data-format, or a recipe's (vtab/..., fgvc/...), says what to read
            raise UserError(
                f"--data {config.data} is a built-in task, but data_format {config.data_format!r} (--data-format, or "
                f"the recipe's) reads a {config.data_format} folder: pass --data-format auto, or that folder"
            )
        raise UserError(f"{root}: no such file or folder")
    if config.num_classes is not None and fmt not in ("vtab", "fgvc"):
        raise UserError(f"--num-classes applies to VTAB and FGVC folders; {config.data} is {fmt} data")
    if fmt == "vtab":
        task = _vtab_task(root, select, config.num_classes)
    elif fmt == "fgvc":
        task = _fgvc_task(root, select, config.num_classes, train_only=config.protocol == "reference")
    elif fmt == "imagefolder":
        task = _imagefolder_task(root, select)
    elif fmt == "text":
        task = _text_task(root, select)
    else:
        task = _builtin_task(config, select)
    if task.num_classes < 2:  # a 1-way head's cross-entropy is 0 whatever the input: nothing would be learned
        raise UserError(f"{config.data} has {task.num_classes} class; classification needs at least 2")
    task.test = _limit(task.test, config.max_eval_samples)
    task.val = _limit(task.val, config.max_eval_samples)
    task.sizes = {name: len(ds) for name, ds in (("train", task.train), ("val", task.val), ("test", task.test)) if ds}
    for dataset in (task.train, task.val, task.test):
        for path, origin in _image_files(dataset):
            D.check_image(path, origin)
    return task


def _image_files(dataset: Dataset | None) -> list[tuple[Path, str]]:
    """(path, where it is listed) of every image file a dataset reads; none for in-memory or text data."""
    if isinstance(dataset, Subset):
        files = _image_files(dataset.dataset)
        return [files[i] for i in dataset.indices] if files else []
    if isinstance(dataset, ConcatDataset):
        return [item for part in dataset.datasets for item in _image_files(part)]
    if isinstance(dataset, (D.VtabFolder, D.FgvcJson)):
        return dataset.files()
    if isinstance(dataset, ImageFolder):
        return [(Path(path), f"{dataset.root} (class {dataset.classes[label]})") for path, label in dataset.samples]
    return []


def _vtab_task(root: Path, select: bool, num_classes: int | None) -> Task:
    # Every split takes its classes from the training list files (or --num-classes), so a test label beyond
    # them is an error.
    train = D.VtabFolder(root, "train800" if select else "train800val200", num_classes=num_classes)
    val = D.VtabFolder(root, "val200", num_classes=num_classes) if select else None
    test = D.VtabFolder(root, "test", num_classes=num_classes)
    names = [str(i) for i in range(train.num_classes)]
    return Task(root.name, "image", "vtab", train.num_classes, names, train, test, val)


def _fgvc_task(root: Path, select: bool, num_classes: int | None, train_only: bool = False) -> Task:
    # Every split takes its classes from train.json and val.json (or --num-classes), so a test label beyond
    # them is an error. The default protocol trains on train + val; the reference code (train_only) on train.json
    # alone, even when it tests.
    images = D.fgvc_image_dir(root)
    train = D.FgvcJson(root, "train", num_classes=num_classes, image_dir=images)
    val = D.FgvcJson(root, "val", num_classes=num_classes, image_dir=images) if (root / "val.json").is_file() else None
    if select and val is None:
        raise UserError(f"{root / 'val.json'}: file not found (needed by --select-on val)")
    test = D.FgvcJson(root, "test", num_classes=num_classes, image_dir=images)
    train_set = train if select or train_only or val is None else _concat([train, val])
    names = [str(i) for i in range(train.num_classes)]
    return Task(root.name, "image", "fgvc", train.num_classes, names, train_set, test, val if select else None)


def _imagefolder_task(root: Path, select: bool) -> Task:
    train = D.image_folder(root / "train")
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise UserError(f"{test_dir}: folder not found (an image-folder dataset needs train/ and test/)")
    test = D.image_folder(test_dir)
    val = D.image_folder(root / "val") if (root / "val").is_dir() else None
    for other, name in ((test, "test"), (val, "val")):
        if other is not None and other.class_to_idx != train.class_to_idx:
            raise UserError(f"{root / name}: class folders {other.classes} differ from train/ {train.classes}")
    if select and val is None:
        raise UserError(f"{root / 'val'}: folder not found (needed by --select-on val)")
    train_set = train if select or val is None else _concat([train, val])
    return Task(
        root.name,
        "image",
        "imagefolder",
        len(train.classes),
        list(train.classes),
        train_set,
        test,
        val if select else None,
    )


def _text_task(root: Path, select: bool) -> Task:
    files = {split: _text_file(root, split) for split in ("train", "val", "test")}
    for split in ("train", "test") + (("val",) if select else ()):
        if files[split] is None:
            raise UserError(f"{root}: no {split}.csv or {split}.jsonl file")
    train = D.TextClassificationFile(files["train"])
    names = train.class_names
    test = D.TextClassificationFile(files["test"], class_names=names)
    val = D.TextClassificationFile(files["val"], class_names=names) if files["val"] is not None else None
    train_set = train if select or val is None else _concat([train, val])
    return Task(root.name, "text", "text", len(names), list(names), train_set, test, val if select else None)


def _builtin_task(config: TrainConfig, select: bool) -> Task:
    name = config.data
    if name == "bbc_news":
        corpus = D.load_bbc_news()
        try:
            split = D.few_shot_split(corpus.labels, shots=config.shots, seed=config.data_seed)
        except ValueError as err:
            raise UserError(f"--shots {config.shots} is too many for bbc_news: {err}") from None
        train, val, test = (corpus.subset(idx) for idx in (split.train, split.val, split.test))
        train_set = train if select else _concat([train, val])
        return Task(
            name, "text", "builtin", corpus.num_classes, corpus.class_names, train_set, test, val if select else None
        )
    if name not in BUILTIN_DATA:
        raise UserError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(BUILTIN_DATA)}")
    images = D.load_builtin_task(name)
    train = images.dataset("train800" if select else "train800val200")
    val = images.dataset("val200") if select else None
    return Task(
        name, "image", "builtin", images.num_classes, list(images.class_names), train, images.dataset("test"), val
    )


def image_protocol(config: TrainConfig, task: Task) -> str:
    """vtab (straight resize, no augmentation) unless the data is FGVC or --augment says otherwise."""
    if config.augment is not None:
        return config.augment
    return "fgvc" if task.format == "fgvc" else "vtab"


def attach_transforms(
    task: Task, config: TrainConfig, img_size: int, mean: Sequence[float], std: Sequence[float]
) -> None:
    """Give the image datasets the model's normalisation and the protocol's resize/augmentation."""
    if task.kind != "image":
        return
    protocol = image_protocol(config, task)
    jitter = config.color_jitter if protocol == "fgvc" else 0.0
    train_tf = D.build_transforms(protocol, img_size, mean, std, train=True, color_jitter=jitter)
    eval_tf = D.build_transforms(protocol, img_size, mean, std, train=False)
    task.train = WithTransform(task.train, train_tf)
    task.test = WithTransform(task.test, eval_tf)
    if task.val is not None:
        task.val = WithTransform(task.val, eval_tf)


def make_collate(task: Task, tokenizer: Any, max_length: int) -> Callable[[list], tuple[Any, torch.Tensor]]:
    """Batches as (inputs, labels): a tensor of images, or the tokenizer's dict for texts."""
    if task.kind == "image":

        def collate_images(items: list) -> tuple[torch.Tensor, torch.Tensor]:
            images, labels = zip(*items, strict=True)
            return torch.stack(images), torch.tensor(labels, dtype=torch.long)

        return collate_images

    def collate_texts(items: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        texts, labels = zip(*items, strict=True)
        encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return dict(encoded), torch.tensor(labels, dtype=torch.long)

    return collate_texts
