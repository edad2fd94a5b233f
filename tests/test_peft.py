"""SNELL through peft (SnellPeftConfig), transformers' Trainer (SnellTrainer) and TRL, on tiny random models.

The shared checks follow peft's tests/test_custom_models.py: each case is (name, toy model, config kwargs) and
every check runs on every case. Comparisons are exact where both sides run the same arithmetic on the same
inputs in this process (a reloaded adapter, a disabled adapter against the base model); elsewhere each
tolerance is argued from the maths next to it. SNELL's ΔW is not zero at init, and its top-k threshold turns
last-bit differences into different survivors, so nothing here compares independently computed runs bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import json
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import snell
from snell import sparsify

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from bounds import U32  # noqa: E402

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


def _roberta() -> nn.Module:
    config = transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=16, num_labels=3, pad_token_id=1,
    )  # fmt: skip
    return transformers.RobertaForSequenceClassification(config)


def _opt() -> nn.Module:
    config = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=24, ffn_dim=48, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=24,
    )  # fmt: skip
    return transformers.OPTForCausalLM(config)


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
    ("opt", _opt, _tokens, dict(task_type="CAUSAL_LM")),  # no family preset: the block rule's pattern
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
    adapted = [name for name, m in model.base_model.model.named_modules() if isinstance(m, SnellPeftLayer)]
    with torch.no_grad():
        unmerged = _output(model, inputs).float()
        with model.disable_adapter():
            without = _output(model, inputs).float()
        merged_model = model.merge_and_unload()
        assert not any(isinstance(m, SnellPeftLayer) for m in merged_model.modules())
        merged = _output(merged_model, inputs).float()
        shift = (_output(_ulp_probe(merged_model, adapted, dtype), inputs).float() - merged).abs().max().item()
    # The two differ by rounding only, an error of the adapted weights of a few ulps: both round W0 + ΔWˢ once
    # from float32 to the model dtype, but the merged layer runs its own op (Conv1D's addmm, F.linear, conv2d) where
    # the unmerged one runs the fused GEMM on W0 + ΔWˢ, in another summation order, whose error is a backward error
    # of the weights: short dot products (n ≤ 48) with independently rounded partial sums move each by ~√n·u, a
    # couple of ulps. How far an ulp of the weights moves the outputs depends on the model (these random
    # transformers' LayerNorms divide by a small std), so it is measured: `shift` is the output's move when every
    # adapted weight of the merged model moves by at least one ulp in a random direction. Four such moves cover
    # the rounding plus the summation order.
    tolerance = 4 * shift + 1e-7
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=tolerance)
    assert (unmerged - without).abs().max() > tolerance  # a merge that dropped ΔWˢ would fail


def _ulp_probe(model: nn.Module, names: list[str], dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` with each weight of the modules ``names`` times (1 ± 2u), u the unit roundoff of
    ``dtype``, signs drawn at random: 2u·|w| is at least w's ulp, so every weight moves by one ulp or two."""
    probe = copy.deepcopy(model)
    u = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in names:
            weight = probe.get_submodule(name).weight
            signs = torch.randint(0, 2, weight.shape, generator=generator).float().mul_(2).sub_(1)
            weight.copy_(weight.float().mul(1 + 2 * u * signs).to(dtype))
    return probe


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


