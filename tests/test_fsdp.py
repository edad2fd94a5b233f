"""`snell train --fsdp`: 2 CPU processes over gloo (torchrun) shard a tiny LLaMA with FSDP2, are interrupted after
epoch 1, resume from that checkpoint and must end exactly where 1 unsharded process ends.

Why exactly: rank r gets the r-th half of each global batch of 16, which 1 process with --batch-size 8
--grad-accum 2 sees as its two micro-batches. That process's gradient is g1/2 + g2/2 (accelerate divides the
loss by 2, an exact power-of-two scaling). FSDP2 reduce-scatters over gloo, which has no average, by dividing
each rank's gradient by 2 and summing: g1/2 + g2/2 again, and a sum of two terms does not depend on their order.
All-gathering fp32 shards copies bits, and AdamW works element by element, so shards update as whole tensors do.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState
from llm_cases import train_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import snell
from snell.cli import main
from snell.io import adapter_state_dict
from snell.train.config import UserError
from snell.train.fsdp import shard

STOP_AFTER_FIRST_CHECKPOINT = """
import json
import sys
from torch.distributed.fsdp import FSDPModule
from snell.cli import main
from snell.train.causal_lm.run import CausalLMRun

save = CausalLMRun._save_checkpoint


def save_then_stop(self, *args):
    save(self, *args)
    groups = sorted(type(m).__name__ for m in self.model.modules() if isinstance(m, FSDPModule))
    (self.out.parent / f"shard_groups_rank{self.accelerator.process_index}.json").write_text(json.dumps(groups))
    raise KeyboardInterrupt


CausalLMRun._save_checkpoint = save_then_stop
sys.exit(main(sys.argv[1:]))
"""


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _optimizer_by_name(state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW state keyed by parameter name: plain state dicts key it by index, full FSDP ones by name already."""
    names = [n for group in state["param_groups"] for n in group["params"]]
    return {str(n): state["state"][n] for n in names if n in state["state"]}


