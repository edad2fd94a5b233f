"""What the `snell train / eval / merge` end-to-end tests share: a tiny ViT, a small VTAB-format task and the
environment their subprocesses run in."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import load_file

from snell.cli import main
from snell.train import plots
from snell.train.classification import ClassificationRun
from snell.train.data import ImageTask, load_builtin_task
from snell.train.evaluate import restore

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


def merged_and_adapted(run: Path, out: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`snell merge RUN --output OUT`, then the logits of the merged plain ViT and of the run's adapted model on 8
    test images, and the merged model's state dict."""
    assert main(["merge", str(run), "--output", str(out)]) == 0
    _, task, _, adapted = restore(run)
    images = torch.stack([task.test[i][0] for i in range(8)])
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=10, **json.loads(TINY_VIT))
    plain.load_state_dict(load_file(str(out / "model.safetensors")))
    with torch.no_grad():
        return plain.eval()(images), adapted.eval()(images), plain.state_dict()


def stop_after_first_checkpoint(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`snell ARGS` in this process, interrupted (Ctrl-C, exit 130) right after its first epoch's checkpoint."""
    save = ClassificationRun._save_checkpoint

    def save_then_stop(self: ClassificationRun, *more: object) -> None:
        save(self, *more)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ClassificationRun, "_save_checkpoint", save_then_stop)
        assert main(args) == 130


def script_scores(monkeypatch: pytest.MonkeyPatch, scores: list[float]) -> None:
    """Every evaluation of a classification run scores the next of ``scores``, so a test decides which epoch (and
    which weights) the selection keeps."""
    remaining = iter(scores)

    def eval_metrics(self: ClassificationRun, loader: object, split: str) -> dict[str, float]:
        score = next(remaining)
        return {"score": score, f"{split}_acc": score}

    monkeypatch.setattr(ClassificationRun, "eval_metrics", eval_metrics)


def assert_same_adapter(first: Path, second: Path) -> None:
    """The adapters of two run folders hold the same tensors, bit for bit."""
    a, b = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def drawn(monkeypatch: pytest.MonkeyPatch, plot: Callable, *args: Any) -> Any:
    """The figure ``plot(*args, path)`` would save, kept open so a test can read what it draws (close it after)."""
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=110: figures.append(fig) or path)
    plot(*args, Path("unused.png"))
    (figure,) = figures
    return figure