@contextlib.contextmanager
def _fresh_package(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inside, ``import snell.integrations.peft`` runs the package again (as a notebook's reload does); after, every
    module, the parent's attribute and peft's three table entries are the ones the rest of the session imported."""
    from peft import mapping

    import snell.integrations

    for table in (
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING,
        mapping.PEFT_TYPE_TO_TUNER_MAPPING,
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING,
    ):
        monkeypatch.setitem(table, "SNELL", table["SNELL"])
    monkeypatch.setattr(snell.integrations, "peft", snell.integrations.peft)
    name = "snell.integrations.peft"
    ours = {key: module for key, module in sys.modules.items() if key == name or key.startswith(name + ".")}
    for key in ours:
        del sys.modules[key]
    try:
        yield
    finally:
        for key in [key for key in sys.modules if key == name or key.startswith(name + ".")]:
            del sys.modules[key]
        sys.modules.update(ours)


def test_an_unsupported_peft_is_refused_when_the_package_is_imported(monkeypatch):
    # The pin guards peft internals the registration relies on, so it must run at import, not only when called.
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.20.0" if name == "peft" else real(name))
    pinned = r"supports peft>=0\.21\.2,<0\.22, but peft 0\.20\.0 is installed"
    with _fresh_package(monkeypatch), pytest.raises(ImportError, match=pinned):
        importlib.import_module("snell.integrations.peft")


def test_importing_the_package_again_registers_its_new_classes():
    # A notebook's importlib.reload makes new classes: the tables must hold them (not the stale ones, which a
    # reloaded SnellPeftConfig is not an instance of), and replacing our own earlier entries is no conflict.
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    with pytest.MonkeyPatch.context() as monkeypatch, _fresh_package(monkeypatch):
        fresh = importlib.import_module("snell.integrations.peft")
        assert fresh.SnellPeftConfig is not SnellPeftConfig
        assert PEFT_TYPE_TO_CONFIG_MAPPING["SNELL"] is fresh.SnellPeftConfig
        assert PEFT_TYPE_TO_TUNER_MAPPING["SNELL"] is fresh.SnellPeftModel
        assert PEFT_TYPE_TO_PREFIX_MAPPING["SNELL"] == "snell_"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SNELL"] is SnellPeftConfig


def test_another_packages_snell_method_is_refused_not_replaced(monkeypatch):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    class Foreign:  # defined here, not in snell.integrations.peft
        pass

    with _fresh_package(monkeypatch):
        monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, "SNELL", Foreign)
        with pytest.raises(RuntimeError, match=r"peft already has a method registered as 'SNELL': <class .*Foreign"):
            importlib.import_module("snell.integrations.peft")
        assert PEFT_TYPE_TO_CONFIG_MAPPING["SNELL"] is Foreign


@pytest.mark.parametrize("route", ["get_peft_model", "add_adapter"])
def test_a_target_that_cannot_be_adapted_is_refused_before_any_module_is_wrapped(route):
    """peft wraps the targets one at a time, q_proj before input_layernorm; a SNELL adapter changes its layer's
    output from the start, so a refusal found at the norm must come before q_proj is wrapped."""
    base = _llama().eval()
    inputs = _tokens()
    expected = _output(base, inputs)
    config = SnellPeftConfig(r=4, target_modules=["q_proj", "input_layernorm"])
    model = base
    if route == "add_adapter":
        model = peft.get_peft_model(base, SnellPeftConfig(r=4, target_modules=["v_proj"]))
        with model.disable_adapter():
            expected = _output(model, inputs)
    before = [name for name, _ in model.named_modules()]
    with pytest.raises(TypeError, match=r"'model\.layers\.0\.input_layernorm' of type LlamaRMSNorm cannot take"):
        if route == "add_adapter":
            model.add_adapter("second", config)
        else:
            peft.get_peft_model(model, config)
    assert [name for name, _ in model.named_modules()] == before
    if route == "add_adapter":
        with model.disable_adapter():
            assert torch.equal(_output(model, inputs), expected)
    else:
        assert torch.equal(_output(model, inputs), expected)


class _Doubled(nn.Linear):
    """A Linear with a forward of its own, which a SNELL layer would replace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_all_linear_is_checked_as_the_layer_names_it_stands_for():
    """peft expands "all-linear" only after _prepare_model, whose checks saw no layer: a refused layer was found
    after lin0 was wrapped, and a typo in layer_sparsity passed."""
    base = MLP()
    base.lin1 = _Doubled(24, 24)
    with pytest.raises(TypeError, match=r"'lin1' is a _Doubled, whose _Doubled\.forward does more"):
        peft.get_peft_model(base, SnellPeftConfig(r=4, target_modules="all-linear"))
    assert type(base.lin0) is nn.Linear and base.lin0.weight.requires_grad
    with pytest.raises(ValueError, match=r"layer_sparsity names \['lin9'\], which are not among the 3 layers"):
        peft.get_peft_model(MLP(), SnellPeftConfig(r=4, target_modules="all-linear", layer_sparsity={"lin9": [0.5]}))
    model = peft.get_peft_model(
        MLP(), SnellPeftConfig(r=4, target_modules="all-linear", layer_sparsity={"lin1": [0.7]})
    )
    assert sorted(n for n, m in model.base_model.model.named_children() if isinstance(m, SnellPeftLayer)) == [
        "head", "lin0", "lin1"
    ]  # fmt: skip
    assert model.base_model.model.lin1.snell_specs["default"].sparsity_of(0) == pytest.approx(0.7)


def test_layer_sparsity_naming_a_layer_that_is_not_adapted_is_refused_in_both_routes():
    """A typo or a short name in layer_sparsity would leave that layer at the default sparsity without a word."""
    typo = {"lin0": [0.5], "lin1x": [0.7]}  # lin0 is a full module name here; lin1x is not one
    for call in (
        lambda: peft.get_peft_model(MLP(), SnellPeftConfig(r=4, target_modules=["lin0", "lin1"], layer_sparsity=typo)),
        lambda: snell.get_snell_model(
            MLP(), snell.SnellConfig(r=4, target_modules=["lin0", "lin1"], layer_sparsity=typo)
        ),
    ):
        with pytest.raises(ValueError, match=r"layer_sparsity names \['lin1x'\], which are not among the 2 layers"):
            call()
    model = peft.get_peft_model(
        MLP(), SnellPeftConfig(r=4, target_modules=["lin0", "lin1"], layer_sparsity={"lin1": [0.7]})
    )
    assert model.base_model.model.lin1.snell_specs["default"].sparsity_of(0) == pytest.approx(0.7)


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


def test_adapters_switch_and_learnable_coefficients_train_and_reload(tmp_path):
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

    model.save_pretrained(tmp_path, selected_adapters=["default"])
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), default, rtol=0, atol=0)
        merged = reloaded.merge_and_unload(safe_merge=True)
        # Merged W0 + ΔWˢ is rounded once more than in the fused forward: a few float32 ulps of the output.
        torch.testing.assert_close(merged(x), default, rtol=1e-5, atol=1e-6)


