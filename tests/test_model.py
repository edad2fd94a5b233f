import copy
import dataclasses
import math
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
from checks import (
    assert_keeps_top_k,
    check_dropout_is_reproducible,
    check_merge_unmerge_disable_and_unload,
    check_save_load,
    dense_update,
)
from torch import nn

import snell
import snell.presets
from snell.io import adapter_state_dict


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 8, 1)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.pw(torch.relu(self.conv(x))).mean((2, 3))
        return self.head(self.fc2(torch.relu(self.fc1(self.norm(x)))))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.head(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def _tiny_vit(seed=0, depth=12):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, depth=depth)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _assert_unchanged(model, snapshot):
    state, types = snapshot
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def test_vit_preset_splits_qkv_and_keeps_base_keys():
    model = _tiny_vit()
    keys_before = set(model.state_dict())
    names_before = [n for n, _ in model.named_modules()]
    snell.get_snell_model(model, snell.SnellConfig(r=8, modules_to_save=["head"]))
    layers = dict(snell.snell_layers(model))
    assert sorted(layers) == sorted(
        f"blocks.{i}.{m}" for i in range(12) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    )
    qkv = layers["blocks.0.attn.qkv"]
    assert isinstance(qkv, nn.Linear)  # still a Linear: isinstance checks in user code keep working
    assert qkv.A.shape == (3, 192, 8) and qkv.B.shape == (3, 192, 8)
    fc1 = layers["blocks.0.mlp.fc1"]
    assert fc1.A.shape == (192, 8) and fc1.B.shape == (768, 8)
    assert fc1.delta_weight().shape == fc1.weight.shape
    assert [n for n, _ in model.named_modules()] == names_before
    base_keys = {k for k in model.state_dict() if "snell_" not in k}
    assert base_keys == keys_before
    trainable, total = snell.trainable_parameters(model)
    # r·(n + m) per matrix; the split qkv is three 192×192 matrices.
    per_block = 8 * (3 * (192 + 192) + (192 + 192) + (192 + 768) + (768 + 192))
    adapter = 12 * per_block
    assert trainable == adapter + sum(p.numel() for p in model.head.parameters())
    assert total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kernels", ["auto", "fused"])  # the torch path here, and the fused CPU kernels
def test_fused_qkv_is_sparsified_per_matrix(kernels, monkeypatch):
    monkeypatch.setenv("SNELL_KERNELS", kernels)
    model = _tiny_vit()
    snell.get_snell_model(model, snell.SnellConfig(sparsity=0.9, target_modules=["qkv"]))
    qkv = model.blocks[0].attn.qkv
    delta = qkv.delta_weight().reshape(3, 192, 192)
    assert_keeps_top_k(dense_update(qkv), delta != 0, round(0.1 * 192 * 192))


def test_only_adapters_and_modules_to_save_change_during_training():
    model = _tiny_vit()
    snell.get_snell_model(model, snell.SnellConfig(r=8, sparsity=0.5, modules_to_save=["head"]))
    before = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n in before if "snell_" in n or n.startswith("head.")}
    assert changed == expected


def test_parameters_to_save_train_a_bare_parameter_once():
    model = _tiny_vit()
    config = snell.SnellConfig(r=8, modules_to_save=["head"], parameters_to_save=["cls_token", "head.bias"])
    snell.get_snell_model(model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "snell_" in n or n.startswith("head.")} | {
        "cls_token"
    }
    # head.bias is saved with its module, not a second time on its own
    assert set(adapter_state_dict(model)) - {n for n in trainable if "snell_" in n} == {
        "cls_token",
        "head.weight",
        "head.bias",
    }


def test_linear_kernel_at_zero_sparsity_is_exactly_peft_lora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = TinyNet()
    lora_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"], lora_dropout=0.0)
    )
    ours = snell.get_snell_model(
        copy.deepcopy(base), snell.SnellConfig(r=4, kernel="linear", sparsity=0.0, target_modules=["fc1", "fc2"])
    )
    for name, layer in snell.snell_layers(ours):
        lora_layer = lora_model.get_submodule(f"base_model.model.{name}")
        with torch.no_grad():
            lora_layer.lora_A["default"].weight.copy_(layer.A.T)
            lora_layer.lora_B["default"].weight.copy_(layer.B)
    x = torch.randn(5, 3, 6, 6)
    out_lora, out_ours = lora_model(x), ours(x)
    torch.testing.assert_close(out_ours, out_lora, rtol=1e-5, atol=1e-6)
    out_lora.square().sum().backward()
    out_ours.square().sum().backward()
    for name, layer in snell.snell_layers(ours):
        lora_layer = lora_model.get_submodule(f"base_model.model.{name}")
        torch.testing.assert_close(layer.A.grad, lora_layer.lora_A["default"].weight.grad.T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.B.grad, lora_layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


def test_conv_layers_are_adapted_as_matrices():
    torch.manual_seed(0)
    model = TinyNet()
    snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.5, target_modules=["conv", "pw"]))
    assert model.conv.A.shape == (3 * 3 * 3, 4) and model.conv.B.shape == (8, 4)
    assert model.conv.delta_weight().shape == (8, 3, 3, 3)
    x = torch.randn(2, 3, 6, 6)
    out = model(x)
    out.sum().backward()
    assert model.conv.A.grad.abs().sum() > 0 and model.pw.B.grad.abs().sum() > 0


def test_merge_unmerge_disable_and_unload_keep_outputs():
    check_merge_unmerge_disable_and_unload()


