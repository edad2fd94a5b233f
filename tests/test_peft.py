"""SNELL through peft (SnellPeftConfig), transformers' Trainer (SnellTrainer) and TRL, on tiny random models.

The shared checks follow peft's tests/test_custom_models.py: each case is (name, toy model, config kwargs) and
every check runs on every case. Comparisons are exact where both sides run the same arithmetic on the same
inputs in this process (a reloaded adapter, a disabled adapter against the base model); elsewhere each
tolerance is argued from the maths next to it. SNELL's ΔW is not zero at init, and its top-k threshold turns
last-bit differences into different survivors, so nothing here compares independently computed runs bit for bit.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import snell

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from snell.integrations.peft import SnellPeftConfig, SnellPeftLayer, check_peft_version  # noqa: E402
from snell.io import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402

VOCAB = 40


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 24)
        self.lin1 = nn.Linear(24, 24, bias=False)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=24, n_layer=1, n_head=2, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, num_labels=3
    )
    return transformers.BertForSequenceClassification(config)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2
    )
    return transformers.LlamaForCausalLM(config)


def _tokens(batch: int = 2) -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (batch, 6), generator=torch.Generator().manual_seed(1))}


# (name, toy model, its inputs, SnellPeftConfig kwargs). r and sparsity are small so that every layer keeps
# enough survivors for the updates to be visible at these sizes.
CASES = [
    ("mlp", MLP, lambda: {"x": torch.randn(4, 12)}, dict(target_modules=["lin0", "lin1"], modules_to_save=["head"])),
    ("mlp-dropout", MLP, lambda: {"x": torch.randn(4, 12)}, dict(target_modules=["lin0"], dropout=0.1, drop_path=0.1)),
    ("conv2d", ConvNet, lambda: {"x": torch.randn(2, 3, 6, 6)}, dict(target_modules=["conv"])),
    ("gpt2-conv1d", _gpt2, _tokens, dict(target_modules=["c_attn", "c_proj"])),
    ("bert", _bert, _tokens, dict(task_type="SEQ_CLS")),  # preset targets; the classifier joins modules_to_save
    ("llama", _llama, _tokens, dict(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")),
]
IDS = [case[0] for case in CASES]


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _build(case, seed: int = 0):
    """A base model, an identical copy (the 'fresh base' to reload onto), the inputs, and the config."""
    _, factory, make_inputs, kwargs = case
    torch.manual_seed(seed)
    base = factory().eval()
    inputs = make_inputs()
    config = SnellPeftConfig(r=4, sparsity=0.5, **kwargs)
    return base, copy.deepcopy(base), inputs, config


def _train(model: nn.Module, inputs: dict, steps: int = 3) -> None:
    """A few Adam steps on the mean square of the outputs. Adam, because its steps are about lr whatever the
    gradient's size: at init ΔWˢ = ΔW·|ΔW| is ~1e-6, so the factors' gradients through attention scores are
    tiny, and an SGD step would vanish in their float32 rounding."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        _output(model, inputs).float().pow(2).mean().backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_save_and_reload_on_a_fresh_base_gives_identical_outputs(case, tmp_path):
    base, fresh, inputs, config = _build(case)
    model = peft.get_peft_model(base, config)
    _train(model, inputs)
    with torch.no_grad():
        trained = _output(model, inputs)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "SNELL" and "peft_version" in saved

    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        again = _output(reloaded, inputs)
    # Same factors, same base weights, same inputs, same process: the same arithmetic, so exactly equal.
    torch.testing.assert_close(again, trained, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_only_adapter_parameters_and_modules_to_save_are_updated(case):
    base, _, inputs, config = _build(case)
    model = peft.get_peft_model(base, config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _train(model, inputs)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    adapter = {name for name in before if ".snell_A." in name or ".snell_B." in name}
    saved_modules = {name for name in before if ".modules_to_save." in name}
    assert adapter and adapter <= changed
    assert changed <= adapter | saved_modules  # the frozen base and the fixed kernel coefficients never move
    if config.modules_to_save:
        assert saved_modules and saved_modules <= changed


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_disable_adapter_gives_the_base_model_and_init_is_close_to_it(case):
    base, fresh, inputs, config = _build(case)
    with torch.no_grad():
        expected = _output(fresh, inputs)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        at_init = _output(model, inputs)
        with model.disable_adapter():
            disabled = _output(model, inputs)
    # The wrapped layers run their base layer's own forward: the same arithmetic as the base model.
    torch.testing.assert_close(disabled, expected, rtol=0, atol=0)
    # ΔW at init is not zero: A ~ U(±1/√(n·r/P)), B ~ U(±1/√(m·r/P)) and the piecewise kernel scales each piece
    # by 0.1, so |ΔW| ≲ 0.1·r/P·(1/√(n·r/P))·(1/√(m·r/P)) ≈ 0.1/24 ≈ 4e-3 per entry at these sizes, against base
    # weights of order 1/√24 ≈ 0.2: a relative change of a few percent at most, through a layer or two.
    torch.testing.assert_close(at_init, expected, rtol=0.1, atol=0.05)
    assert not torch.equal(at_init, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_and_unload_matches_the_unmerged_model(case, dtype):
    base, _, inputs, config = _build(case)
    model = peft.get_peft_model(base.to(dtype), config)
    if "x" in inputs:
        inputs = {"x": inputs["x"].to(dtype)}
    # A visible ΔWˢ without training (Adam's state would underflow in fp16): B × 100 makes ΔW 100 times larger
    # and the reference sparsifier's ΔW·|ΔW| 10⁴ times, from ~1e-6 to ~1e-2 per entry, well above bf16's
    # rounding of the outputs even in BERT (weights ~N(0, 0.02)).
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SnellPeftLayer):
                module.snell_B["default"].mul_(100)
    with torch.no_grad():
        unmerged = _output(model, inputs).float()
        with model.disable_adapter():
            without = _output(model, inputs).float()
        merged_model = model.merge_and_unload()
        assert not any(isinstance(m, SnellPeftLayer) for m in merged_model.modules())
        merged = _output(merged_model, inputs).float()
    # Unmerged, the layer adds ΔWˢ to W0 in float32 and rounds W0 + ΔWˢ to the model dtype once; merged, ΔWˢ is
    # rounded to the model dtype and then added to W0 in it: each weight differs by up to one rounding, a
    # relative 2^-24 (fp32), 2^-11 (fp16) or 2^-8 (bf16). A layer's output sums n = 24 such products with
    # independent signs, ~√24 ≈ 5 roundings of the output scale, and every later layer rounds its own
    # (now slightly different) activations again, amplified by LayerNorm and softmax in the transformers:
    # 32 roundings of the largest output covers two to three such layers.
    scale = unmerged.abs().max().item()
    eps = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
    tolerance = 32 * eps * scale + 1e-6
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=tolerance)
    assert (unmerged - without).abs().max() > tolerance  # a merge that dropped ΔWˢ would fail


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_under_autocast_runs_in_the_autocast_dtype(case):
    base, _, inputs, config = _build(case)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        full = _output(model, inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = _output(model, inputs)
    # Under autocast the adapted layers compute in bf16 like the plain ones (ΔW itself in float32): the
    # output carries bf16's relative 2^-8 rounding from every matmul input, a few roundings deep.
    scale = full.abs().max().item()
    torch.testing.assert_close(low.float(), full, rtol=0, atol=0.05 * scale + 1e-3)


def test_peft_layer_computes_what_the_core_computes():
    """One implementation of the method: the same factors give the same outputs in peft and in the core."""
    torch.manual_seed(0)
    base = MLP().eval()
    core = snell.get_snell_model(copy.deepcopy(base), snell.SnellConfig(r=4, sparsity=0.5, target_modules=["lin0"]))
    model = peft.get_peft_model(base, SnellPeftConfig(r=4, sparsity=0.5, target_modules=["lin0"]))
    layer = model.base_model.model.lin0
    with torch.no_grad():
        layer.snell_A["default"].copy_(core.lin0.snell_A)
        layer.snell_B["default"].copy_(core.lin0.snell_B)
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), core(x), rtol=0, atol=0)
        torch.testing.assert_close(layer.delta_weight("default"), core.lin0.delta_weight(), rtol=0, atol=0)


