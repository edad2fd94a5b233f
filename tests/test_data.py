"""Data layer: committed subsets, split files with pointed errors, few-shot splits, transforms."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from snell.train.config import TrainConfig, UserError
from snell.train.data import (
    VTAB_SPLITS,
    ArrayImageDataset,
    DataFormatError,
    FgvcJson,
    ImageTask,
    TextClassificationFile,
    VtabFolder,
    build_transforms,
    check_image,
    class_balanced_split,
    export_vtab_folder,
    few_shot_split,
    image_folder,
    load_bbc_news,
    load_builtin_task,
    load_idx_task,
    read_idx,
)
from snell.train.tasks import detect_format, load_task


@pytest.fixture(scope="module")
def fashion() -> ImageTask:
    return load_builtin_task("fashion_mnist")


@pytest.fixture(scope="module")
def bbc():
    return load_bbc_news()


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6), value, dtype=np.uint8)).save(path)


# ---------------------------------------------------------------------------------------------- built-in tasks


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_committed_subsets_are_balanced_vtab1k_tasks(name):
    task = load_builtin_task(name)
    assert task.name == name and task.num_classes == 10
    for split, n in (("train800", 800), ("val200", 200), ("train800val200", 1000), ("test", 1000)):
        images, labels = task.split(split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, n // 10))
    assert task.train_images.max() == 255 and task.train_images.min() == 0  # real pixels, not a blank array


def test_fashion_mnist_class_names(fashion):
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"


def test_digits_task_uses_all_1797_images_once():
    task = load_builtin_task("digits")
    assert task.train_images.shape == (800, 8, 8) and task.val_images.shape == (200, 8, 8)
    assert task.test_images.shape == (797, 8, 8)
    assert np.array_equal(np.bincount(task.train_labels), np.full(10, 80))
    assert np.array_equal(np.bincount(task.val_labels), np.full(10, 20))
    assert task.test_images.max() == 255
    # The test set is exactly what train and val left over: all 1797 images, each once.
    from sklearn.datasets import load_digits

    expected = np.rint(load_digits().images * (255 / 16)).astype(np.uint8).reshape(1797, -1)
    together = np.concatenate([task.train_images, task.val_images, task.test_images]).reshape(1797, -1)
    assert sorted(map(bytes, together)) == sorted(map(bytes, expected))


def test_unknown_builtin_task():
    with pytest.raises(ValueError, match="cifar"):
        load_builtin_task("cifar")


def test_class_balanced_split_is_disjoint_deterministic_and_seeded():
    labels = np.repeat(np.arange(3), [10, 12, 9])
    a, b = class_balanced_split(labels, [6, 3], seed=1)
    assert np.array_equal(np.bincount(labels[a]), [2, 2, 2]) and np.array_equal(np.bincount(labels[b]), [1, 1, 1])
    assert not set(a) & set(b)
    assert all(np.array_equal(x, y) for x, y in zip((a, b), class_balanced_split(labels, [6, 3], seed=1), strict=True))
    assert not np.array_equal(a, class_balanced_split(labels, [6, 3], seed=2)[0])
    with pytest.raises(ValueError, match="class 2 has 9 examples"):
        class_balanced_split(labels, [30], seed=0)
    a, b = class_balanced_split(labels, [7, 5], seed=0)  # sizes that are not a multiple of the class count
    assert (len(a), len(b)) == (7, 5) and not set(a) & set(b)


# ---------------------------------------------------------------------------------------------- IDX files


def _write_idx(path: Path, array: np.ndarray, code: int) -> None:
    header = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def test_read_idx_gz_and_plain(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", images, 0x08)
    _write_idx(tmp_path / "b", np.array([1, -70000], dtype=np.int32), 0x0C)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), images)
    assert read_idx(tmp_path / "b").tolist() == [1, -70000]
    (tmp_path / "c").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(DataFormatError, match="shape \\(5,\\)"):
        read_idx(tmp_path / "c")
    (tmp_path / "d").write_bytes(b"PK\x03\x04")
    with pytest.raises(DataFormatError, match="not an IDX file"):
        read_idx(tmp_path / "d")


def test_load_idx_task_from_a_full_idx_directory(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 30)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 5, 5), dtype=np.uint8), 0x08)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 3, 0x08)
    task = load_idx_task(tmp_path, "toy", ["a", "b", "c"], n_train=12, n_val=6, n_test=9)
    assert task.train_images.shape == (12, 5, 5) and task.test_images.shape == (9, 5, 5)
    assert np.array_equal(np.bincount(task.val_labels), [2, 2, 2])
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\.gz \(or t10k-images-idx3-ubyte\) not found"):
        load_idx_task(tmp_path, "toy", ["a", "b", "c"], n_train=12, n_val=6, n_test=9)


# ---------------------------------------------------------------------------------------------- in-memory images


def test_array_dataset_serves_rgb_images(fashion):
    dataset = fashion.dataset("val200")
    image, label = dataset[3]
    assert image.mode == "RGB" and image.size == (28, 28) and label == fashion.val_labels[3]
    assert np.array_equal(np.asarray(image), np.repeat(fashion.val_images[3][..., None], 3, axis=2))
    tensor, _ = fashion.dataset("test", build_transforms("vtab", 32))[0]
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    with pytest.raises(ValueError, match="uint8"):
        ArrayImageDataset(np.zeros((2, 4, 4), dtype=np.float32), [0, 1])


def test_exported_vtab_folder_reads_back_identically(fashion, tmp_path):
    root = export_vtab_folder(fashion, tmp_path / "vtab")
    assert sorted(p.name for p in root.glob("*.txt")) == sorted(f"{split}.txt" for split in VTAB_SPLITS)
    assert len(list((root / "images").rglob("*.png"))) == 2000
    for split in VTAB_SPLITS:
        from_disk, in_memory = VtabFolder(root, split), fashion.dataset(split)
        assert len(from_disk) == len(in_memory) and from_disk.num_classes == 10
        assert from_disk.targets == in_memory.labels.tolist()
        for (disk_image, _), (memory_image, _) in zip(from_disk, in_memory, strict=True):
            assert np.array_equal(np.asarray(disk_image), np.asarray(memory_image))


# ---------------------------------------------------------------------------------------------- VTAB folders


def _vtab_root(tmp_path: Path, lists: dict[str, str]) -> Path:
    for i in range(3):
        _png(tmp_path / "images" / f"{i}.png", value=40 * i)
    for split, text in lists.items():
        (tmp_path / f"{split}.txt").write_text(text)
    return tmp_path


GOOD_LISTS = {
    "train800": "images/0.png 0\nimages/1.png 1\n",
    "val200": "images/2.png 2\n",
    "train800val200": "images/0.png 0\nimages/1.png 1\nimages/2.png 2\n",
    "test": "images/1.png 1\n\nimages/2.png 2\n",
}


def test_vtab_folder_reads_lists_and_infers_num_classes(tmp_path):
    root = _vtab_root(tmp_path, GOOD_LISTS)
    train = VtabFolder(root, "train800")
    assert len(train) == 2 and train.targets == [0, 1]
    assert train.num_classes == 3  # max label over the training list files (2, in val200.txt) + 1
    assert VtabFolder(root, "test").num_classes == 3
    image, label = train[1]
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (40, 40, 40) and label == 1
    assert VtabFolder(root, "train800", num_classes=3).num_classes == 3


def test_vtab_lists_as_editors_write_them(tmp_path):
    """A byte-order mark (Windows editors), paths with spaces (the label is after the last blank), and line numbers
    counted by newlines only: a form feed inside a line starts no new one."""
    _png(tmp_path / "my images" / "a b.png")
    _png(tmp_path / "images" / "0.png")
    (tmp_path / "train800.txt").write_bytes("images/0.png 0\nmy images/a b.png 1\n".encode("utf-8-sig"))
    train = VtabFolder(tmp_path, "train800")
    assert train.targets == [0, 1] and [e.path for e in train.entries] == [
        tmp_path / "images" / "0.png",
        tmp_path / "my images" / "a b.png",
    ]
    (tmp_path / "test.txt").write_text("images/0.png 0\x0c\nimages/0.png x\n")
    with pytest.raises(DataFormatError, match=r"test\.txt:2: label 'x'"):
        VtabFolder(tmp_path, "test", num_classes=2)


def test_vtab_missing_list_file_is_named(tmp_path):
    root = _vtab_root(tmp_path, {"train800": GOOD_LISTS["train800"]})
    with pytest.raises(FileNotFoundError, match=r"test\.txt.*list files in .*\['train800\.txt'\]"):
        VtabFolder(root, "test")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("images/1.png", r"train800\.txt:2: expected '<relative/image/path> <label>'"),
        ("images/1.png one", r"train800\.txt:2: label 'one' is not an integer"),
        ("images/1.png -1", r"train800\.txt:2: label -1 is out of range \[0, 3\)"),
        ("images/1.png 3", r"train800\.txt:2: label 3 is out of range \[0, 3\)"),
        ("images/9.png 1", r"train800\.txt:2: image .*9\.png not found"),
    ],
)
def test_vtab_bad_lines_name_file_and_line(tmp_path, line, message):
    root = _vtab_root(tmp_path, {"train800": f"images/0.png 0\n{line}\n"})
    with pytest.raises((DataFormatError, FileNotFoundError), match=message):
        VtabFolder(root, "train800", num_classes=3)


def test_vtab_inferred_range_covers_every_training_list_file(tmp_path):
    root = _vtab_root(tmp_path, {"train800": "images/0.png 0\n", "val200": "images/1.png 1\nimages/2.png x\n"})
    with pytest.raises(DataFormatError, match=r"val200\.txt:2: label 'x'"):
        VtabFolder(root, "train800")


def test_vtab_test_label_outside_the_training_classes_names_its_line(tmp_path):
    """A label only test.txt has (99, with 3 training classes) would silently widen the head to 100 classes."""
    root = _vtab_root(tmp_path, {**GOOD_LISTS, "test": "images/1.png 1\n\nimages/2.png 99\n"})
    assert VtabFolder(root, "train800val200").num_classes == 3
    with pytest.raises(
        DataFormatError,
        match=r"test\.txt:3: label 99 is out of range \[0, 3\), the classes of train800\.txt, val200\.txt, "
        r"train800val200\.txt",
    ):
        VtabFolder(root, "test")


def test_vtab_undecodable_image_fails_when_loaded_and_names_it(tmp_path):
    root = _vtab_root(tmp_path, {"train800": "images/0.png 0\nimages/broken.png 1\n"})
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    dataset = VtabFolder(root, "train800")
    assert dataset[0][1] == 0
    with pytest.raises(DataFormatError, match=r"broken\.png: cannot decode image.*train800\.txt:2"):
        dataset[1]


def test_check_image_finds_broken_files_without_decoding(tmp_path):
    _png(tmp_path / "good.png")
    check_image(tmp_path / "good.png", "list.txt:1")
    data = (tmp_path / "good.png").read_bytes()
    for name, content in (("garbage.png", b"not an image"), ("cut.png", data[: len(data) // 2])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataFormatError, match=rf"list\.txt:7: cannot decode image .*{name}"):
            check_image(tmp_path / name, "list.txt:7")


def test_vtab_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="train1000"):
        VtabFolder(tmp_path, "train1000")


# ---------------------------------------------------------------------------------------------- FGVC JSON


def test_fgvc_json_reads_splits_relative_to_image_dir(tmp_path):
    for i in range(3):
        _png(tmp_path / "images" / f"c{i}" / f"{i}.png", value=i)
    (tmp_path / "train.json").write_text(json.dumps({"c0/0.png": 0, "c1/1.png": 1}, indent=2))
    (tmp_path / "test.json").write_text(json.dumps({"c2/2.png": 1}))
    train = FgvcJson(tmp_path, "train", image_dir=tmp_path / "images")
    assert len(train) == 2 and train.targets == [0, 1] and train.num_classes == 2
    assert train[1][0].mode == "RGB"
    assert FgvcJson(tmp_path, "test", image_dir=tmp_path / "images").num_classes == 2
    (tmp_path / "test.json").write_text(json.dumps({"c1/1.png": 1, "c2/2.png": 2}, indent=2))
    with pytest.raises(DataFormatError, match=r"test\.json:3: label 2 is out of range \[0, 2\), the classes of train"):
        FgvcJson(tmp_path, "test", image_dir=tmp_path / "images")
    with pytest.raises(FileNotFoundError, match=r"val\.json"):
        FgvcJson(tmp_path, "val", image_dir=tmp_path / "images")


@pytest.mark.parametrize("images", ["", "images", "Images"])
def test_an_fgvc_folder_finds_its_images_where_vpt_keeps_them(tmp_path, images):
    """VPT (and the reference code) keep CUB's and NABirds' images in images/, Stanford Dogs' in Images/, Oxford
    Flowers' and Stanford Cars' beside the json files; the paths in the json files are relative to that folder."""

    for split, (name, label) in {"train": ("a/0.png", 0), "val": ("b/1.png", 1), "test": ("b/2.png", 1)}.items():
        _png(tmp_path / images / name, value=label)
        (tmp_path / f"{split}.json").write_text(json.dumps({name: label}))
    task = load_task(TrainConfig(data=str(tmp_path), data_format="fgvc", select_on="val"))
    assert [path for path, _ in task.train.files()] == [tmp_path / images / "a/0.png"]
    assert task.val[0][1] == 1 and task.test[0][1] == 1  # the images load
    # the default protocol trains on train + val; the reference code, and so --protocol reference, on train alone
    assert len(load_task(TrainConfig(data=str(tmp_path), data_format="fgvc")).train) == 2
    assert len(load_task(TrainConfig(data=str(tmp_path), data_format="fgvc", protocol="reference")).train) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{\n  "a.png": 0,\n  "b.png": "1"\n}', r"train\.json:3: label '1' of 'b\.png' is not an integer"),
        ('{\n  "a.png": 0,\n  "b.png": true\n}', r"train\.json:3: label True"),
        ('{\n  "a.png": 0,\n  "a.png": 1\n}', r"train\.json:3: image 'a\.png' is listed twice"),
        ('{\n  "a.png": 0,\n  "b.png": 1,\n}', r"train\.json:4: invalid JSON"),
        ('[["a.png", 0]]', r"train\.json:1: expected a JSON object"),
        ('{\n  "a.png": 0,\n  "b.png": 7\n}', r"train\.json:3: label 7 is out of range \[0, 2\)"),
        ('{\n  "a.png": 0,\n  "é.png": "x"\n}', r"train\.json:3: label 'x' of 'é\.png'"),  # unescaped non-ASCII key
    ],
)
def test_fgvc_bad_entries_name_file_and_line(tmp_path, text, message):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    _png(tmp_path / "é.png")
    (tmp_path / "train.json").write_text(text)
    with pytest.raises(DataFormatError, match=message):
        FgvcJson(tmp_path, "train", num_classes=2)


# ---------------------------------------------------------------------------------------------- class folders


def test_image_folder_names_undecodable_image(tmp_path):
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "dog" / "b.png", value=200)
    (tmp_path / "dog" / "c.png").write_bytes(b"garbage")
    dataset = image_folder(tmp_path)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 3
    assert dataset[1][0].getpixel((0, 0)) == (200, 200, 200)
    with pytest.raises(DataFormatError, match=r"dog/c\.png: cannot decode image"):
        dataset[2]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        image_folder(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- text files


def test_csv_with_string_labels_and_multiline_text(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('id,text,label\n1,"first\nstill first",sport\n2,second,business\n\n3,third,sport\n')
    data = TextClassificationFile(path)
    assert data.class_names == ["business", "sport"]
    assert data.labels.tolist() == [1, 0, 1] and data[0] == ("first\nstill first", 1)
    # The held-out file reuses the training classes, even though it lacks "business".
    (tmp_path / "test.csv").write_text("text,label\nx,sport\n")
    assert TextClassificationFile(tmp_path / "test.csv", class_names=data.class_names).labels.tolist() == [1]


def test_csv_integer_labels_and_line_numbers_after_multiline_field(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"a\nb\nc",0\nshort,2\n')
    assert TextClassificationFile(path).labels.tolist() == [0, 2]
    assert TextClassificationFile(path).class_names == ["0", "1", "2"]
    path.write_text('text,label\n"a\nb\nc",0\nshort\n')
    with pytest.raises(DataFormatError, match=r"d\.csv:5: expected 2 fields, got 1"):
        TextClassificationFile(path)
    path.write_text("words,label\na,0\n")
    with pytest.raises(DataFormatError, match=r"d\.csv:1: header must name columns 'text' and 'label'"):
        TextClassificationFile(path)
    path.write_text("text,label\na,0\nb,9\n")
    with pytest.raises(DataFormatError, match=r"d\.csv:3: label 9 is out of range \[0, 2\)"):
        TextClassificationFile(path, class_names=["0", "1"])


def test_class_ids_are_refused_where_the_training_file_named_its_classes(tmp_path):
    """Ids mean the training file's classes in sorted-name order, which nobody writes by hand: a held-out file
    with ids after a training file with names used to be read through that order silently."""
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "tech"}\n{"text": "b", "label": "sport"}\n')
    names = TextClassificationFile(tmp_path / "train.jsonl").class_names
    (tmp_path / "test.jsonl").write_text('{"text": "c", "label": 0}\n')
    with pytest.raises(DataFormatError, match=r"test\.jsonl:1: label 0 is a class id, but the training file names"):
        TextClassificationFile(tmp_path / "test.jsonl", class_names=names)
    # Twelve classes named "0" to "11" sort as "0", "1", "10", "11", "2", ...: ids would not be the numbers.
    twelve = [str(i) for i in range(12)]
    with pytest.raises(DataFormatError, match=r"label 0 is a class id, but the training file names its classes"):
        TextClassificationFile(tmp_path / "test.jsonl", class_names=sorted(twelve))
    # A training file of ids (or of names that are the ids in order) gives ids their meaning.
    (tmp_path / "train.csv").write_text("text,label\na,1\nb,0\n")
    names = TextClassificationFile(tmp_path / "train.csv").class_names
    assert TextClassificationFile(tmp_path / "test.jsonl", class_names=names).labels.tolist() == [0]
    assert TextClassificationFile(tmp_path / "test.jsonl", class_names=twelve).labels.tolist() == [0]


def test_jsonl_labels_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n')
    data = TextClassificationFile(path)
    assert data.labels.tolist() == [1, 0] and data.num_classes == 2
    for body, message in [
        ('{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n', r"d\.jsonl:2: label 'x' is a str but line 1"),
        ('{"text": "a", "label": 1}\n{"text": "b" "label": 0}\n', r"d\.jsonl:2: invalid JSON"),
        ('{"text": "a"}\n', r"d\.jsonl:1: expected an object with keys 'text' and 'label'"),
        ('{"text": "", "label": 0}\n', r"d\.jsonl:1: 'text' must be a non-empty string"),
        ('{"text": "a", "label": 1.5}\n', r"d\.jsonl:1: 'label' must be an integer or a string"),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": "z"}\n', r"d\.jsonl:2: label 'z' is not one of"),
    ]:
        path.write_text(body)
        with pytest.raises(DataFormatError, match=message):
            TextClassificationFile(path, class_names=["x", "y"] if "z" in body else None)
    path.write_bytes(b'{"text": "a", "label": 0}\n{"text": "\xff", "label": 0}\n')
    with pytest.raises(DataFormatError, match=r"d\.jsonl:2: not UTF-8"):
        TextClassificationFile(path)


# ---------------------------------------------------------------------------------------------- BBC News


def test_bbc_news_classes_and_duplicates(bbc):
    assert bbc.class_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(bbc) == 2225 - 98  # the corpus' exact duplicates are dropped
    assert len(set(bbc.texts)) == len(bbc)
    assert np.bincount(bbc.labels).min() > 300
    text, label = bbc[0]
    assert isinstance(text, str) and len(text) > 100 and label == 0
    assert any("£" in t for t in bbc.texts)  # the Windows-1252 article decodes


def test_few_shot_split_is_seeded_disjoint_and_keeps_holdout_fixed(bbc):
    split = few_shot_split(bbc.labels, shots=8, seed=0)
    assert np.array_equal(np.bincount(bbc.labels[split.train]), np.full(5, 8))
    assert np.array_equal(np.bincount(bbc.labels[split.val]), np.full(5, 20))
    assert np.array_equal(np.bincount(bbc.labels[split.test]), np.full(5, 100))
    assert not set(split.train) & set(split.test) and not set(split.train) & set(split.val)
    assert not set(split.val) & set(split.test)
    assert not {bbc.texts[i] for i in split.train} & {bbc.texts[i] for i in split.test}

    again, other_seed, more_shots = (
        few_shot_split(bbc.labels, shots=8, seed=0),
        few_shot_split(bbc.labels, shots=8, seed=1),
        few_shot_split(bbc.labels, shots=16, seed=0),
    )
    assert np.array_equal(again.train, split.train)
    assert not np.array_equal(other_seed.train, split.train)
    for variant in (other_seed, more_shots):
        assert np.array_equal(variant.val, split.val) and np.array_equal(variant.test, split.test)
    assert set(split.train) <= set(more_shots.train)

    subset = bbc.subset(split.train)
    assert len(subset) == 40 and subset.class_names == bbc.class_names
    assert subset[0] == (bbc.texts[split.train[0]], int(bbc.labels[split.train[0]]))
    with pytest.raises(ValueError, match="shots"):
        few_shot_split(bbc.labels, shots=1000, seed=0)


# ---------------------------------------------------------------------------------------------- transforms


def _kinds(transform: T.Compose) -> list[type]:
    return [type(step) for step in transform.transforms]


def test_vtab_transforms_resize_straight_without_augmentation():
    for train in (True, False):
        transform = build_transforms("vtab", 64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), train=train)
        assert _kinds(transform) == [T.Resize, T.ToTensor, T.Normalize]
        assert transform.transforms[0].size == (64, 64)
        assert transform.transforms[2].mean == [0.5, 0.5, 0.5]
        out = transform(Image.new("RGB", (100, 30), (255, 0, 0)))
        assert out.shape == (3, 64, 64) and torch.allclose(out[0], torch.ones(64, 64))
    noise = Image.effect_noise((16, 16), 64).convert("RGB")  # the resize is bicubic, as the reference code's
    plain = build_transforms("vtab", 8, mean=(0, 0, 0), std=(1, 1, 1))(noise)
    assert torch.equal(plain, T.ToTensor()(T.Resize((8, 8), interpolation=T.InterpolationMode.BICUBIC)(noise)))


def test_fgvc_transforms():
    train = build_transforms("fgvc", 224, train=True, color_jitter=0.4)
    assert _kinds(train) == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ColorJitter, T.ToTensor, T.Normalize]
    jitter = train.transforms[2]  # the authors' ColorJitter(c, c, c): brightness, contrast and saturation
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4) and jitter.hue is None
    assert _kinds(build_transforms("fgvc", 224, train=True))[:3] == [
        T.RandomResizedCrop,
        T.RandomHorizontalFlip,
        T.ToTensor,
    ]
    evaluation = build_transforms("fgvc", 224)
    assert _kinds(evaluation) == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert evaluation.transforms[0].size == 256
    assert evaluation.transforms[3].mean == [0.485, 0.456, 0.406]  # ImageNet by default
    assert evaluation(Image.new("RGB", (300, 500))).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="color_jitter"):
        build_transforms("vtab", 224, train=True, color_jitter=0.4)
    with pytest.raises(ValueError, match="protocol"):
        build_transforms("imagenet", 224)


def test_data_with_one_class_is_refused(tmp_path):
    """A 1-way head's cross-entropy is 0 whatever the input: the run used to train nothing and report accuracy 1."""

    for split in ("train", "test"):
        _png(tmp_path / split / "cat" / "a.png")
    with pytest.raises(UserError, match="has 1 class; classification needs at least 2"):
        load_task(TrainConfig(data=str(tmp_path), data_format="imagefolder"))
    _png(tmp_path / "train" / "dog" / "b.png")
    _png(tmp_path / "test" / "dog" / "b.png")
    assert load_task(TrainConfig(data=str(tmp_path), data_format="imagefolder")).num_classes == 2