def test_a_merged_bf16_layer_computes_exactly_what_the_adapted_one_did(monkeypatch):
    """Merging rounds W0 + ΔWˢ once from float32, as the adapted forward does, so the merged bf16 model gives
    the same bits. Rounding ΔWˢ to bf16 first and then the sum moved a weight by an ulp wherever the sum fell
    next to a rounding midpoint (about |ΔWˢ|·2⁻⁹ / ulp(W0) of the weights: here, with ΔW ~ 1e-2, a few %)."""
    monkeypatch.setenv("SNELL_KERNELS", "torch")  # the path merging uses; a fused path builds ΔW in its own order
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 64)).to(torch.bfloat16)
    snell.get_snell_model(model, snell.SnellConfig(r=8, sparsity=0.5, target_modules=["0"]))
    with torch.no_grad():
        model[0].B.mul_(100)  # ΔW·|ΔW| from ~1e-6 to ~1e-2: near W0's ulps, where double rounding shows
    x = torch.randn(16, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        adapted = model.eval()(x)
        merged = snell.merge_and_unload(model)(x)
    assert torch.equal(merged, adapted)


def test_unmerge_without_merge_is_an_error_and_unload_still_works():
    model = snell.get_snell_model(TinyNet(), snell.SnellConfig(target_modules=["fc1", "fc2"]))
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="not merged into this layer's weight"):
        model.fc1.unmerge()
    with pytest.raises(ValueError, match=r"not merged into the weights of 2 of 2 layers \(e.g. 'fc1'\)"):
        snell.unmerge_adapters(model)
    _assert_unchanged(model, snapshot)
    model.fc2.merge()  # partly merged: refused as a whole, nothing unmerged
    merged_weight = model.fc2.weight.clone()
    with pytest.raises(ValueError, match=r"1 of 2 layers \(e.g. 'fc1'\)"):
        snell.unmerge_adapters(model)
    assert model.fc2.snell_merged and torch.equal(model.fc2.weight, merged_weight)
    plain = TinyNet()
    plain.load_state_dict({k: v for k, v in snapshot[0].items() if "snell_" not in k})
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(snell.unload(model)(x), plain(x))


def test_training_a_merged_model_is_a_clear_error():
    model = snell.get_snell_model(TinyNet(), snell.SnellConfig(target_modules=["fc1"], modules_to_save=["head"]))
    x = torch.randn(2, 3, 6, 6)
    snell.merge_adapters(model)
    with pytest.raises(RuntimeError, match=r"merged into the weights, which is for inference.*unmerge_adapters"):
        model.train()(x)
    with torch.no_grad():
        model(x)  # inference in training mode
    model.eval()(x).sum().backward()  # gradients for the input or the head in eval mode stay possible
    snell.unmerge_adapters(model)
    model.train()(x).sum().backward()
    assert model.fc1.A.grad.abs().sum() > 0


def test_frozen_batchnorm_keeps_its_statistics_and_save_load_reproduces_the_model(tmp_path):
    torch.manual_seed(0)
    base = ConvBN()
    with torch.no_grad():
        base.bn1.running_mean.normal_()  # "pretrained" statistics, far from what the batches give
    model = copy.deepcopy(base)
    config = snell.SnellConfig(sparsity=0.5, r=4, target_modules=["conv1", "conv2"], modules_to_save=["bn2", "head"])
    snell.get_snell_model(model, config)
    bn1_stats = {k: v.clone() for k, v in model.bn1.state_dict().items()}
    bn2_stats = {k: v.clone() for k, v in model.bn2.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    assert not model.bn1.training and model.bn2.training and model.conv1.training
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 6, 6) * 3 + 1).square().mean().backward()
        optimizer.step()
    assert all(torch.equal(model.bn1.state_dict()[k], v) for k, v in bn1_stats.items())
    assert not torch.equal(model.bn2.running_mean, bn2_stats["running_mean"])  # trained with the head, saved
    assert isinstance(model.bn1, nn.BatchNorm2d) and set(model.state_dict()) >= set(base.state_dict())
    snell.save_adapter(model, tmp_path)
    loaded = snell.load_adapter(copy.deepcopy(base), tmp_path)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), atol=0, rtol=0)
    clone = copy.deepcopy(model).train()
    assert not clone.bn1.training
    plain = snell.unload(model.train())
    assert type(plain.bn1) is nn.BatchNorm2d and plain.bn1.training


def test_injection_into_a_timm_batchnorm_model_keeps_running_statistics():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    config = snell.SnellConfig(sparsity=0.5, target_modules=r"layer\d\.\d\.conv\d", modules_to_save=["fc"])
    snell.get_snell_model(model, config)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_save_load_into_a_fresh_model_gives_identical_outputs(tmp_path):
    check_save_load(tmp_path)