def test_peft_type_behaves_as_a_peft_type_member_wherever_peft_reads_it(tmp_path):
    from peft.utils.hotswap import check_hotswap_configs_compatible

    config = SnellPeftConfig(r=4, target_modules=["lin0"])
    assert config.peft_type == "SNELL" and config.peft_type.value == "SNELL" and config.peft_type.name == "SNELL"
    assert config.peft_type != peft.PeftType.LORA and {"SNELL": 1}[config.peft_type] == 1
    # peft's own checks format `peft_type.value` into their messages: they must raise their ValueError.
    with pytest.raises(ValueError, match="`peft_type` 'SNELL' is not compatible with the `PeftMixedModel`"):
        peft.get_peft_model(MLP(), config, mixed=True)
    with pytest.raises(ValueError, match="Incompatible PEFT types found: SNELL and LORA"):
        check_hotswap_configs_compatible(config, peft.LoraConfig(r=4, target_modules=["lin0"]))
    with pytest.raises(ValueError, match=r"Hotswapping only supports .* but SNELL was passed"):
        check_hotswap_configs_compatible(config, copy.deepcopy(config))

    # str() reads as str(PeftType.LORA) does, "PeftType.<name>": get_model_status() names the method from it
    assert str(config.peft_type) == "PeftType.SNELL" and str(peft.PeftType.LORA) == "PeftType.LORA"
    model = peft.get_peft_model(MLP(), config)
    assert model.get_model_status().peft_types == {"default": "SNELL"}
    # trained factors beside frozen coefficients, as the README says; all trained with learnable coefficients
    assert model.get_model_status().requires_grad == {"default": "irregular"}
    learnable = SnellPeftConfig(r=4, target_modules=["lin0"], learnable_coefficients=True)
    assert peft.get_peft_model(MLP(), learnable).get_model_status().requires_grad == {"default": True}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["peft_type"] == "SNELL"  # a plain JSON string
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is SnellPeftConfig and loaded.peft_type.value == "SNELL"
    assert copy.deepcopy(loaded).peft_type.value == "SNELL"


def test_autocast_adapter_dtype_false_keeps_the_factors_in_the_base_dtype_as_lora_does(tmp_path):
    torch.manual_seed(0)
    base = MLP().to(torch.bfloat16).eval()
    fresh = copy.deepcopy(base)
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    lora = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["lin0"]), autocast_adapter_dtype=False
    )
    assert lora.base_model.model.lin0.lora_A["default"].weight.dtype == torch.bfloat16
    default = peft.get_peft_model(copy.deepcopy(base), SnellPeftConfig(r=4, target_modules=["lin0"]))
    assert default.base_model.model.lin0.snell_A["default"].dtype == torch.float32  # the default stays float32

    model = peft.get_peft_model(
        base, SnellPeftConfig(r=4, sparsity=0.5, target_modules=["lin0"]), autocast_adapter_dtype=False
    )
    layer = model.base_model.model.lin0
    assert layer.snell_A["default"].dtype == layer.snell_B["default"].dtype == torch.bfloat16
    assert (
        layer.snell_coefficients["default"].dtype == torch.float32
        and not layer.snell_coefficients["default"].requires_grad
    )
    assert layer.snell_A["default"].requires_grad and layer.snell_B["default"].requires_grad
    before = layer.snell_B["default"].detach().clone()
    _train(model, {"x": x})
    assert layer.snell_B["default"].dtype == torch.bfloat16 and not torch.equal(layer.snell_B["default"], before)
    with torch.no_grad():
        trained = model(x)
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path, autocast_adapter_dtype=False)
    assert reloaded.base_model.model.lin0.snell_A["default"].dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), trained, rtol=0, atol=0)  # same bf16 factors, same arithmetic


@pytest.mark.parametrize("trainable", [False, True])
def test_a_low_cpu_mem_usage_load_into_a_bf16_base_is_the_normal_load(tmp_path, trainable):
    """peft's low_cpu_mem_usage path moves each adapter tensor to its base layer afterwards; its own move also cast
    them to bf16 and made the fixed coefficients trainable. The two loads must give the same tensors."""
    torch.manual_seed(0)
    base = MLP().to(torch.bfloat16).eval()
    bases = [copy.deepcopy(base) for _ in range(2)]
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    model = peft.get_peft_model(base, SnellPeftConfig(r=4, sparsity=0.5, target_modules=["lin0", "lin1"]))
    _train(model, {"x": x})
    model.save_pretrained(tmp_path)
    normal, low = (
        peft.PeftModel.from_pretrained(b, tmp_path, is_trainable=trainable, low_cpu_mem_usage=low_cpu)
        for b, low_cpu in zip(bases, (False, True), strict=True)
    )
    expected = {n: (p.dtype, p.requires_grad, p.detach()) for n, p in normal.named_parameters()}
    got = {n: (p.dtype, p.requires_grad, p.detach()) for n, p in low.named_parameters()}
    assert got.keys() == expected.keys()
    for name, (dtype, requires_grad, value) in expected.items():
        assert got[name][:2] == (dtype, requires_grad) and torch.equal(got[name][2], value), name
    coefficients = low.base_model.model.lin0.snell_coefficients["default"]
    assert coefficients.dtype == torch.float32 and not coefficients.requires_grad