# ---------------------------------------------------------------------------------------------- gaps a mutation
# audit found: each test fails with the mutant named in its comment


def test_text_labels_are_checked_stripped_and_typed(tmp_path):
    from snell.train.data.text import TextDataset

    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):  # a label equal to the class count
        TextDataset(["a", "b"], [0, 2], ["x", "y"])
    (tmp_path / "spaces.csv").write_text("text,label\nx, sport\ny,sport\nz,tech\n")  # " sport" is "sport"
    spaces = TextClassificationFile(tmp_path / "spaces.csv")
    assert (spaces.class_names, spaces.labels.tolist()) == (["sport", "tech"], [0, 0, 1])
    (tmp_path / "ids.csv").write_text("text,label\nx, 1\ny,0\n")  # " 1" is the class id 1
    assert TextClassificationFile(tmp_path / "ids.csv").labels.tolist() == [1, 0]
    (tmp_path / "mixed.csv").write_text("text,label\na,2\nb,sport\nc,2\n")  # ids only when every label is one
    mixed = TextClassificationFile(tmp_path / "mixed.csv")
    assert (mixed.class_names, mixed.labels.tolist()) == (["2", "sport"], [0, 1, 0])
    (tmp_path / "bool.jsonl").write_text('{"text": "a", "label": true}\n{"text": "b", "label": false}\n')
    with pytest.raises(DataFormatError, match=r"bool\.jsonl:1: 'label' must be an integer or a string, got True"):
        TextClassificationFile(tmp_path / "bool.jsonl")
    (tmp_path / "fields.csv").write_text('text,label\n"a\nb"\nc,x\n')  # a bad record is named by its first line
    with pytest.raises(DataFormatError, match=r"fields\.csv:2: expected 2 fields, got 1"):
        TextClassificationFile(tmp_path / "fields.csv")


