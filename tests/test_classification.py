"""The classifier harness's loaders and its accuracy: what training shuffles, what evaluation keeps in order, and
an accuracy that scores the model in eval mode over the whole split, every example once, on any process count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from cli_cases import ENV
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from snell.train.classification import accuracy, make_loader
from snell.train.config import TrainConfig
from snell.train.optim import EpochSampler
from snell.train.precision import make_accelerator
from snell.train.tasks import Task


class _Indices(Dataset):
    """Example i is (a dummy input, i): a loader's labels spell out the order it visits."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(1), index


def test_training_loaders_shuffle_by_seed_and_evaluation_loaders_keep_the_order() -> None:
    data = _Indices()
    task = Task(
        name="t", kind="image", format="vtab", num_classes=32, class_names=list("x" * 32), train=data, test=data
    )
    config = TrainConfig(batch_size=8, eval_batch_size=8, seed=5, num_workers=0)
    order = [
        int(i) for train in (True, False) for _, labels in make_loader(data, task, config, None, train) for i in labels
    ]
    assert order[:32] == list(EpochSampler(32, 5)) != list(range(32))
    assert order[32:] == list(range(32))


def test_accuracy_scores_the_model_in_eval_mode() -> None:
    """Training leaves the model in train mode: with dropout 0.9 there, about nine inputs in ten would be zeroed.
    Behind the dropout, logits = the one-hot input itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.9), nn.Linear(4, 4, bias=False)).train()
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(4))
    loader = DataLoader(TensorDataset(torch.eye(4).repeat(16, 1), torch.arange(4).repeat(16)), batch_size=16)
    assert accuracy(model, loader, make_accelerator(TrainConfig())) == 1.0 and not model.training


_TWO_PROCESSES = """
import sys
from pathlib import Path
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch import nn
from snell.train.classification import accuracy
from snell.train.config import TrainConfig
from snell.train.precision import make_accelerator

accelerator = make_accelerator(TrainConfig())
assert accelerator.num_processes == 2
inputs = torch.eye(4)[[0, 1, 0, 1, 0]]
labels = torch.tensor([0, 1, 0, 0, 1])  # right, right, right, wrong, wrong
loader = accelerator.prepare(DataLoader(TensorDataset(inputs, labels), batch_size=2))
model = nn.Linear(4, 4, bias=False)  # logits = the one-hot input: exact
with torch.no_grad():
    model.weight.copy_(torch.eye(4))
score = accuracy(accelerator.prepare(model), loader, accelerator)
(Path(sys.argv[1]) / f"rank{accelerator.process_index}.txt").write_text(str(score))
accelerator.end_training()  # left to the interpreter's exit, gloo's threads can abort the process (as in loop.py)
"""


def test_accuracy_over_two_processes_counts_every_example_once(tmp_path: Path) -> None:
    """5 examples in batches of 2, split over 2 processes: the last batch's half is padded with a repeat, which the
    gather drops. Every process must report 3/5: not its own share's score, and not one counting the repeat."""
    script = tmp_path / "two_processes.py"
    script.write_text(_TWO_PROCESSES)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*torchrun, str(script), str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["0.6", "0.6"]