def test_undropped_modules_reach_the_peft_layers_and_the_saved_config(tmp_path):
    config = SnellPeftConfig(r=4, target_modules=["lin0", "lin1"], dropout=0.2, undropped_modules=["lin1"])
    model = peft.get_peft_model(MLP(), config)
    layers = model.base_model.model
    assert layers.lin0.snell_dropouts["default"][0] == 0.2 and layers.lin1.snell_dropouts["default"][0] == 0.0
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(MLP(), tmp_path)
    assert reloaded.base_model.model.lin1.snell_dropouts["default"][0] == 0.0
    with pytest.raises(ValueError, match=r"undropped_modules \['lin9'\] match none of the 2 layers adapted"):
        peft.get_peft_model(MLP(), SnellPeftConfig(r=4, target_modules=["lin0", "lin1"], undropped_modules=["lin9"]))


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=["linear", "conv2d", "conv1d"])
def test_layers_report_in_and_out_features_as_lora_layers_do(case):
    base, fresh, _, config = _build(case)
    targets = config.target_modules
    model = peft.get_peft_model(base, config)
    lora = peft.get_peft_model(fresh, peft.LoraConfig(r=4, target_modules=targets))
    snell_layers = {n: m for n, m in model.named_modules() if isinstance(m, SnellPeftLayer)}
    lora_layers = {n: m for n, m in lora.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert snell_layers and snell_layers.keys() == lora_layers.keys()
    for name, layer in snell_layers.items():
        assert (layer.in_features, layer.out_features) == (
            lora_layers[name].in_features,
            lora_layers[name].out_features,
        )
    if case[0] == "gpt2-conv1d":  # Conv1D stores its weight (in, out): c_attn maps 24 features to 3 × 24
        c_attn = model.base_model.model.transformer.h[0].attn.c_attn
        assert (c_attn.in_features, c_attn.out_features) == (24, 72)
    if case[0] == "conv2d":
        assert (model.base_model.model.conv.in_features, model.base_model.model.conv.out_features) == (3, 8)


class EvenKernelDownsample(nn.Module):
    """DaViT's downsampling: it reads its conv's kernel size in the forward to pad for an even kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 2, stride=2)
        self.head = nn.Linear(8 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k_h, k_w = self.conv.kernel_size
        x = nn.functional.pad(x, (0, -x.shape[-1] % k_w, 0, -x.shape[-2] % k_h))
        return self.head(self.conv(x).flatten(1))


def test_a_model_reading_its_layers_geometry_runs_and_other_names_stay_the_wrapped_modules():
    model = peft.get_peft_model(EvenKernelDownsample(), SnellPeftConfig(r=4, target_modules=["conv"]))
    conv = model.base_model.model.conv
    assert isinstance(conv, SnellPeftLayer)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    assert conv.snell_B["default"].grad is not None
    assert (conv.kernel_size, conv.stride, conv.groups) == ((2, 2), (2, 2), 1)
    conv.get_base_layer().hook_state = "the wrapped conv's own"
    assert not hasattr(conv, "hook_state")
    with pytest.raises(AttributeError, match="no_such_attribute"):
        conv.no_such_attribute  # noqa: B018


def test_a_peft_model_compiles_into_one_graph_on_the_accelerator_path_geometry_read_included():
    """What a GPU user's torch.compile meets: dynamo traces peft's wrappers (their attribute forwarding too) and
    FusedSnell's forward and backward without a break. aot_eager runs the same aten ops as eager, unfused."""
    model = peft.get_peft_model(
        EvenKernelDownsample(), SnellPeftConfig(r=4, sparsity=0.5, target_modules=["conv", "head"])
    )
    x = torch.randn(2, 3, 5, 5)
    trained = [p for p in model.parameters() if p.requires_grad]
    with sparsify.device_path_on_cpu():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        out.square().sum().backward()
        compiled_grads = [p.grad.clone() for p in trained]
        model.zero_grad()
        expected = model(x)
        expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for mine, theirs in zip(compiled_grads, [p.grad for p in trained], strict=True):
        torch.testing.assert_close(mine, theirs)


def test_safe_merge_of_a_broken_adapter_raises_peft_message_and_touches_no_weight():
    torch.manual_seed(0)
    model = peft.get_peft_model(MLP().eval(), SnellPeftConfig(r=4, sparsity=0.0, target_modules=["lin0"]))
    layer = model.base_model.model.lin0
    with torch.no_grad():
        layer.snell_A["default"][0, 0] = torch.nan  # sparsity 0 keeps every entry, so the NaN reaches ΔW
    weight = layer.base_layer.weight.detach().clone()
    message = "NaNs detected in the merged weights. The adapter default seems to be broken"
    with pytest.raises(ValueError, match=f"^{message}$"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, weight) and not layer.merged


@pytest.mark.parametrize("route", ["core", "peft"])
def test_a_classification_task_type_on_a_language_model_is_refused(route):
    """SEQ_CLS on a ...ForCausalLM found lm_head as its head and trained a full copy of the vocabulary-sized output
    embeddings (28 M parameters on SmolLM2), silently."""
    model = _llama()
    kinds = [type(m) for m in model.modules()]
    config = {"r": 4, "task_type": "SEQ_CLS", "target_modules": ["q_proj"]}
    message = r"task_type='SEQ_CLS' trains the classification head, but 'lm_head' is the language-model head"
    with pytest.raises(ValueError, match=message):
        if route == "core":
            snell.get_snell_model(model, snell.SnellConfig(**config))
        else:
            peft.get_peft_model(model, SnellPeftConfig(**config))
    assert [type(m) for m in model.modules()] == kinds and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("first", [None, ["query"]])
def test_a_further_adapter_with_the_preset_targets_the_layers_a_fresh_model_would(first):
    """target_modules=None on add_adapter: the preset is found on the model as it was before the first adapter; on
    the wrapped model it saw each wrapper's base_layer as the nn.Linear, and matched nothing or left out every layer
    the first adapter had wrapped."""
    expected = sorted(snell.model.resolve_targets(_bert(), snell.SnellConfig(r=4)))
    model = peft.get_peft_model(_bert(), SnellPeftConfig(r=4, sparsity=0.5, task_type="SEQ_CLS", target_modules=first))
    wrappers = (SnellPeftLayer, peft.utils.other.ModulesToSaveWrapper)
    before = {name: type(module) for name, module in model.named_modules() if isinstance(module, wrappers)}
    config = SnellPeftConfig(r=4, sparsity=0.5, task_type="SEQ_CLS")
    model.add_adapter("two", config)

    def holding(adapter: str) -> list[str]:
        layers = model.base_model.model.named_modules()
        return sorted(n for n, m in layers if isinstance(m, SnellPeftLayer) and adapter in m.snell_A)

    assert holding("two") == expected and "base_layer" not in config.target_modules
    assert holding("default") == (expected if first is None else [n for n in expected if n.endswith("query")])
    after = {name: type(module) for name, module in model.named_modules() if isinstance(module, wrappers)}
    assert before and before.items() <= after.items()  # every wrapper is back in its place


def _two_adapters(other: dict) -> tuple[nn.Module, SnellPeftLayer]:
    """An MLP with "default" (r 4, sparsity 0.5) on lin0 and "other" (``other``) on lin0 and lin1, both active; B × 100
    makes each ΔWˢ visible (as in the merge test)."""
    torch.manual_seed(0)
    model = peft.get_peft_model(MLP().eval(), SnellPeftConfig(r=4, sparsity=0.5, target_modules=["lin0"]))
    model.add_adapter("other", SnellPeftConfig(target_modules=["lin0", "lin1"], **other))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SnellPeftLayer):
                for b in module.snell_B.values():
                    b.mul_(100)
    model.base_model.set_adapter(["default", "other"])
    return model, model.base_model.model.lin0