def test_few_shot_split_takes_a_class_with_exactly_the_examples_it_needs():
    split = few_shot_split(np.repeat(np.arange(2), 4), shots=2, seed=0, val_per_class=1, test_per_class=1)
    assert sorted(np.concatenate([split.train, split.val, split.test]).tolist()) == list(range(8))


def test_formats_are_detected_from_train800val200_alone_and_from_ndjson(tmp_path):

    vtab = export_vtab_folder(load_builtin_task("digits"), tmp_path / "vtab")
    (vtab / "train800.txt").unlink()
    (vtab / "val200.txt").unlink()
    assert detect_format(str(vtab)) == "vtab" and load_task(TrainConfig(data=str(vtab))).sizes["train"] == 1000
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "train.ndjson").write_text(json.dumps({"text": "a", "label": 0}) + "\n")
    assert detect_format(str(tmp_path / "text")) == "text"


def _text_folder(path: Path, val: bool = True) -> Path:
    """train.csv (9 rows), val.jsonl (6) and test.csv (4), three classes."""
    path.mkdir()
    (path / "train.csv").write_text("text,label\n" + "".join(f"t{i},{'abc'[i % 3]}\n" for i in range(9)))
    if val:
        (path / "val.jsonl").write_text(
            "".join(json.dumps({"text": f"v{i}", "label": "abc"[i % 3]}) + "\n" for i in range(6))
        )
    (path / "test.csv").write_text("text,label\n" + "".join(f"s{i},{'abc'[i % 3]}\n" for i in range(4)))
    return path


