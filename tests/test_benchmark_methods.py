"""The benchmarks' methods are built as their names and labels say: a wrong rank, sparsity, kernel, dropout, set of
adapted layers or trained parameters would be timed and reported under the right label."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ is not an installed package: make the repo root importable wherever pytest runs from.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import snell  # noqa: E402
from benchmarks import methods  # noqa: E402
from benchmarks.reference_snell import ReferenceSnellLinear  # noqa: E402

ADAPTED = {f"blocks.{b}.{layer}" for b in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
"""vit_tiny_test has two blocks: every adapter method adapts these eight layers, the reference-style one too."""


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return methods.METHODS[name].build(methods.MODELS["vit_tiny_test"].create())


def _trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize(
    ("name", "rank", "sparsity", "dropout"),
    [("snell8_s0", 8, 0.0, 0.0), ("snell8_s0.9", 8, 0.9, 0.0), ("snell32_s0.9", 32, 0.9, 0.0),
     ("snell8_s0_dropout", 8, 0.0, 0.1), ("snell8_s0.9_dropout", 8, 0.9, 0.1)],
)  # fmt: skip
def test_each_snell_method_has_the_rank_sparsity_and_dropout_of_its_name(
    name: str, rank: int, sparsity: float, dropout: float
) -> None:
    method = methods.METHODS[name]
    assert method.label.startswith(f"SNELL-{rank} s={sparsity:g}")
    assert ("dropout/drop-path 0.1" in method.label) == bool(dropout)
    model = _build(name)
    layers = dict(snell.snell_layers(model))
    assert layers.keys() == ADAPTED
    for layer_name, layer in layers.items():
        assert layer.snell_A.shape[-1] == rank and layer.snell_spec.sparsity == sparsity
        undropped = dropout and layer_name.endswith("attn.proj")  # as in the reference code
        assert (layer.snell_dropout, layer.snell_drop_path) == (0.0 if undropped else dropout, dropout)
    assert model.get_classifier().out_features == methods.NUM_CLASSES == 100  # a VTAB-sized head
    assert {n for n in _trainable(model) if not n.startswith("blocks.")} == {"head.weight", "head.bias"}


def test_the_reference_style_snell_is_snell8_at_09_with_the_reference_dropouts() -> None:
    model = _build("reference_snell8")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ReferenceSnellLinear)}
    assert layers.keys() == ADAPTED
    for name, layer in layers.items():
        for branch in layer.branches:
            rank = branch.A.shape[0] * branch.A.shape[-1]  # (pieces, rows, r / pieces)
            dropout = 0.0 if name.endswith("attn.proj") else 0.1
            assert (branch.sparsity, rank, branch.dropout.p, branch.drop_path.drop_prob) == (0.9, 8, dropout, 0.1)


def test_head_only_lora_and_dora_train_what_their_labels_say() -> None:
    assert _trainable(_build("head")) == {"head.weight", "head.bias"}
    dora, lora = _trainable(_build("dora8")), _trainable(_build("lora8"))
    assert any("lora_magnitude_vector" in name for name in dora)
    assert not any("lora_magnitude_vector" in name for name in lora)
    adapted = {name.split(".lora_A")[0].removeprefix("base_model.model.") for name in lora if ".lora_A" in name}
    assert adapted == ADAPTED


def test_snella_allocates_the_target_budget_after_the_first_step() -> None:
    """The timed steps run with the end of training's per-layer sparsities: allocated after the first optimizer
    step, so that one step and its hook already give unequal sparsities whose kept volume is the target's. Each
    unit's count is truncated to an integer, so the volume may fall short by less than one entry per unit."""
    method = methods.METHODS["snella8"]
    model = _build("snella8")
    layers = dict(snell.snell_layers(model))
    assert layers.keys() == ADAPTED
    assert all((layer.snell_spec.kernel, layer.snell_spec.sparsity) == ("mixk", 0.01) for layer in layers.values())
    hook = method.step_hook(model)
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    hook()
    sparsities, kept, total = set(), 0.0, 0
    for layer in layers.values():
        spec = layer.snell_spec
        size = layer.weight.numel() // spec.groups
        for group in range(spec.groups):
            sparsities.add(spec.sparsity_of(group))
            kept += (1 - spec.sparsity_of(group)) * size
            total += size
    units = sum(layer.snell_spec.groups for layer in layers.values())
    assert len(sparsities) > 1 and methods.SNELLA_TARGET == 0.8
    assert -1e-9 * total < (1 - methods.SNELLA_TARGET) * total - kept < units  # the first bound: float rounding