def test_learnable_coefficients_train_and_round_trip(tmp_path):
    model = _tiny_vit()
    snell.get_snell_model(model, snell.SnellConfig(learnable_coefficients=True, sparsity=0.5))
    layer = model.blocks[0].mlp.fc1
    assert layer.snell_coefficients.requires_grad
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert layer.snell_coefficients.grad.abs().sum() > 0
    with torch.no_grad():
        layer.snell_coefficients.mul_(3)
    snell.save_adapter(model, tmp_path)
    fresh = _tiny_vit()
    snell.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh.blocks[0].mlp.fc1.snell_coefficients, layer.snell_coefficients)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_weights_get_float32_factors_that_keep_small_updates(dtype, tmp_path):
    model = nn.Sequential(nn.Linear(64, 48)).to(dtype)
    snell.get_snell_model(model, snell.SnellConfig(target_modules=["0"], sparsity=0.5))
    layer = model[0]
    assert layer.weight.dtype == dtype and layer.A.dtype == layer.B.dtype == torch.float32
    x = torch.randn(8, 64, dtype=dtype)
    out = model(x)
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert layer.A.grad.dtype == torch.float32 and layer.weight.grad is None
    # A step of 1e-6 on entries of up to 1/√(64·4) = 0.06 is below half a bf16/fp16 ulp for most of them
    # (2.4e-4 / 1.5e-5 at 0.06): it rounds away in half precision but lands in float32 (ulp 3.7e-9 there).
    step = 1e-6 * layer.A.grad.sign()
    before = layer.A.detach().clone()
    with torch.no_grad():
        layer.snell_A.sub_(step)
    assert (before != layer.A).float().mean() > 0.99
    assert (before.to(dtype) - step.to(dtype) == before.to(dtype)).float().mean() > 0.5
    snell.save_adapter(model, tmp_path)
    fresh = snell.load_adapter(nn.Sequential(nn.Linear(64, 48)).to(dtype), tmp_path)
    assert fresh[0].A.dtype == torch.float32 and torch.equal(fresh[0].A, layer.A)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_backward(dtype):
    model = _tiny_vit()
    snell.get_snell_model(model, snell.SnellConfig(sparsity=0.9, modules_to_save=["head"]))
    with torch.autocast("cpu", dtype=dtype):
        out = model(torch.randn(2, 3, 32, 32))
    assert out.dtype == dtype
    out.float().sum().backward()
    grad = model.blocks[0].attn.qkv.A.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_adapter_dropout_and_drop_path_branch():
    model = _tiny_vit()
    snell.get_snell_model(model, snell.SnellConfig(sparsity=0.5, dropout=0.1, drop_path=0.1))
    x = torch.randn(4, 3, 32, 32)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.allclose(a, b)  # stochastic in training
    a.sum().backward()
    assert model.blocks[0].mlp.fc2.B.grad.abs().sum() > 0
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize("sharing", ["split", "fused"])
def test_drop_path_draws_one_factor_per_sample_and_q_k_v_group(sharing):
    """The reference code adapts q, k and v with three modules, each with its own DropPath: a split fused qkv layer
    draws one factor per sample and group (one for the whole layer with split_fused_qkv=False). With W0 = 0 and
    b = 0 the training output is k·(the eval output) per sample and group, k ∈ {0, 1/(1 − p)}."""
    model = _tiny_vit(depth=1)
    layer = model.blocks[0].attn.qkv
    with torch.no_grad():
        layer.weight.zero_(), layer.bias.zero_()
    config = snell.SnellConfig(r=4, sparsity=0.5, sparsify_mode="mask", drop_path=0.5)
    snell.get_snell_model(model, dataclasses.replace(config, split_fused_qkv=sharing == "split"))
    x = torch.randn(400, 3, layer.in_features)
    with torch.no_grad():
        expected = layer.eval()(x).unflatten(-1, (3, -1))
        torch.manual_seed(0)
        got = layer.train()(x).unflatten(-1, (3, -1))
    dropped = (got == 0).all(dim=(1, 3))  # (sample, group): the whole group's branch is exactly 0
    kept = torch.isclose(got, 2 * expected, rtol=1e-5, atol=1e-9).all(dim=(1, 3))
    assert (dropped ^ kept).all()
    mixed = int((dropped.any(dim=1) & kept.any(dim=1)).sum())  # samples whose groups were not all dropped alike
    # independent draws at p = 1/2: a sample's three groups differ with probability 3/4 (300 of 400, sd 8.7)
    assert 200 < mixed < 400 if sharing == "split" else mixed == 0


def test_undropped_modules_keep_their_adapter_input_whole_as_the_reference_keeps_attn_proj(tmp_path):
    """The reference code drops the adapter input of q, k, v, fc1 and fc2 but not of attn.proj: one dropout for
    every layer could not express its recipes."""
    model = _tiny_vit(depth=1)
    config = snell.SnellConfig(r=4, sparsity=0.5, dropout=0.5, undropped_modules=["proj"])
    snell.get_snell_model(model, config)
    rates = {n.rpartition("blocks.0.")[2]: layer.snell_dropout for n, layer in snell.snell_layers(model)}
    assert rates == {"attn.qkv": 0.5, "attn.proj": 0.0, "mlp.fc1": 0.5, "mlp.fc2": 0.5}
    x = torch.randn(2, 5, model.embed_dim)
    proj, fc1 = model.blocks[0].attn.proj.train(), model.blocks[0].mlp.fc1.train()
    assert torch.equal(proj(x), proj(x)) and not torch.equal(fc1(x), fc1(x))
    snell.save_adapter(model, tmp_path)
    loaded = snell.load_adapter(_tiny_vit(depth=1), tmp_path)
    assert loaded.blocks[0].attn.proj.snell_dropout == 0.0 and loaded.blocks[0].mlp.fc2.snell_dropout == 0.5
    with pytest.raises(ValueError, match=r"undropped_modules \['proj_out'\] match none of the 4 layers adapted"):
        snell.get_snell_model(_tiny_vit(depth=1), dataclasses.replace(config, undropped_modules=["proj_out"]))


def test_dropout_training_step_is_a_function_of_the_seed():
    check_dropout_is_reproducible()


def test_deepcopy_state_dict_and_compile():
    """Equal bit for bit, not close: each copy runs the same aten ops on the same values in the same process, and
    aot_eager runs the traced aten ops eagerly (the compiled threshold zeroes with masked_fill where eager zeroes in
    place: the same comparison with τ). A tolerance would hide a survivor that crossed τ: at s = 0.9 kept entries
    reach 1e-4 here, so one flip moves a layer's outputs by about 1e-4·|x|, as much as a real difference would."""
    model = _tiny_vit(depth=2)
    snell.get_snell_model(model, snell.SnellConfig(sparsity=0.9))
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = model(x)
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), expected)
    assert clone.blocks[0].attn.qkv.A is not model.blocks[0].attn.qkv.A
    other = snell.get_snell_model(_tiny_vit(depth=2), snell.SnellConfig(sparsity=0.9)).eval()
    other.load_state_dict(model.state_dict())
    assert torch.equal(other(x), expected)
    compiled = torch.compile(model, backend="aot_eager")
    assert torch.equal(compiled(x), expected)
    model.train()
    compiled(x).sum().backward()
    assert model.blocks[0].attn.qkv.A.grad is not None