def test_text_and_bbc_tasks_train_on_val_by_default_and_select_on_it_when_asked(tmp_path):
    """The default protocol trains on train + val and has no val split; --select-on val trains on train alone and
    keeps val (limited by --max-eval-samples) to select on. BBC's few-shot draw follows --data-seed, not --seed."""

    folder = _text_folder(tmp_path / "text")
    default = load_task(TrainConfig(data=str(folder)))
    assert default.sizes == {"train": 15, "test": 4} and default.val is None
    select = load_task(TrainConfig(data=str(folder), select_on="val", max_eval_samples=3))
    assert select.sizes == {"train": 9, "val": 3, "test": 3}
    with pytest.raises(UserError, match=r"no val\.csv or val\.jsonl"):
        load_task(TrainConfig(data=str(_text_folder(tmp_path / "no_val", val=False)), select_on="val"))
    default = load_task(TrainConfig(data="bbc_news", shots=4))
    assert default.sizes == {"train": 120, "test": 500} and default.val is None
    select = load_task(TrainConfig(data="bbc_news", shots=4, select_on="val", seed=0, data_seed=0))
    assert select.sizes == {"train": 20, "val": 100, "test": 500}
    other_seed = load_task(TrainConfig(data="bbc_news", shots=4, select_on="val", seed=5, data_seed=0))
    assert other_seed.train.texts == select.train.texts


