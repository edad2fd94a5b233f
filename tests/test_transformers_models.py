"""SNELL on transformers models built from tiny configs (no downloads): presets, Conv1D, merge."""

import json

import pytest
import torch
from checks import assert_keeps_top_k, dense_update

import snell

transformers = pytest.importorskip("transformers")


def _tiny(config_name: str, model_name: str, **config):
    """A tiny random transformers model: 2 layers of width 32 unless ``config`` says otherwise."""
    sizes = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**{**sizes, **config}))


def _bert():
    return _tiny("BertConfig", "BertForSequenceClassification", num_labels=3)


def _llama():
    return _tiny("LlamaConfig", "LlamaForCausalLM")


def _gpt2():
    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LINEAR_ATTENTION = tuple(
    f"linear_attn.{n}" for n in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")
)
_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_QWEN3_5 = dict(  # three linear-attention (Gated DeltaNet) layers, then a full-attention one
    num_hidden_layers=4, num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2,
    linear_key_head_dim=8, linear_value_head_dim=8,
)  # fmt: skip
# family: (model, its blocks, the layers adapted in each block). BERT, LLaMA and GPT-2 as before the block rule (the
# reference code's projections); the families no preset names get every linear layer of their blocks, where the
# preset matching most names used to leave out OPT's out_proj/fc1/fc2, Phi's dense/fc1/fc2 and DeBERTa's q/k/v
# projections, and GPT-NeoX and DistilBERT got no preset at all. Qwen3.5's linear-attention layers had none adapted.
_FAMILIES = {
    "bert": (_bert, "bert.encoder.layer", [(
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense",
    )] * 2),
    "llama": (_llama, "model.layers", [_ATTENTION + _MLP] * 2),
    "gpt2": (_gpt2, "transformer.h", [("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] * 2),
    "opt": (
        lambda: _tiny("OPTConfig", "OPTForCausalLM", ffn_dim=64, max_position_embeddings=32, word_embed_proj_dim=32),
        "model.decoder.layers",
        [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")] * 2,
    ),
    "phi": (lambda: _tiny("PhiConfig", "PhiForCausalLM"), "model.layers", [(
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2",
    )] * 2),
    "gpt_neox": (lambda: _tiny("GPTNeoXConfig", "GPTNeoXForCausalLM"), "gpt_neox.layers", [(
        "attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
    )] * 2),
    "deberta_v2": (
        lambda: _tiny("DebertaV2Config", "DebertaV2ForSequenceClassification", num_labels=3),
        "deberta.encoder.layer",
        [(
            "attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
            "attention.output.dense", "intermediate.dense", "output.dense",
        )] * 2,
    ),
    "distilbert": (
        lambda: _tiny(
            "DistilBertConfig", "DistilBertForSequenceClassification", dim=32, hidden_dim=64, n_layers=2, n_heads=2,
            num_labels=3,
        ),
        "distilbert.transformer.layer",
        [("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2")] * 2,
    ),
    "qwen3_5": (
        lambda: _tiny("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", **_QWEN3_5),
        "model.layers",
        [_LINEAR_ATTENTION + _MLP] * 3 + [_ATTENTION + _MLP],
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", _FAMILIES)
def test_the_default_adapts_every_projection_of_every_block(family):
    """Each adapter acts (its factors get a gradient; the outputs move with B) and merges."""
    build, blocks, per_block = _FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, 50, (2, 7))
    before = model(input_ids=ids).logits
    snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.5))
    names = {n for n, _ in snell.snell_layers(model)}
    assert names == {f"{blocks}.{i}.{layer}" for i, layers in enumerate(per_block) for layer in layers}
    with torch.no_grad():
        for _, layer in snell.snell_layers(model):
            layer.B.mul_(30)
    adapted = model(input_ids=ids).logits
    assert (adapted - before).abs().max() > 1e-4
    adapted.sum().backward()
    assert all(layer.A.grad.abs().sum() > 0 for _, layer in snell.snell_layers(model))
    merged = snell.merge_and_unload(model)
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_the_vit_preset_adapts_every_attention_and_mlp_projection(family: str) -> None:
    """transformers 5 names them ``...layers.N.attention.q_proj`` (ViT) or ``encoder.layer.N.attention.q_proj``
    (DINOv2) and ``mlp.fc1``/``fc2``; the preset knew only the older ``attention.attention.query`` names."""
    if family == "vit":
        config = transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
            patch_size=8, num_labels=3,
        )  # fmt: skip
        model = transformers.ViTForImageClassification(config)
    else:
        config = transformers.Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=16, patch_size=8
        )
        model = transformers.Dinov2Model(config)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".attention." in n + "."]
    linears += [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".mlp." in n]
    assert len(linears) == 2 * 6  # per layer: q, k, v, o and the MLP's two
    snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.5))
    assert sorted(n for n, _ in snell.snell_layers(model)) == sorted(linears)