@pytest.mark.parametrize("path", ["torch", "fused_cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_merged_weight_is_bit_for_bit_the_weight_the_forward_multiplies_by(path, dtype, monkeypatch):
    """Merging added ΔWˢ (rounded) to W0, while the torch path's forward builds W0 + ΔW·S with addcmul, whose fused
    multiply-add rounds once: a few merged weights differed in their last bit (a bf16 model's logits by 1e-3)."""
    if path == "fused_cpu":
        pytest.importorskip("numba")
    monkeypatch.setenv("SNELL_KERNELS", {"torch": "torch", "fused_cpu": "fused"}[path])  # the merge's path too
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 192)).to(dtype)
    snell.get_snell_model(model, snell.SnellConfig(r=8, sparsity=0.5, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.snell_B.mul_(30)  # ΔW of the weights' own size, so that every bit of the sum counts
    spec, factors = layer.snell_spec, (layer.snell_A, layer.snell_B, layer.kernel_coefficients())
    with torch.no_grad():
        merged, _ = snell.dispatch.implementation(path).merged_and_tau(spec, *factors, layer.weight, dtype)
    forward_weight = snell.spec.to_weight_layout(spec, merged).to(dtype)
    layer.merge()
    assert torch.equal(layer.weight, forward_weight)


def test_a_compiled_model_is_adapted_as_the_model_it_wraps() -> None:
    """Through torch.compile's wrapper the preset saw a class named OptimizedModule (the block rule then took ResNet's
    downsample convs too) and regexes had to name its ``_orig_mod.`` prefix."""
    config = snell.SnellConfig(r=4)
    plain = snell.get_snell_model(timm.create_model("resnet10t", num_classes=3), config)
    compiled = torch.compile(timm.create_model("resnet10t", num_classes=3))
    assert snell.get_snell_model(compiled, config) is compiled
    inner = compiled._orig_mod
    assert [n for n, _ in snell.snell_layers(inner)] == [n for n, _ in snell.snell_layers(plain)]
    assert inner.snell_config == config
    regex = snell.get_snell_model(
        torch.compile(_tiny_vit(depth=1)), snell.SnellConfig(target_modules=r"blocks\.0\.mlp\.fc1")
    )
    assert [n for n, _ in snell.snell_layers(regex._orig_mod)] == ["blocks.0.mlp.fc1"]


def test_a_model_saved_whole_loads_in_a_process_that_never_injected(tmp_path: Path) -> None:
    """torch.save(model) pickles each adapted module; its class is made by snell at injection, so the file must
    name the parts it is made of, not a class that a fresh process does not have. Also two base classes of one name
    (timm's Linear and torch's), whose adapted classes share their name."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3, zero_init_last=False)
    model.fc = nn.Sequential(OrderedDict(torch_linear=nn.Linear(512, 8), timm_linear=timm.layers.Linear(8, 3)))
    snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.5, target_modules=r".*\.conv[12]|fc\..*_linear"))
    assert {type(model.fc.torch_linear).__name__, type(model.fc.timm_linear).__name__} == {"SnellLinear"}
    x = torch.randn(2, 3, 32, 32)
    torch.save({"model": model, "x": x, "y": model.eval()(x)}, tmp_path / "whole.pt")
    check = (
        "import sys, torch\n"
        "saved = torch.load(sys.argv[1], weights_only=False)\n"
        "model = saved['model'].eval()\n"
        "assert torch.equal(model(saved['x']), saved['y'])\n"
        "model.train()\n"
        "assert not model.layer1[0].bn1.training and model.layer1[0].conv1.training\n"
        "print(type(model.layer1[0].conv1).__name__, type(model.layer1[0].bn1).__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "whole.pt")], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SnellConv2d", "FrozenStatsBatchNorm2d"]


@pytest.mark.parametrize("path", ["fused_cpu", "torch"])
def test_compiled_training_steps_do_not_recompile_as_tau_moves(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused CPU path returns τ as a Python float, and the torch path read τ on the host to zero the entries
    below it; traced by dynamo, every step's new τ compiled again until torch.compile's recompile limit, after which
    it ran eagerly with a warning."""
    if path == "fused_cpu":
        pytest.importorskip("numba")
    monkeypatch.setenv("SNELL_KERNELS", {"fused_cpu": "fused", "torch": "torch"}[path])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    snell.get_snell_model(model, snell.SnellConfig(r=8, sparsity=0.9, target_modules=["0", "2"]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(8, 32)

    def step() -> None:
        compiled(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # compiles
    taus = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            step()
            delta = model[0].delta_weight()
            taus.add(float(delta[delta != 0].abs().min()))  # the smallest kept |ΔW|: τ, or just above it
    assert len(taus) == 3  # τ did move
    torch.testing.assert_close(compiled(x), model(x))


def test_large_llama_mlp_matrix_trains():
    layer = nn.Sequential(nn.Linear(4096, 11008, bias=False))
    snell.get_snell_model(layer, snell.SnellConfig(target_modules=["0"], sparsity=0.9))
    out = layer(torch.randn(2, 4096))
    out.square().sum().backward()
    assert torch.isfinite(layer[0].A.grad).all() and layer[0].B.grad.abs().sum() > 0
    kept = (layer[0].delta_weight() != 0)[None]
    assert_keeps_top_k(dense_update(layer[0]), kept, round(0.1 * 11008 * 4096))


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (snell.SnellConfig(target_modules=["nothing_like_this"]), ValueError, "matches no module"),
        (snell.SnellConfig(target_modules=["fc1", "fc3", "pw"]), ValueError, r"entries \['fc3'\] match no module"),
        (
            snell.SnellConfig(target_modules=["fc1", "fc2"], exclude_modules=["fc2", "conv"]),
            ValueError,
            r"exclude_modules \['conv'\] match none of the 2 modules",
        ),
        (snell.SnellConfig(target_modules=["fc1"], exclude_modules=r"fc\d"), ValueError, "excludes every module"),
        (snell.SnellConfig(target_modules=["norm"]), TypeError, "LayerNorm cannot take a SNELL adapter"),
        (snell.SnellConfig(target_modules=["fc1"], modules_to_save=["nope"]), ValueError, r"\['nope'\] match no"),
        (snell.SnellConfig(target_modules=["fc1"], parameters_to_save=["nope"]), ValueError, r"\['nope'\] match no"),
    ],
)
def test_bad_targets_raise_and_leave_the_model_as_it_was(config, error, message):
    model = TinyNet()
    snapshot = _snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=message):
        snell.get_snell_model(model, config)
    _assert_unchanged(model, snapshot)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_regex_targets_and_exclusions_need_not_match_every_name():
    model = snell.get_snell_model(TinyNet(), snell.SnellConfig(target_modules=r"fc\d|nope", exclude_modules=r"fc2|x"))
    assert [n for n, _ in snell.snell_layers(model)] == ["fc1"]


@pytest.mark.parametrize(
    ("name", "head", "grouped", "kwargs"),
    [
        ("resnet18", "fc", None, {"layers": (1, 1, 1, 1)}),
        ("resnext50_32x4d", "fc", "layer1.0.conv2", {"layers": (1, 1, 1, 1)}),  # a block per stage: faster
        ("regnety_002", "head.fc", "s1.b1.conv2.conv", {}),
    ],
)
def test_cnn_presets_train_including_grouped_convs(name, head, grouped, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    for module in model.modules():  # timm zero-initialises each block's last BatchNorm: no block gradient yet
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    snell.get_snell_model(model, snell.SnellConfig(sparsity=0.0, modules_to_save=[head]))  # dense: faster
    model.train()(torch.randn(2, 3, 32, 32)).square().sum().backward()
    layers = dict(snell.snell_layers(model))
    assert all(layer.A.grad.abs().sum() > 0 and torch.isfinite(layer.A.grad).all() for layer in layers.values())
    if grouped:
        layer = layers[grouped]
        assert layer.groups > 1 and layer.delta_weight().shape == layer.weight.shape
        x = torch.randn(2, layer.in_channels, 8, 8)
        expected = torch.nn.functional.conv2d(
            x,
            layer.weight + layer.delta_weight(),
            layer.bias,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )
        torch.testing.assert_close(layer.eval()(x), expected, rtol=1e-4, atol=1e-5)


def test_injecting_twice_is_refused(tmp_path):
    model = snell.get_snell_model(TinyNet(), snell.SnellConfig(target_modules=["fc1"]))
    snell.save_adapter(model, tmp_path)
    snapshot = _snapshot(model)
    for again in ("fc2", "fc1"):  # fc1 again was refused as "a Linear subclass with its own forward"
        with pytest.raises(ValueError, match="already has SNELL adapters"):
            snell.get_snell_model(model, snell.SnellConfig(target_modules=[again]))
    with pytest.raises(ValueError, match="already has SNELL adapters"):
        snell.load_adapter(model, tmp_path)
    _assert_unchanged(model, snapshot)


def test_preset_detection_for_timm_families():
    def targets(name, **kwargs):
        model = timm.create_model(name, pretrained=False, **kwargs)
        snell.get_snell_model(model, snell.SnellConfig())
        return [n for n, _ in snell.snell_layers(model)]

    convnext = targets("convnext_atto")
    assert convnext and all(n.endswith(("mlp.fc1", "mlp.fc2")) for n in convnext)
    assert sum(n.endswith("mlp.fc1") for n in convnext) == sum(n.endswith("mlp.fc2") for n in convnext)
    effnet = targets("efficientnet_lite0")
    assert "conv_head" in effnet and any(n.endswith("conv_pwl") for n in effnet)
    effnet_model = timm.create_model("efficientnet_lite0")
    assert all(effnet_model.get_submodule(n).kernel_size == (1, 1) for n in effnet)
    # MobileNetV4 (timm's MobileNetV3 class): its universal inverted residuals' pointwise convs, not conv_head alone
    mnv4 = targets("mobilenetv4_conv_small")
    assert sorted({n.rsplit(".", 2)[-2] for n in mnv4 if n.startswith("blocks.")}) == ["pw_exp", "pw_proj"]
    assert len(mnv4) == 25 and "conv_head" in mnv4
    hybrid = targets("mobilenetv4_hybrid_medium")  # and its attention blocks' 1x1 projections
    assert {n.rsplit(".", 2)[-2] for n in hybrid if ".attn." in n} == {"query", "key", "value", "output"}
    resnet = targets("resnet18")
    assert len(resnet) == 16 and "layer1.0.conv2" in resnet and "conv1" not in resnet
    bottlenecks = targets("resnet50", layers=(1, 1, 1, 1))  # 1x1, 3x3 and 1x1: the last one too
    assert len(bottlenecks) == 12 and {"layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3"} <= set(bottlenecks)
    assert not any("downsample" in n for n in resnet)
    regnet = targets("regnetx_002")
    assert "s1.b1.conv2.conv" in regnet and all(n.endswith(("conv1.conv", "conv2.conv", "conv3.conv")) for n in regnet)
    swin = targets("swin_tiny_patch4_window7_224")
    assert "layers.0.blocks.0.attn.qkv" in swin and "layers.0.blocks.0.mlp.fc2" in swin
    with pytest.raises(ValueError, match="no SNELL preset fits model class TinyNet"):
        snell.get_snell_model(TinyNet(), snell.SnellConfig())
    # Presets match whole names: not a dropout named after its layer, not a module inside an adapted layer
    vit = next(p for p in snell.presets.PRESETS if p.name == "timm_vit")
    assert vit.matches("blocks.0.attn.proj") and not vit.matches("blocks.0.attn.proj_drop")


_TINY_BLOCKS = {"depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 3}
_QKV_FROM_ITS_WEIGHT = [  # timm models whose attention reads qkv.weight with q/v biases unless told otherwise
    ("beit_base_patch16_224", {**_TINY_BLOCKS, "img_size": 32}, (2, 3, 32, 32)),
    ("eva02_tiny_patch14_224", {**_TINY_BLOCKS, "img_size": 28}, (2, 3, 28, 28)),
    ("swinv2_tiny_window8_256", {"depths": (1, 1), "num_heads": (2, 2), "embed_dim": 16, "num_classes": 3,
                                 "img_size": 32, "window_size": 4}, (2, 3, 32, 32)),
    ("eva02_base_patch14_224", {**_TINY_BLOCKS, "img_size": 28}, (2, 3, 28, 28)),  # separate q/k/v, SwiGLU
]  # fmt: skip


@pytest.mark.parametrize(("name", "kwargs", "shape"), _QKV_FROM_ITS_WEIGHT, ids=[c[0] for c in _QKV_FROM_ITS_WEIGHT])
@pytest.mark.parametrize("route", ["core", "peft"])
def test_every_layer_the_timm_vit_preset_adapts_acts_and_merges(name, kwargs, shape, route):
    """BEiT, EVA and Swin V2 compute F.linear(x, qkv.weight, q/k/v bias) without calling qkv: an adapter there
    never acted (no gradient; scaling its ΔW changed nothing) and merging it changed the outputs. EVA-02's
    separate q/k/v and SwiGLU fc1_g/fc1_x were left out of the preset."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    for norm in (m for m in model.modules() if isinstance(m, nn.LayerNorm)):
        nn.init.normal_(norm.weight, 1.0, 0.1)  # Swin V2 starts its residual post-norms at 0: no gradient at init
    block = [n for n, m in model.named_modules() if type(m).__name__ in ("Block", "EvaBlock", "SwinTransformerV2Block")]
    linears = [n for n, m in model.get_submodule(block[0]).named_modules() if isinstance(m, nn.Linear)]
    assert {n.rpartition(".")[2] for n in linears} - {"0", "2"} <= {"qkv", "q_proj", "k_proj", "v_proj", "proj",
                                                                      "fc1", "fc1_g", "fc1_x", "fc2"}  # fmt: skip
    x = torch.randn(shape)
    config = dict(r=4, sparsity=0.5, sparsify_mode="mask")
    if route == "peft":
        peft = pytest.importorskip("peft")
        from snell.integrations.peft import SnellPeftConfig, SnellPeftLayer

        model = peft.get_peft_model(model, SnellPeftConfig(**config))
        layers = {n: m for n, m in model.named_modules() if isinstance(m, SnellPeftLayer)}
        factors = {n: m.snell_A["default"] for n, m in layers.items()}
    else:
        snell.get_snell_model(model, snell.SnellConfig(**config))
        layers = dict(snell.snell_layers(model))
        factors = {n: m.snell_A for n, m in layers.items()}
    adapted = {n.rpartition(block[0] + ".")[2] for n in layers if block[0] + "." in n}
    assert adapted == {n for n in linears if "cpb_mlp" not in n}  # every block projection; Swin V2's bias MLP not
    with torch.no_grad():
        before = model(x)
    model(x).sum().backward()
    assert [n for n, a in factors.items() if a.grad is None or not a.grad.any()] == []
    merged = (model.merge_and_unload() if route == "peft" else snell.merge_and_unload(model))(x)
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-5)  # fp32 rounding of W0 + ΔW against two GEMMs


@pytest.mark.parametrize("route", ["core", "peft"])
@pytest.mark.parametrize("merge", [False, True], ids=["unload", "merge_and_unload"])
def test_removing_the_adapters_turns_timms_qkv_switch_back(route: str, merge: bool) -> None:
    """Injection sets BEiT's qkv_bias_separate (see above); removing the adapters turns it back, so an unloaded model
    runs the untouched model's code: one F.linear with the bias, the same bits."""
    name, kwargs, shape = _QKV_FROM_ITS_WEIGHT[0]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        untouched = model(x)
    config = dict(r=4, sparsity=0.5)
    if route == "peft":
        peft = pytest.importorskip("peft")
        from snell.integrations.peft import SnellPeftConfig

        wrapped = peft.get_peft_model(model, SnellPeftConfig(**config))
        plain = wrapped.merge_and_unload() if merge else wrapped.unload()
    else:
        snell.get_snell_model(model, snell.SnellConfig(**config))
        plain = snell.merge_and_unload(model) if merge else snell.unload(model)
    attention = [m for m in plain.modules() if hasattr(m, "qkv_bias_separate")]
    assert attention and not any(m.qkv_bias_separate for m in attention)
    if not merge:
        with torch.no_grad():
            assert torch.equal(plain(x), untouched)


@pytest.mark.parametrize(("name", "heads"), [("vit_tiny_patch16_224", {"head"}), ("convnext_atto", {"head.fc"}),
                                             ("resnet18", {"fc"}), ("efficientnet_b0", {"classifier"}),
                                             ("deit_tiny_distilled_patch16_224", {"head", "head_dist"})])  # fmt: skip
def test_image_cls_task_type_trains_and_saves_the_timm_heads(name, heads):
    """Both heads of a distilled model: in eval mode it averages their outputs, and a head_dist left frozen (random,
    for a new number of classes) was half of every prediction."""
    model = timm.create_model(name, pretrained=False, num_classes=3)
    snell.get_snell_model(model, snell.SnellConfig(r=4, task_type="IMAGE_CLS"))
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad and "snell_" not in n}
    assert trainable == heads
    assert {key.rsplit(".", 1)[0] for key in adapter_state_dict(model) if "snell_" not in key} == heads


def test_seq_cls_trains_every_module_a_transformers_classifier_adds_to_its_base_model():
    """DeBERTa's classifier reads a pooler that its base checkpoints do not hold (newly initialised, as the "not
    initialized from the model checkpoint" notice says): with the classifier alone trained, it stayed random."""
    transformers = pytest.importorskip("transformers")
    small = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    cases = [
        (transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(hidden_size=32, **small)),
         {"pooler.dense", "classifier"}),
        (transformers.BertForSequenceClassification(transformers.BertConfig(hidden_size=32, **small)), {"classifier"}),
        (transformers.XLMForSequenceClassification(transformers.XLMConfig(emb_dim=32, n_layers=1, n_heads=2,
                                                                          vocab_size=100)),
         {"sequence_summary.summary"}),
    ]  # fmt: skip
    for model, heads in cases:
        snell.get_snell_model(model, snell.SnellConfig(r=2, task_type="SEQ_CLS"))
        trained = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad and "snell_" not in n}
        assert trained == heads, type(model).__name__


def test_a_classification_task_type_without_a_head_says_to_name_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"cannot find the classification head of Sequential.*modules_to_save"):
        snell.get_snell_model(model, snell.SnellConfig(target_modules=["0"], task_type="SEQ_CLS"))
    assert not list(snell.snell_layers(model))