def test_sequence_classification_trains_and_saves_the_new_head(tmp_path):
    base, _, _, config = _build(dict(zip(IDS, CASES, strict=True))["bert"])
    model = peft.get_peft_model(base, config)
    # Adapted in eval mode (_build's base), the wrapper layers are in eval mode too: no adapter dropout.
    assert not any(m.training for m in model.modules() if isinstance(m, SnellPeftLayer))
    assert "classifier" in model.peft_config["default"].modules_to_save
    assert all(p.requires_grad for p in model.base_model.model.classifier.modules_to_save.parameters())
    model.print_trainable_parameters()
    trainable, _ = model.get_nb_trainable_parameters()
    factors = sum(p.numel() for n, p in model.named_parameters() if ".snell_A." in n or ".snell_B." in n)
    head = sum(p.numel() for p in model.base_model.model.classifier.modules_to_save.parameters())
    assert trainable == factors + head  # the fixed kernel coefficients are not counted: they do not train
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        assert "base_model.model.classifier.weight" in set(f.keys())


def test_snell_is_registered_in_peft_lookup_tables_because_register_peft_method_refuses_it():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from snell.integrations.peft import SnellPeftModel

    assert PEFT_TYPE_TO_CONFIG_MAPPING["SNELL"] is SnellPeftConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SNELL"] is SnellPeftModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["SNELL"] == "snell_"
    # The public route takes only names of peft's own PeftType enum. If this starts to pass, switch to it.
    with pytest.raises(ValueError, match="Unknown PEFT type"):
        register_peft_method(name="snell", config_cls=SnellPeftConfig, model_cls=SnellPeftModel)