def test_image_tasks_select_on_val_by_holding_it_out_of_training(tmp_path):

    vtab = export_vtab_folder(load_builtin_task("digits"), tmp_path / "vtab")
    for data in ("digits", str(vtab)):  # built in, and the same task as a VTAB-1k folder
        select, default = load_task(TrainConfig(data=data, select_on="val")), load_task(TrainConfig(data=data))
        assert "val" not in default.sizes and select.sizes["train"] + select.sizes["val"] == default.sizes["train"]


def test_an_fgvc_folder_without_val_json_trains_but_cannot_select_on_val(tmp_path):

    for name in ("a/0.png", "a/1.png", "b/2.png"):
        _png(tmp_path / name)
    (tmp_path / "train.json").write_text(json.dumps({"a/0.png": 0, "a/1.png": 1}))
    (tmp_path / "test.json").write_text(json.dumps({"b/2.png": 1}))
    assert load_task(TrainConfig(data=str(tmp_path), data_format="fgvc")).sizes == {"train": 2, "test": 1}
    with pytest.raises(UserError, match=r"val\.json: file not found \(needed by --select-on val\)"):
        load_task(TrainConfig(data=str(tmp_path), data_format="fgvc", select_on="val"))


def test_a_broken_test_image_past_max_eval_samples_is_never_read(tmp_path):

    vtab = export_vtab_folder(load_builtin_task("digits"), tmp_path / "vtab")
    last = (vtab / "test.txt").read_text().split()[-2]  # "path label" lines: the last image listed
    (vtab / last).write_bytes(b"not an image")
    assert load_task(TrainConfig(data=str(vtab), max_eval_samples=10)).sizes["test"] == 10
    with pytest.raises(DataFormatError):
        load_task(TrainConfig(data=str(vtab)))