def _gemm_bound(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """Per output entry, n·u·Σ|x||w| over the weights (u = 2^-24): the worst-case float32 rounding of one GEMM of
    length n (γ_n), which also covers adding the weights to one another (u·|w| each) before it."""
    n = x.shape[-1]
    return n * 2**-24 * (x.abs() @ sum(w.abs() for w in weights).T)


def test_several_active_adapters_add_their_own_sparsified_updates_as_lora_adapters_do():
    model, layer = _two_adapters(dict(r=8, sparsity=0.8))
    with pytest.raises(TypeError, match="does not support add_weighted_adapter: SNELL's ΔW is a sparsified kernel"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")  # LoRA's, which mixes factors
    assert set(model.peft_config) == {"default", "other"}
    x = torch.randn(5, 12)
    w0, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach()
    with torch.no_grad():
        both = layer(x)
        deltas = {name: layer.delta_weight(name) for name in ("default", "other")}
        singles = {}
        for name in ("default", "other"):
            model.base_model.set_adapter(name)
            singles[name] = layer(x)
        with model.disable_adapter():
            base = layer(x)
    # Each ΔW is sparsified with its own τ: "other" keeps 20 % of lin0's 288 entries, "default" 50 %.
    assert deltas["other"].count_nonzero() < 0.25 * 288 < 0.45 * 288 < deltas["default"].count_nonzero()
    # y = x(W0 + ΔW₁ˢ + ΔW₂ˢ)ᵀ + b, computed two ways: each side is at most two GEMMs and two additions of weights
    # or outputs, so it is within 4 γ_n·|x||W| of the exact value, the sum of single-adapter results likewise.
    bound = 4 * _gemm_bound(x, w0, *deltas.values()) + 1e-7
    expected = torch.nn.functional.linear(x, w0 + deltas["default"] + deltas["other"], bias)
    assert ((both - expected).abs() <= bound).all()
    assert ((both - (singles["default"] + singles["other"] - base)).abs() <= 2 * bound).all()
    assert ((both - singles["default"]).abs() > bound).any() and ((both - singles["other"]).abs() > bound).any()

    model.base_model.set_adapter(["default", "other"])
    lin1 = model.base_model.model.lin1
    w1, delta1 = lin1.base_layer.weight.detach().clone(), lin1.delta_weight("other")
    merged = model.merge_and_unload(adapter_names=["default", "other"])
    # The merge adds ΔW₁ˢ, then ΔW₂ˢ, each as its forward adds it to the weight (with a fused multiply-add on the
    # torch path): one rounding per addition there, one per addition here, u = 2^-24 of the sum each.
    exact, total = w0 + deltas["default"] + deltas["other"], w0.abs() + deltas["default"].abs() + deltas["other"].abs()
    assert ((merged.lin0.weight - exact).abs() <= 4 * 2**-24 * total).all()
    assert ((merged.lin1.weight - (w1 + delta1)).abs() <= 4 * 2**-24 * (w1.abs() + delta1.abs())).all()


def test_several_active_adapters_train_each_with_its_own_dropout():
    """In training, each adapter gets its own gradient, bit for bit the one it gets when active alone: the
    output is a sum, so each branch receives the same incoming gradient either way."""
    model, layer = _two_adapters(dict(r=4, sparsity=0.8, dropout=0.1, drop_path=0.1))
    model.train()
    x = torch.randn(5, 12, requires_grad=True)
    grad = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    params = {name: (layer.snell_A[name], layer.snell_B[name]) for name in ("default", "other")}

    def run(active: list[str]) -> tuple[torch.Tensor, dict, torch.Tensor]:
        model.base_model.set_adapter(active)
        model.zero_grad()
        x.grad = None
        torch.manual_seed(7)  # "other" draws its DropPath and dropout seed from here in both runs
        out = layer(x)
        out.backward(grad)
        return out.detach(), {n: [p.grad.clone() for p in params[n]] for n in active}, x.grad.clone()

    both, grads, grad_x = run(["default", "other"])
    alone = {name: run([name]) for name in ("default", "other")}
    for name in ("default", "other"):
        assert all(torch.equal(g, h) for g, h in zip(grads[name], alone[name][1][name], strict=True))
    with torch.no_grad(), model.disable_adapter():
        base = layer(x)
    # The same sum as in eval mode (the branches' own dropout masks come from the same seed): within the bound
    # argued there, with the branch's 1/(1 − p) scaling at most doubling its terms.
    deltas = [layer.delta_weight(name) for name in ("default", "other")]
    bound = 8 * _gemm_bound(x, layer.base_layer.weight, *deltas) + 1e-7
    assert ((both - (alone["default"][0] + alone["other"][0] - base)).abs() <= bound).all()
    # dL/dx likewise: each single run also carries g·W0, which the sum counts twice (n = 24 for these GEMMs).
    weight = layer.base_layer.weight.detach()
    grad_bound = 8 * _gemm_bound(grad, weight.T, *(d.T for d in deltas)) + 1e-7
    assert ((grad_x - (alone["default"][2] + alone["other"][2] - grad @ weight)).abs() <= grad_bound).all()


def test_the_peft_route_refuses_what_the_core_refuses_for_weights_read_or_recomputed_by_others():
    """MultiheadAttention reads out_proj.weight itself, so peft's wrapper would never act there; a weight_norm
    weight is recomputed before each forward, so a merged ΔW would vanish while the layer reported merged."""
    attention = nn.Sequential()
    attention.add_module("attn", nn.MultiheadAttention(8, 2, batch_first=True))
    with pytest.raises(TypeError, match=r"'attn\.out_proj' belongs to a MultiheadAttention"):
        peft.get_peft_model(attention, SnellPeftConfig(r=2, target_modules=["out_proj"]))
    assert not any(isinstance(m, SnellPeftLayer) for m in attention.modules())
    torch.manual_seed(0)
    base = MLP().eval()
    nn.utils.parametrizations.weight_norm(base.lin1)
    model = peft.get_peft_model(base, SnellPeftConfig(r=4, sparsity=0.5, target_modules=["lin0", "lin1"]))
    first = model.base_model.model.lin0
    w0, x = first.base_layer.weight.detach().clone(), torch.randn(3, first.in_features)
    with torch.no_grad():
        adapted = model(x)
    for merge in (model.merge_adapter, model.merge_and_unload, model.base_model.merge_adapter):
        # every layer is checked before the first merges: lin0, before lin1, must stay unmerged and wrapped
        with pytest.raises(ValueError, match="the weight of lin1 is computed from other tensors on every forward"):
            merge()
        assert model.base_model.model.lin0 is first and not first.merged
        assert torch.equal(first.base_layer.weight, w0) and torch.equal(model(x), adapted)
    layer = model.base_model.model.lin1  # a merge of this layer alone says so too
    with pytest.raises(ValueError, match="the weight of this ParametrizedLinear is computed from other tensors"):
        layer.merge()
    assert not layer.merged and torch.equal(model(x), adapted)


def test_the_peft_route_refuses_to_merge_into_a_tied_lm_head_as_the_core_does():
    """peft only warns, and the merge changed the embeddings too: the logits moved by 2.4 and more."""
    torch.manual_seed(0)
    model = peft.get_peft_model(_gpt2(), SnellPeftConfig(r=4, sparsity=0.5, target_modules=["c_attn", "lm_head"]))
    embeddings = model.base_model.model.transformer.wte.weight.detach().clone()
    shared = r"lm_head\.weight is shared with transformer\.wte\.weight"
    with pytest.warns(UserWarning, match="tie_word_embeddings"), pytest.raises(ValueError, match=shared):
        model.merge_and_unload()  # peft's own warning comes first
    assert torch.equal(model.base_model.model.transformer.wte.weight, embeddings)
    assert not any(m.merged for m in model.modules() if isinstance(m, SnellPeftLayer))


# --------------------------------------------------------------------------------------------------------
# Promises no test held before a mutation audit (each test below fails with the matching mutant of the code)


def _scaled_mlp(**config) -> tuple[nn.Module, SnellPeftLayer]:
    """An MLP with a SNELL adapter on lin0 whose ΔW is large enough that adding it twice, or not at all, shows."""
    torch.manual_seed(0)
    model = peft.get_peft_model(MLP().eval(), SnellPeftConfig(r=4, sparsity=0.5, target_modules=["lin0"], **config))
    layer = model.base_model.model.lin0
    with torch.no_grad():
        layer.snell_B["default"].mul_(100)
    return model, layer


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merging_and_unmerging_a_peft_layer_round_trips(safe_merge: bool) -> None:
    """merge_adapter (safe or not) records the merge, so the forward does not add ΔW a second time (the merged and
    the two-GEMM forward each within one GEMM's bound); unmerge_adapter subtracts it again: W0 back within two
    roundings of each entry."""
    model, layer = _scaled_mlp()
    x = torch.randn(5, 12)
    with torch.no_grad():
        w0, before = layer.base_layer.weight.clone(), layer(x)
        delta = layer.delta_weight("default")
        model.merge_adapter(safe_merge=safe_merge)
        assert layer.merged
        bound = 2 * _gemm_bound(x, w0, delta) + 1e-6
        assert ((layer(x) - before).abs() <= bound).all()
        model.unmerge_adapter()
        assert not layer.merged
        assert ((layer.base_layer.weight - w0).abs() <= 2 * U32 * (w0.abs() + delta.abs())).all()


def test_disabling_a_merged_adapter_gives_the_base_model() -> None:
    """As with LoRA: disable_adapter() unmerges first, so the disabled model computes W0 (within the unmerge's
    rounding), not W0 + ΔW."""
    model, layer = _scaled_mlp()
    x = torch.randn(5, 12)
    with torch.no_grad():
        w0 = layer.base_layer.weight.clone()
        base = torch.nn.functional.linear(x, w0, layer.base_layer.bias)
        model.merge_adapter()
        with model.disable_adapter():
            out = layer(x)
    rounding = 2 * U32 * (w0.abs() + layer.delta_weight("default").abs())
    assert ((out - base).abs() <= 2 * _gemm_bound(x, w0) + x.abs() @ rounding.T + 1e-6).all()


def test_drop_path_and_split_fused_qkv_reach_the_peft_layers() -> None:
    """Every method field of SnellPeftConfig builds the layer as SnellConfig's does."""
    model, layer = _scaled_mlp(drop_path=0.5)
    assert layer.snell_dropouts["default"] == (0.0, 0.5)
    x = torch.randn(16, 12)
    with torch.no_grad():
        model.train()
        torch.manual_seed(1)
        first = layer(x)
        torch.manual_seed(2)
        assert not torch.equal(first, layer(x))

    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(8, 24)

    for split, groups in ((True, 3), (False, 1)):
        config = SnellPeftConfig(r=4, target_modules=["qkv"], split_fused_qkv=split)
        assert peft.get_peft_model(Fused(), config).base_model.model.qkv.snell_specs["default"].groups == groups


def test_a_second_adapter_on_a_grouped_query_qkv_is_one_matrix_like_the_first() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_key_value_groups = 2
            self.qkv_proj = nn.Linear(8, 36)  # q 24, k 6, v 6: divisible by 3, but not three equal parts

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Attention()

    config = dict(r=4, sparsity=0.5, target_modules=["qkv_proj"])
    with pytest.warns(UserWarning, match="grouped-query"):
        model = peft.get_peft_model(Net(), SnellPeftConfig(**config))
        model.add_adapter("other", SnellPeftConfig(**config))
    specs = model.base_model.model.attn.qkv_proj.snell_specs
    assert specs["default"].groups == specs["other"].groups == 1


def test_a_model_with_core_adapters_is_refused_by_get_peft_model() -> None:
    core = snell.get_snell_model(MLP(), snell.SnellConfig(r=4, target_modules=["lin0"]))
    with pytest.raises(ValueError, match=r"already has snell\.get_snell_model adapters"):
        peft.get_peft_model(core, SnellPeftConfig(r=4, target_modules=["lin1"]))


def test_the_default_targets_through_peft_are_the_cores_on_a_family_no_preset_names(tmp_path):
    """OPT: every projection of its decoder layers (q/k/v/out_proj, fc1, fc2), through peft as in the core; the
    pattern peft stores in its config selects them again on a fresh model."""
    torch.manual_seed(0)
    model = peft.get_peft_model(_opt(), SnellPeftConfig(r=4, sparsity=0.5, task_type="CAUSAL_LM"))
    wrapped = [name for name, m in model.base_model.model.named_modules() if isinstance(m, SnellPeftLayer)]
    core = [name for name, _ in snell.snell_layers(snell.get_snell_model(_opt(), snell.SnellConfig(r=4)))]
    assert wrapped == core
    assert sorted(n.rpartition("layers.0.")[2] for n in core) == [
        "fc1", "fc2", "self_attn.k_proj", "self_attn.out_proj", "self_attn.q_proj", "self_attn.v_proj",
    ]  # fmt: skip
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(_opt(), tmp_path)
    assert [n for n, m in reloaded.base_model.model.named_modules() if isinstance(m, SnellPeftLayer)] == wrapped


def test_a_classifier_module_kept_by_seq_cls_unloads_and_merges():
    """RoBERTa's classifier (as ELECTRA's, MPNet's, XLM-R's) is a module with dense and out_proj, not a Linear; peft's
    generic replacement copied a `weight` it does not have onto it, so merge_and_unload and unload failed. Both now
    give back the trained head. In float32 the merged model computes the adapted one's outputs up to the rounding of
    W0 + ΔWˢ (a few ulps of outputs of order 0.1)."""
    torch.manual_seed(0)
    inputs = _tokens()
    for unload in ("merge_and_unload", "unload"):
        model = peft.get_peft_model(_roberta().eval(), SnellPeftConfig(r=4, sparsity=0.5, task_type="SEQ_CLS"))
        _train(model, inputs)
        with torch.no_grad():
            adapted = _output(model, inputs)
            trained_head = model.base_model.model.classifier.modules_to_save["default"].out_proj.weight.clone()
            plain = getattr(model, unload)()
            assert type(plain.classifier).__name__ == "RobertaClassificationHead"
            assert torch.equal(plain.classifier.out_proj.weight, trained_head)
            if unload == "merge_and_unload":
                torch.testing.assert_close(_output(plain, inputs), adapted, rtol=0, atol=1e-5)


def _small_classifiers() -> dict:
    """Tiny transformers classifiers whose new heads differ: BERT's classifier alone; DeBERTa's classifier and the
    pooler it reads, which base checkpoints do not hold; XLM's sequence_summary, named neither classifier nor score."""
    small = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=VOCAB)
    return {
        "bert": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(hidden_size=24, **small)),
        "deberta": lambda: transformers.DebertaV2ForSequenceClassification(
            transformers.DebertaV2Config(hidden_size=24, **small)
        ),
        "xlm": lambda: transformers.XLMForSequenceClassification(
            transformers.XLMConfig(emb_dim=24, n_layers=1, n_heads=2, vocab_size=VOCAB)
        ),
    }