def test_a_classification_task_type_takes_the_head_named_in_modules_to_save(tmp_path):
    """Naming the head, as the error above asks, is enough: the lookup's failure no longer refuses a model whose
    head it cannot find by name, in get_snell_model and in load_adapter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    config = snell.SnellConfig(target_modules=["0"], task_type="SEQ_CLS", modules_to_save=["1"])
    snell.get_snell_model(model, config)
    assert [n for n, p in model.named_parameters() if p.requires_grad and "snell_" not in n] == ["1.weight", "1.bias"]
    with torch.no_grad():
        model[1].weight.add_(0.5)
    snell.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = snell.load_adapter(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), tmp_path)
    assert torch.equal(fresh[1].weight, model[1].weight)


class PaddedConv(nn.Conv2d):
    """A Conv2d whose own forward pads first, as timm's Conv2dSame does: SNELL would drop the padding."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.encoder(self.attn(x, x, x)[0]))


@pytest.mark.parametrize(
    ("build", "target", "message"),
    [
        (lambda: nn.Sequential(PaddedConv(3, 4, 3)), "0", "PaddedConv.forward does more than Conv2d's"),
        (lambda: nn.Sequential(timm.layers.Conv2dSame(3, 4, 3, 2)), "0", "Conv2dSame.forward"),
        (lambda: nn.Sequential(timm.layers.StdConv2d(3, 4, 3)), "0", "StdConv2d.forward"),
        (Attention, "attn.out_proj", "belongs to a MultiheadAttention"),
        (Attention, "encoder.linear1", "belongs to a TransformerEncoderLayer"),
    ],
)
def test_layers_whose_forward_snell_would_replace_or_never_see_are_refused(build, target, message):
    """An adapter there would silently do the wrong thing: drop the subclass's own forward (padding, weight
    standardisation), or never act because the parent reads the weight itself (MultiheadAttention's out_proj, the
    encoder layer's inference fast path)."""
    model = build()
    snapshot = _snapshot(model)
    with pytest.raises(TypeError, match=message):
        snell.get_snell_model(model, snell.SnellConfig(r=2, target_modules=[target]))
    _assert_unchanged(model, snapshot)


