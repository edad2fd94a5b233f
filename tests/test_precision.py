"""--fp16, the authors' --amp: float16 autocast and a dynamic loss scale on every device (accelerate turns it on for
GPUs only), with SNELLA's allocator reading the unscaled gradients and the scale checkpointed for an exact resume."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from cli_cases import TINY_VIT, assert_same_adapter, stop_after_first_checkpoint

import snell
from snell.cli import main
from snell.train.config import TrainConfig, UserError
from snell.train.precision import make_accelerator

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


ARGS = [
    "--model", "vit_tiny_patch16_224", "--model-kwargs", TINY_VIT, "--rank", "4", "--method", "snella",
    "--target-sparsity", "0.5", "--batch-size", "16", "--lr", "5e-3", "--warmup-epochs", "0.5", "--no-progress",
    "--epochs", "3", "--fp16",
]  # fmt: skip


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"bf16": True, "fp16": True}, "--bf16 and --fp16 are two autocast precisions; give one"),
        ({"fp16": True, "fsdp": True}, "--fp16 cannot be combined with --fsdp"),
    ],
)
def test_precision_options_that_cannot_work_are_refused(values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        TrainConfig(**values)


@pytest.mark.parametrize(("flag", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16), (None, torch.float32)])
def test_the_accelerator_autocasts_to_the_flags_dtype_and_scales_only_fp16(flag: str | None, dtype: torch.dtype):
    accelerator = make_accelerator(TrainConfig(**({flag: True} if flag else {})))
    with accelerator.autocast():
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == dtype
    assert isinstance(accelerator.scaler, torch.amp.GradScaler) == (flag == "fp16")


def test_runs_in_one_process_may_change_precision() -> None:
    """accelerate's state is one per process and refuses a second precision; each snell run starts it afresh (a
    notebook trains in bf16, then in float32, then in fp16)."""
    for flag, dtype in (("bf16", torch.bfloat16), (None, torch.float32), ("fp16", torch.float16)):
        accelerator = make_accelerator(TrainConfig(**({flag: True} if flag else {})))
        with accelerator.autocast():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


def test_fp16_skips_overflowing_steps_and_resumes_bit_identical(
    vtab_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loss scale of 2^24 overflows float16's backward (its largest value is 65504): steps are skipped and the
    scale halves until they fit, and growing it after every good step (growth_interval 1) makes steps overflow all
    along. The allocator reads every step's gradients, skipped or not (non-finite ones count as zero,
    tests/test_allocator.py): its averages must stay finite. A run stopped after epoch 1 resumes with the
    checkpointed scale; restarted at 2^24 it would skip steps that the uninterrupted run took."""
    scales: list[float] = []

    class Overflowing(torch.amp.GradScaler):
        def __init__(self, device: str) -> None:
            super().__init__(device, init_scale=2.0**24, growth_interval=1)

        def update(self, new_scale: float | None = None) -> None:
            super().update(new_scale)
            scales.append(self.get_scale())

    monkeypatch.setattr(torch.amp, "GradScaler", Overflowing)
    args = ["train", "--data", str(vtab_dir), *ARGS, "--adapter-dropout", "0.1"]
    assert main([*args, "--output-dir", str(tmp_path / "straight")]) == 0
    # The first step's head gradient, ~0.06 per logit times features of order 1, is far above 65504 / 2^24 ≈ 0.004:
    # it overflows, the step is skipped and the scale halved. Steps taken later grow it again.
    assert len(scales) == 3 * 8 and scales[0] == 2.0**23
    assert any(later > earlier for earlier, later in itertools.pairwise(scales))
    state = torch.load(next((tmp_path / "straight" / "checkpoints").iterdir()) / "state.pt", weights_only=False)
    assert state["scaler"]["scale"] == scales[-1]  # the checkpoint holds the scale as the last step left it
    averages = [t for key in ("sensitivity", "uncertainty") for t in state["allocator"][key].values()]
    assert averages and all(bool(torch.isfinite(t).all()) for t in averages)

    stop_after_first_checkpoint([*args, "--output-dir", str(tmp_path / "cut")], monkeypatch)
    assert main([*args, "--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    assert_same_adapter(tmp_path / "straight", tmp_path / "cut")


@pytest.mark.parametrize("kernel", ["piecewise_linear", "mixk"])
def test_an_overflowing_fp16_backward_reaches_the_factors_so_the_loss_scaler_skips_the_step(kernel: str) -> None:
    """The torch path (which fp16 always takes) divided the gradient by the piece distances and zeroed every
    non-finite quotient, meant for a zero distance: an inf from the scaled loss became a zero gradient, the scaler
    never saw it, and AdamW stepped. Only the factors train here, as in an LLM with a frozen head."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    snell.get_snell_model(net, snell.SnellConfig(r=4, kernel=kernel, sparsity=0.5, target_modules=["0"]))
    factors = [p for p in net.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in factors]
    optimizer = torch.optim.AdamW(factors, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # beyond fp16's 65504: the backward overflows
    with torch.autocast("cpu", dtype=torch.float16):
        loss = net(torch.randn(8, 32)).float().square().mean()
    scaler.scale(loss).backward()
    assert not all(torch.isfinite(p.grad).all() for p in factors)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**23  # the step was skipped and the scale halved
    assert all(torch.equal(p, q) for p, q in zip(factors, before, strict=True))
