"""What the `snell train / eval / merge` end-to-end tests share: a tiny ViT, a small VTAB-format task and the
environment their subprocesses run in."""

from __future__ import annotations

import os

from snell.train.data import ImageTask, load_builtin_task

TINY_VIT = '{"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}'
PNG = b"\x89PNG\r\n\x1a\n"
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def small_task() -> ImageTask:
    """96 training, 32 validation and 64 test images of the committed Fashion-MNIST subset."""
    full = load_builtin_task("fashion_mnist")
    return ImageTask(
        "fashion_small", full.class_names, full.train_images[:96], full.train_labels[:96],
        full.val_images[:32], full.val_labels[:32], full.test_images[:64], full.test_labels[:64],
    )  # fmt: skip