@pytest.mark.parametrize("name", ["bert", "deberta", "xlm"])
def test_seq_cls_trains_saves_and_reloads_the_heads_the_core_trains(name, tmp_path):
    """peft's SEQ_CLS trains `classifier`/`score` only: DeBERTa's pooler stayed at its random init, frozen, and XLM's
    head was not trained at all. Through SnellPeftConfig they are the core's heads; the adapter's config names them,
    so a reload puts back the trained ones (checked on a fresh model whose heads were changed first)."""
    factory = _small_classifiers()[name]
    torch.manual_seed(0)
    core = snell.get_snell_model(factory(), snell.SnellConfig(r=2, task_type="SEQ_CLS"))
    core_heads = {n.rsplit(".", 1)[0] for n, p in core.named_parameters() if p.requires_grad and "snell_" not in n}
    torch.manual_seed(0)
    model = peft.get_peft_model(factory().eval(), SnellPeftConfig(r=2, task_type="SEQ_CLS"))
    trained = {
        n.replace("base_model.model.", "").replace(".modules_to_save.default", "").rsplit(".", 1)[0]
        for n, p in model.named_parameters()
        if p.requires_grad and "snell_" not in n
    }
    assert trained == core_heads
    inputs = _tokens()
    _train(model, inputs)
    with torch.no_grad():
        adapted = _output(model, inputs)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = factory().eval()
    with torch.no_grad():
        for head in {h.split(".")[0] for h in core_heads}:
            for p in fresh.get_submodule(head).parameters():
                p.add_(1.0)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(_output(reloaded, inputs), adapted)


def test_seq_cls_on_a_model_without_a_findable_head_asks_for_it_before_wrapping():
    """peft's SEQ_CLS silently trained no head when the model has no `classifier`/`score`; the core's lookup says so
    before any layer is wrapped, and a head named in modules_to_save is taken as it is."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"cannot find the classification head of Sequential.*modules_to_save"):
        peft.get_peft_model(model, SnellPeftConfig(target_modules=["0"], task_type="SEQ_CLS"))
    assert type(model[0]) is nn.Linear and not any(isinstance(m, SnellPeftLayer) for m in model.modules())
    adapted = peft.get_peft_model(
        model, SnellPeftConfig(target_modules=["0"], task_type="SEQ_CLS", modules_to_save=["1"])
    )
    assert adapted.peft_config["default"].modules_to_save == ["1", "classifier", "score"]
    assert {n for n, p in adapted.named_parameters() if p.requires_grad and "snell_" not in n} == {
        "base_model.model.1.modules_to_save.default.weight",
        "base_model.model.1.modules_to_save.default.bias",
    }