def test_a_linear_subclass_whose_forward_is_plain_is_adapted():
    """timm's Linear only casts under TorchScript: it computes what nn.Linear does, so it is accepted."""
    torch.manual_seed(0)
    model = nn.Sequential(timm.layers.Linear(8, 8))
    snell.get_snell_model(model, snell.SnellConfig(r=2, sparsity=0.5, target_modules=["0"]))
    x = torch.randn(3, 8)
    expected = nn.functional.linear(x, model[0].weight + model[0].delta_weight(), model[0].bias)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("kind", ["parametrization", "hook"])
def test_merging_into_a_weight_computed_on_every_forward_is_refused(kind):
    """weight_norm recomputes the weight from g and v before each forward: ΔW added to it vanished, and the merge
    reported success with the adapter lost."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    if kind == "parametrization":
        nn.utils.parametrizations.weight_norm(layer)
    else:
        with pytest.warns(FutureWarning):
            nn.utils.weight_norm(layer)
    model = nn.Sequential(OrderedDict(normed=layer, plain=nn.Linear(8, 8)))
    snell.get_snell_model(model, snell.SnellConfig(r=2, sparsity=0.5, target_modules=["normed", "plain"]))
    x = torch.randn(3, 8)
    adapted = model(x)
    snapshot = _snapshot(model)
    for merge in (snell.merge_adapters, snell.merge_and_unload):
        with pytest.raises(ValueError, match="the weight of normed is computed from other tensors on every forward"):
            merge(model)
        _assert_unchanged(model, snapshot)
    torch.testing.assert_close(model(x), adapted, atol=0, rtol=0)


def test_batchnorm_parameters_to_save_train_on_frozen_statistics_and_reload_exactly(tmp_path):
    """The adapter saves bn1's weight and bias, not its running statistics: training them must not move those."""
    torch.manual_seed(0)
    base = ConvBN()
    model = copy.deepcopy(base)
    config = snell.SnellConfig(
        r=4,
        sparsity=0.5,
        target_modules=["conv2"],
        parameters_to_save=["bn1.weight", "bn1.bias"],
        modules_to_save=["head"],
    )
    snell.get_snell_model(model, config)
    stats = {k: v.clone() for k, v in model.bn1.named_buffers()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 6, 6) * 3 + 1).square().mean().backward()
        optimizer.step()
    assert not torch.equal(model.bn1.weight, base.bn1.weight)
    assert all(torch.equal(v, stats[k]) for k, v in model.bn1.named_buffers())
    snell.save_adapter(model, tmp_path)
    loaded = snell.load_adapter(copy.deepcopy(base), tmp_path)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), atol=0, rtol=0)