def test_gpt2_conv1d_fused_c_attn_is_split_and_transposed():
    model = _gpt2()
    snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.9, target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    assert layer.weight.shape == (32, 96)  # Conv1D stores (in, out)
    assert layer.A.shape == (3, 32, 4) and layer.B.shape == (3, 32, 4)
    delta = layer.delta_weight()
    assert delta.shape == (32, 96)
    assert_keeps_top_k(dense_update(layer), delta.T.reshape(3, 32, 32) != 0, round(0.1 * 32 * 32))


def test_adapter_config_records_the_transformers_checkpoint(tmp_path):
    model = _bert()
    snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.5))
    snell.save_adapter(model, tmp_path / "unnamed")
    model.config._name_or_path = "org/tiny-bert"  # what from_pretrained sets
    snell.save_adapter(model, tmp_path / "named")
    records = {
        d: json.loads((tmp_path / d / "adapter_config.json").read_text())["base_model"] for d in ("unnamed", "named")
    }
    cls = "transformers.models.bert.modeling_bert.BertForSequenceClassification"
    assert records == {
        "unnamed": {"class": cls, "name_or_path": None},
        "named": {"class": cls, "name_or_path": "org/tiny-bert"},
    }


def test_a_classification_task_type_trains_and_saves_the_new_head(tmp_path):
    """task_type="SEQ_CLS" does for the core what peft's does: the new classifier trains without naming it."""
    model = _bert()
    snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.5, task_type="SEQ_CLS"))
    assert all(p.requires_grad for p in model.classifier.parameters())
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # a trained head
    snell.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    fresh = _bert()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "snell_" not in k and "classifier" not in k},
                          strict=False)  # fmt: skip
    snell.load_adapter(fresh, tmp_path)
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=0, rtol=0)
    plain = snell.get_snell_model(_bert(), snell.SnellConfig(r=4, sparsity=0.5))
    assert not any(p.requires_grad for p in plain.classifier.parameters())  # no task_type: nothing implied
    causal = snell.get_snell_model(_llama(), snell.SnellConfig(r=4, task_type="CAUSAL_LM"))
    assert not any(p.requires_grad for p in causal.lm_head.parameters())
    with pytest.raises(ValueError, match="task_type must be None or one of"):
        snell.SnellConfig(task_type="SEQ_CLASSIFICATION")