def test_two_sharded_processes_resume_and_match_one_unsharded(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """With SNELLA: its run holds what a SNELL run does (the same layers, with the mixk kernel, sharded per decoder
    layer, and their AdamW state) and the allocator. The allocator keeps its averages as shards of the factors'
    shape and all-gathers them to score and to checkpoint, so its allocations, re-made before epoch 2 from the
    sensitivities of epoch 1 (the resumed half depends on the checkpointed averages), and everything they drive
    must equal the unsharded run's as well. (A SNELL ViT in one shard group: tests/test_cli.py's FSDP case.)"""
    common = train_args(*tiny, tmp_path / "unused")  # 32 examples (train + val): 2 steps an epoch
    at = common.index("-s")  # the allocator, not --sparsity, sets each matrix's sparsity
    common = [*common[:at], *common[at + 2 :], "--select-on", "none", "--method", "snella", "--target-sparsity", "0.5"]
    single = [*common, "--batch-size", "8", "--grad-accum", "2", "--output-dir", str(tmp_path / "one")]
    one = subprocess.Popen(  # beside the sharded run's first half, one thread each
        [sys.executable, "-m", "snell", *single], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )

    script = tmp_path / "stop_after_first_checkpoint.py"
    script.write_text(STOP_AFTER_FIRST_CHECKPOINT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    sharded = [*common, "--fsdp", "--batch-size", "16", "--output-dir", str(tmp_path / "two")]
    assert _run([*torchrun, str(script), *sharded]).returncode != 0  # interrupted after epoch 1
    _, errors = one.communicate(timeout=240)
    assert one.returncode == 0, errors[-3000:]
    assert not (tmp_path / "two" / "summary.json").exists()
    assert [d.name for d in (tmp_path / "two" / "checkpoints").iterdir()] == ["epoch-0001"]
    # one shard group per decoder layer, then the root: a forward gathers one layer's weights at a time
    layers = json.loads((tiny[0] / "config.json").read_text())["num_hidden_layers"]
    groups = sorted(["FSDPLlamaDecoderLayer"] * layers + ["FSDPLlamaForCausalLM"])
    assert [json.loads((tmp_path / f"shard_groups_rank{rank}.json").read_text()) for rank in (0, 1)] == [groups] * 2
    done = _run([*torchrun, "-m", "snell", *sharded, "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout

    one, two = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two"))
    assert (one["num_processes"], two["num_processes"]) == (1, 2) and two["config"]["fsdp"]
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    last = [tmp_path / run / "checkpoints" / "epoch-0002" / "state.pt" for run in ("one", "two")]
    states = [torch.load(path, weights_only=False) for path in last]
    assert states[0]["model"].keys() == states[1]["model"].keys()
    assert all(torch.equal(v, states[1]["model"][k]) for k, v in states[0]["model"].items())  # whole, not shards
    adam = [_optimizer_by_name(s["optimizer"]) for s in states]
    assert len(adam[0]) == len(adam[1]) == len(states[0]["model"])
    for (name, x), y in zip(adam[0].items(), adam[1].values(), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in ("exp_avg", "exp_avg_sq")), name
    assert states[0]["allocator"].keys() == states[1]["allocator"].keys()
    for kind in ("sensitivity", "uncertainty"):  # whole, and equal element by element
        mine, theirs = states[0]["allocator"][kind], states[1]["allocator"][kind]
        assert mine.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in mine.items())
    sparsities = [[m["sparsity"] for m in _metrics(tmp_path / run)] for run in ("one", "two")]
    assert sparsities[0] == sparsities[1] and sparsities[0][1]["min"] != sparsities[0][1]["max"]  # re-allocated
    predictions = [json.loads((tmp_path / run / "test_predictions.json").read_text()) for run in ("one", "two")]
    assert predictions[0] == predictions[1]  # generation in step on both ranks (synced), gathered in file order

    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the adapter names LlamaForCausalLM as its base, not FSDP's wrapper class
        snell.load_adapter(model, tmp_path / "two" / "adapter")  # a sharded run's adapter loads into a whole model
    loaded = adapter_state_dict(model)
    assert loaded.keys() == a.keys() and all(torch.equal(loaded[k], a[k]) for k in a)


def test_evaluation_then_checkpoint_with_trainable_root_parameters(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Full fine-tuning trains the root's shard group (tied embeddings and head, final norm) too. An evaluation
    (no backward) leaves that group whole; the epoch's checkpoint must still find every parameter's optimizer
    state, and the saved weights must be whole, the tied pair stored once."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [*train_args(*tiny, tmp_path / "full", "--method", "full", "--fsdp", "--batch-size", "16"), "--epochs", "1"]
    done = _run([*torchrun, "-m", "snell", *args])
    assert done.returncode == 0, done.stderr[-3000:]
    saved = load_file(str(tmp_path / "full" / "adapter" / "model_state.safetensors"))
    base = dict(AutoModelForCausalLM.from_pretrained(tiny[0]).named_parameters())  # the tied head once
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in base.items()}
    assert not torch.equal(saved["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    state = torch.load(tmp_path / "full" / "checkpoints" / "epoch-0001" / "state.pt", weights_only=False)
    assert len(state["optimizer"]["state"]) == len(base)


def test_sharded_full_fine_tuning_trains_the_head_as_one_process_does(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """The chunked loss runs the (tied) head after the root's forward, on the weights FSDP keeps gathered until
    backward ends: its gradient must still be reduced over the processes, as one process accumulating both
    halves computes it."""
    common = [*train_args(*tiny, tmp_path / "unused"), "--method", "full", "--select-on", "none", "--epochs", "1"]
    single = [*common, "--batch-size", "8", "--grad-accum", "2", "--output-dir", str(tmp_path / "one")]
    assert (done := _run([sys.executable, "-m", "snell", *single])).returncode == 0, done.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    sharded = [*common, "--fsdp", "--batch-size", "16", "--output-dir", str(tmp_path / "two")]
    assert (done := _run([*torchrun, "-m", "snell", *sharded])).returncode == 0, done.stderr[-3000:]
    one, two = (load_file(str(tmp_path / run / "adapter" / "model_state.safetensors")) for run in ("one", "two"))
    base = AutoModelForCausalLM.from_pretrained(tiny[0]).state_dict()
    assert not torch.equal(one["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_fsdp_is_refused_where_it_cannot_work(
    tiny: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    try:
        assert main([*train_args(*tiny, tmp_path / "one"), "--fsdp"]) == 2  # nothing to shard over
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's state is global to this process
    assert "launch with torchrun or accelerate launch" in capsys.readouterr().err
    assert main([*train_args(*tiny, tmp_path / "merge"), "--fsdp", "--merge"]) == 2
    assert "snell merge RUN_DIR" in capsys.readouterr().err


@pytest.fixture
def one_process_group() -> Iterator[None]:
    """An in-process gloo group of world size 1, standing in for `torchrun --nproc_per_node 1`'s."""
    with socket.socket() as free:  # a port no other test's group holds
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_process_group")
def test_a_process_group_of_one_process_is_refused_by_shard() -> None:
    """`torchrun --nproc_per_node 1 ... --fsdp` initialises a group of world size 1: nothing to shard over, so refused
    as an uninitialised process is."""
    with pytest.raises(UserError, match="--fsdp shards over several processes: launch with torchrun"):
        shard(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.device("cpu"))


@pytest.mark.usefixtures("one_process_group", "one_thread")
def test_a_model_sharded_at_its_root_only_gets_its_gradients_into_its_shards(tiny: tuple[Path, Path]) -> None:
    """A causal LM without ``_no_split_modules`` is sharded as one group. FSDP2 ends that group's backward (reshard,
    reduce-scatter into the shards' gradients) from hooks on the root forward's outputs, which the chunked loss
    leaves out of its graph: the optimizer's parameters, the shards, got no gradient and nothing trained. One
    process's shards are whole tensors, so their gradients are an unsharded model's full-logits gradients: the
    same fp32 operations, though on gathered copies at other addresses, where a BLAS may block a sum otherwise
    (a few ulps, far inside 1e-4 of the tensor's largest entry). The bug left no gradient at all."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from snell.train.causal_lm.loss import chunked_response_loss, response_loss

    def adapted() -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32)
        config = snell.SnellConfig(r=4, sparsity=0.5, target_modules=r".*\.(q_proj|down_proj)")
        model = snell.get_snell_model(model, config).train()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # factors that give ΔW entries to keep, the same in both models
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        return model

    ids = torch.randint(4, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs, labels = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone()
    whole, sharded = adapted(), fully_shard(adapted())
    for sums, _, counts in (
        response_loss(whole(**inputs).logits, labels),
        chunked_response_loss(sharded, inputs, labels),
    ):
        (sums.sum() / counts.sum()).backward()
    expected = {name: p.grad for name, p in whole.named_parameters() if p.requires_grad}
    got = {name: p for name, p in sharded.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys() and len(got) == 8
    for name, param in got.items():
        assert isinstance(param, DTensor) and isinstance(param.grad, DTensor), name  # resharded after backward
        scale = float(expected[name].abs().max())
        assert scale > 0, name
        torch.testing.assert_close(param.grad.full_tensor(), expected[name], rtol=0, atol=1e-4 * scale)


@pytest.mark.usefixtures("one_process_group")
def test_saving_a_sharded_model_names_the_shard_and_unsharded_saves_it(tmp_path: Path) -> None:
    """save_adapter on a sharded model failed inside safetensors ("invalid python storage"); it now names the
    shard before writing anything, and the harness's way, inside ``unsharded``, writes the whole tensors."""
    from torch.distributed.fsdp import fully_shard

    from snell.train.fsdp import unsharded

    torch.manual_seed(0)
    model = snell.get_snell_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8)), snell.SnellConfig(r=4, sparsity=0.5, target_modules=["0"])
    )
    expected = {key: value.clone() for key, value in adapter_state_dict(model).items()}
    fully_shard(model)
    with pytest.raises(ValueError, match=r"'0\.snell_A' is a shard of an FSDP-sharded model \(a DTensor\)"):
        snell.save_adapter(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with unsharded(model):
        snell.save_adapter(model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[key], expected[key]) for key in saved)