def test_an_adapted_conv_takes_an_unbatched_image_as_nn_conv2d_does():
    torch.manual_seed(0)
    model = snell.get_snell_model(TinyNet(), snell.SnellConfig(r=4, sparsity=0.5, target_modules=["conv"]))
    image = torch.randn(3, 6, 6)
    unbatched = model.conv(image)
    unbatched.square().sum().backward()
    grads = model.conv.snell_A.grad.clone(), model.conv.snell_B.grad.clone()
    model.zero_grad()
    batched = model.conv(image[None])
    batched.square().sum().backward()
    assert unbatched.shape == (8, 6, 6)
    torch.testing.assert_close(unbatched, batched[0], atol=0, rtol=0)
    torch.testing.assert_close(grads, (model.conv.snell_A.grad, model.conv.snell_B.grad), atol=0, rtol=0)


def test_a_compiled_model_finds_its_classification_head():
    model = torch.compile(_tiny_vit(depth=1))
    snell.get_snell_model(model, snell.SnellConfig(r=2, task_type="IMAGE_CLS"))
    assert model._orig_mod.head.weight.requires_grad and not model._orig_mod.patch_embed.proj.weight.requires_grad


# --------------------------------------------------------------------------------------------------------
# Promises that no test held before a mutation audit (each test fails with the matching mutant of the code)