def _tied_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_merging_into_a_tied_weight_is_refused_before_anything_changes() -> None:
    """Folding ΔW into an LM head tied to the input embeddings would change the embeddings too (and the outputs)."""
    model = snell.get_snell_model(
        _tied_llama(), snell.SnellConfig(r=4, sparsity=0.5, target_modules=["q_proj", "lm_head"])
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (snell.merge_adapters, snell.merge_and_unload):
        with pytest.raises(ValueError, match=r"lm_head\.weight is shared with model\.embed_tokens\.weight"):
            merge(model)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        assert not any(layer.snell_merged for _, layer in snell.snell_layers(model))
    plain = snell.unload(model)  # without the tied head, the same layers merge
    snell.merge_and_unload(snell.get_snell_model(plain, snell.SnellConfig(r=4, target_modules=["q_proj"])))


def test_tied_embeddings_saved_both_ways_round_trip(tmp_path) -> None:
    """Embeddings and LM head in modules_to_save share one tensor, which safetensors refused to write."""
    saved = ["embed_tokens", "lm_head"]
    config = snell.SnellConfig(r=4, sparsity=0.5, target_modules=["q_proj"], modules_to_save=saved)
    model = snell.get_snell_model(_tied_llama(), config)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # as training the tied pair does
    snell.save_adapter(model, tmp_path / "adapter")
    fresh = snell.load_adapter(_tied_llama(), tmp_path / "adapter")
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_an_adapted_layer_inside_modules_to_save_is_refused_before_anything_changes() -> None:
    model = _tied_llama()
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.q_proj' is adapted and lies in"):
        snell.get_snell_model(model, snell.SnellConfig(r=4, target_modules=["q_proj"], modules_to_save=["layers.1"]))
    assert [type(m) for m in model.modules()] == types
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("route", ["core", "peft"])
def test_phi3_fused_projections_are_adapted_one_matrix_at_a_time_where_their_parts_are_equal(route):
    """Phi-3 fuses q/k/v (qkv_proj) and gate/up (gate_up_proj); the preset left both out. Equal parts are split as
    the reference code splits q, k and v; grouped-query q/k/v (unequal parts) stay one matrix, with a warning."""

    def phi3(kv_heads):
        config = transformers.Phi3Config(
            vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=kv_heads, pad_token_id=0,
        )  # fmt: skip
        return transformers.Phi3ForCausalLM(config)

    def groups(model):
        if route == "core":
            snell.get_snell_model(model, snell.SnellConfig(r=4))
            return {n.rpartition(".")[2]: layer.snell_spec.groups for n, layer in snell.snell_layers(model)}
        peft = pytest.importorskip("peft")
        from snell.integrations.peft import SnellPeftConfig, SnellPeftLayer

        model = peft.get_peft_model(model, SnellPeftConfig(r=4, task_type="CAUSAL_LM"))
        layers = {n: m for n, m in model.named_modules() if isinstance(m, SnellPeftLayer)}
        return {n.rpartition(".")[2]: m.snell_specs["default"].groups for n, m in layers.items()}

    assert groups(phi3(4)) == {"qkv_proj": 3, "o_proj": 1, "gate_up_proj": 2, "down_proj": 1}
    with pytest.warns(UserWarning, match="fuses q, k and v of unequal sizes"):
        assert groups(phi3(1)) == {"qkv_proj": 1, "o_proj": 1, "gate_up_proj": 2, "down_proj": 1}


def test_an_adapter_file_keeps_the_grouping_it_records(tmp_path):
    """Files written before Phi-3's gate_up_proj (and a grouped-query qkv_proj) were grouped as they are now record
    their own grouping; load_adapter used to rebuild it by today's rule and refuse them as 'another architecture'.
    Stand-in: an adapter saved with split_fused_qkv=False whose config then says True, as those files do."""
    config = transformers.Phi3Config(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = snell.get_snell_model(transformers.Phi3ForCausalLM(config), snell.SnellConfig(r=4, split_fused_qkv=False))
    ids = torch.randint(64, (1, 6))
    with torch.no_grad():
        expected = model(ids).logits
    snell.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    saved["split_fused_qkv"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    torch.manual_seed(0)
    loaded = snell.load_adapter(transformers.Phi3ForCausalLM(config), tmp_path)
    groups = {n.rpartition(".")[2]: layer.snell_spec.groups for n, layer in snell.snell_layers(loaded)}
    assert groups == {"qkv_proj": 1, "o_proj": 1, "gate_up_proj": 1, "down_proj": 1}
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


def test_longformer_trains_through_its_in_place_query_scaling() -> None:
    """Longformer divides its query projection's output in place. F.linear returns a view for a 3-D input with a
    bias, and autograd refused that edit on a SNELL layer's output (a custom Function's view), so every Longformer
    step failed. Its classifier attends globally from the first token: every first-layer projection, the global
    ones included, gets a gradient (the last layer's local q/k/v feed nothing the classifier reads)."""
    config = transformers.LongformerConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        attention_window=4, max_position_embeddings=40, num_labels=3, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LongformerForSequenceClassification(config).eval()
    snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.5))
    layer0 = {n: layer for n, layer in snell.snell_layers(model) if ".layer.0." in n}
    within = {n.rpartition("layer.0.")[2] for n in layer0}
    assert within == {
        *(f"attention.self.{n}" for n in ("query", "key", "value", "query_global", "key_global", "value_global")),
        "attention.output.dense", "intermediate.dense", "output.dense",
    }  # fmt: skip
    ids = torch.randint(2, 50, (2, 8))
    out = model(input_ids=ids).logits
    out.sum().backward()
    assert all(layer.A.grad.abs().sum() > 0 for layer in layer0.values())
    torch.testing.assert_close(snell.merge_and_unload(model)(input_ids=ids).logits, out.detach(), rtol=1e-4, atol=1e-5)


def test_a_mamba_mixer_adapts_its_input_projection_and_refuses_the_layers_it_reads_by_weight() -> None:
    """Mamba multiplies by dt_proj.weight itself, and its fused kernels take x_proj's and out_proj's weights: adapters
    there never acted (no gradient) while merging them changed the outputs. The default leaves them out; naming one
    is refused before anything changes."""
    config = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, state_size=8)
    torch.manual_seed(0)
    model = _tiny("MambaConfig", "MambaForCausalLM", **config)
    snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.5))
    assert [n for n, _ in snell.snell_layers(model)] == [f"backbone.layers.{i}.mixer.in_proj" for i in range(2)]
    explicit = _tiny("MambaConfig", "MambaForCausalLM", **config)
    with pytest.raises(TypeError, match=r"'backbone\.layers\.0\.mixer\.dt_proj' belongs to a MambaMixer, which reads"):
        snell.get_snell_model(explicit, snell.SnellConfig(r=4, target_modules=["dt_proj"]))
    assert not any(True for _ in snell.snell_layers(explicit))