def test_config_is_validated_by_snell_and_the_version_pin_is_checked():
    with pytest.raises(ValueError, match="sparsity must be in"):
        SnellPeftConfig(sparsity=1.5)
    with pytest.raises(ValueError, match="r must be divisible by num_pieces"):
        SnellPeftConfig(r=3)
    check_peft_version("0.21.2")
    with pytest.raises(ImportError, match=r"supports peft>=0\.21\.2,<0\.22, but peft 0\.20\.0 is installed"):
        check_peft_version("0.20.0")
    with pytest.raises(ImportError, match="pip install"):
        check_peft_version("0.22.0")


def test_adapter_folders_say_what_they_are(tmp_path):
    torch.manual_seed(0)
    native, peft_snell, peft_lora = tmp_path / "native", tmp_path / "peft_snell", tmp_path / "peft_lora"
    snell.save_adapter(snell.get_snell_model(MLP(), snell.SnellConfig(r=4, target_modules=["lin0"])), native)
    assert json.loads((native / CONFIG_NAME).read_text())["peft_type"] == "SNELL"
    peft.get_peft_model(MLP(), SnellPeftConfig(r=4, target_modules=["lin0"])).save_pretrained(peft_snell)
    peft.get_peft_model(MLP(), peft.LoraConfig(r=4, target_modules=["lin0"])).save_pretrained(peft_lora)

    with pytest.raises(ValueError, match=r"SNELL adapter saved by snell\.save_adapter.*snell\.load_adapter"):
        peft.PeftModel.from_pretrained(MLP(), native)

    model = MLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"holds a peft LORA adapter, not a SNELL one: load it with peft$"):
        snell.load_adapter(model, peft_lora)
    with pytest.raises(ValueError, match=r"SNELL adapter saved by peft: load it with PeftModel\.from_pretrained"):
        snell.load_adapter(model, peft_snell)
    assert not list(snell.snell_layers(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    # A snell folder saved before the method was named still loads.
    data = json.loads((native / CONFIG_NAME).read_text())
    del data["peft_type"]
    (native / CONFIG_NAME).write_text(json.dumps(data))
    snell.load_adapter(model, native)
    assert [name for name, _ in snell.snell_layers(model)] == ["lin0"]


def test_adapters_switch_one_at_a_time_and_learnable_coefficients_train_and_reload(tmp_path):
    torch.manual_seed(0)
    base = MLP().eval()
    fresh = copy.deepcopy(base)
    x = torch.randn(4, 12)
    config = SnellPeftConfig(r=4, sparsity=0.5, target_modules=["lin0"], learnable_coefficients=True)
    model = peft.get_peft_model(base, config)
    model.add_adapter("other", SnellPeftConfig(r=4, sparsity=0.5, target_modules=["lin0", "lin1"]))
    layer = model.base_model.model.lin0
    coefficients = layer.snell_coefficients
    assert coefficients["default"].requires_grad and not coefficients["other"].requires_grad

    _train(model, {"x": x})
    assert not torch.equal(coefficients["default"], torch.tensor([0.1, -0.1]))
    with torch.no_grad():
        default = model(x)
        model.set_adapter("other")
        assert not coefficients["other"].requires_grad  # fixed coefficients stay fixed when activated
        other = model(x)
        model.set_adapter("default")
        torch.testing.assert_close(model(x), default, rtol=0, atol=0)
    assert not torch.equal(default, other)

    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one adapter per forward"):
        model(x)
    model.base_model.set_adapter("default")

    model.save_pretrained(tmp_path, selected_adapters=["default"])
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), default, rtol=0, atol=0)
        merged = reloaded.merge_and_unload(safe_merge=True)
        # Merged W0 + ΔWˢ is rounded once more than in the fused forward: a few float32 ulps of the output.
        torch.testing.assert_close(merged(x), default, rtol=1e-5, atol=1e-6)


def test_mixk_is_refused_until_peft_layers_carry_its_scalars():
    with pytest.raises(ValueError, match="kernel 'mixk' \\(SNELLA\\) is not available through peft yet"):
        SnellPeftConfig(kernel="mixk", target_modules=["fc"])