def _two_linears() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def test_an_injection_interrupted_half_way_leaves_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second layer's attach is interrupted (Ctrl-C, out of memory on a large model): the first layer's adapter
    comes off again and every parameter gets its requires_grad back."""
    model = _two_linears()
    snapshot = _snapshot(model)
    real_attach, calls = snell.model.attach, []

    def attach(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_attach(*args, **kwargs)

    monkeypatch.setattr(snell.model, "attach", attach)
    with pytest.raises(KeyboardInterrupt):
        snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.5, target_modules=["0", "2"]))
    _assert_unchanged(model, snapshot)
    assert all(p.requires_grad for p in model.parameters())


def test_a_nested_disable_block_leaves_the_outer_one_disabled() -> None:
    model = _two_linears()
    x = torch.randn(3, 8)
    with torch.no_grad():
        plain = model(x)
        snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.5, target_modules=["0", "2"]))
        with snell.disable_adapters(model):
            with snell.disable_adapters(model):
                pass
            assert torch.equal(model(x), plain)
        assert not torch.equal(model(x), plain)


def test_unloading_a_model_in_eval_mode_keeps_its_batchnorm_in_eval_mode() -> None:
    model = snell.get_snell_model(ConvBN(), snell.SnellConfig(r=4, sparsity=0.5, target_modules=["conv1", "conv2"]))
    assert not snell.unload(model.eval()).bn1.training


def test_the_model_keeps_its_own_copy_of_the_config() -> None:
    """A caller that reuses its config for another model must not change what this one records (and saves)."""
    config = snell.SnellConfig(r=4, sparsity=0.5, target_modules=["0", "2"])
    model = snell.get_snell_model(_two_linears(), config)
    config.sparsity = 0.9
    assert model.snell_config.sparsity == 0.5


def test_batchnorm_inside_a_module_to_save_trains_its_running_statistics() -> None:
    """Only normalisation layers outside modules_to_save are held in eval mode: one inside a fully trained, saved
    module updates its statistics, which are saved with it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)))
    snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.5, target_modules="0", modules_to_save=["1"]))
    norm = model[1][1]
    before = norm.running_mean.clone()
    model.train()(torch.randn(2, 3, 10, 10))
    assert norm.training and not torch.equal(before, norm.running_mean)


def test_factors_start_kaiming_uniform_per_piece() -> None:
    """A ~ U(±1/√(n·r/P)) and B ~ U(±1/√(m·r/P)) (snell-method.md §2): 2048 and 1024 draws come within 5% of the
    bound with probability 1 − 0.95^1024."""
    layer = nn.Linear(256, 128)
    snell.get_snell_model(nn.Sequential(layer), snell.SnellConfig(r=8, num_pieces=2, target_modules=["0"]))
    for factor, fan in ((layer.snell_A, 256), (layer.snell_B, 128)):
        bound = 1 / math.sqrt(fan * 8 / 2)
        assert 0.95 * bound < factor.abs().max().item() <= bound
