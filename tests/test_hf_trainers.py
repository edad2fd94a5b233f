"""transformers' Trainer with snell.get_snell_model (SnellTrainer) and TRL's SFTTrainer with SnellPeftConfig, on a
tiny random LLaMA and a word-level tokenizer built here (no downloads). A few steps each."""

from __future__ import annotations

import copy

import pytest
import torch

import snell

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from snell.integrations.transformers import SnellTrainer  # noqa: E402
from snell.io import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>", "the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "big", "red"]


def _llama(layers: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return transformers.LlamaForCausalLM(config)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _sentences(n: int = 8) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(3, len(WORDS), (n, 6), generator=generator)
    return [" ".join(WORDS[i] for i in row) for row in picks.tolist()]


def _probe() -> torch.Tensor:
    return torch.randint(3, len(WORDS), (2, 6), generator=torch.Generator().manual_seed(5))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=_probe()).logits


def _snell_trainer(output_dir, model) -> SnellTrainer:
    tokenizer = _tokenizer()
    examples = [dict(tokenizer(s)) for s in _sentences()]
    for example in examples:
        example["labels"] = list(example["input_ids"])
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return SnellTrainer(model=model, args=args, train_dataset=examples, processing_class=tokenizer)


def _adapted_llama(sparsity: float = 0.5, layers: int = 1) -> torch.nn.Module:
    model = _llama(layers)
    torch.manual_seed(1)
    return snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=sparsity, target_modules=["q_proj", "v_proj"]))


def test_trainer_saves_snell_adapters_that_load_adapter_restores_and_resumes_from_them(tmp_path):
    trainer = _snell_trainer(tmp_path / "run", _adapted_llama())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    trained = _logits(trainer.model)

    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"):
        assert (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()
        assert not (folder / "model.safetensors").exists()  # the adapter alone, like a peft model's save
        assert (folder / transformers.trainer.TRAINING_ARGS_NAME).is_file()  # with the training arguments
        assert transformers.AutoTokenizer.from_pretrained(folder).pad_token == "<pad>"  # and the tokenizer
    # Same factors on the same base weights, same inputs, same process: exactly the trained outputs.
    restored = snell.load_adapter(_llama(), tmp_path / "final")
    torch.testing.assert_close(_logits(restored), trained, rtol=0, atol=0)
    at_step_2 = _logits(snell.load_adapter(_llama(), tmp_path / "run" / "checkpoint-2"))
    assert not torch.equal(at_step_2, trained)

    # Resuming copies checkpoint-2's adapter into a fresh model's adapter (same parameter objects, so the
    # optimizer state loaded next applies to them) and reruns steps 3 and 4 on the same batches: the same
    # arithmetic as the first run's steps 3 and 4, so the same final adapter.
    resumed = _snell_trainer(tmp_path / "run", _adapted_llama())
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    torch.testing.assert_close(_logits(resumed.model), trained, rtol=0, atol=0)

    # load_best_model_at_end's step: the best checkpoint's adapter, copied into the trained model.
    resumed.state.best_model_checkpoint = str(tmp_path / "run" / "checkpoint-2")
    resumed._load_best_model()
    torch.testing.assert_close(_logits(resumed.model), at_step_2, rtol=0, atol=0)


def test_trl_sft_trainer_trains_a_causal_lm_with_snell_and_its_adapter_reloads(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from snell.integrations.peft import SnellPeftConfig

    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=12,
        bf16=False,  # TRL defaults to True, and accelerate then runs the trained forward under bf16 autocast
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    config = SnellPeftConfig(r=4, sparsity=0.5, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(
        model=_llama(),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": _sentences()}),
        processing_class=_tokenizer(),
        peft_config=config,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".snell_A." in n}
    trainer.train()
    assert before and all(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    trainer.save_model(str(tmp_path / "adapter"))
    trained = _logits(trainer.model)

    reloaded = peft.PeftModel.from_pretrained(_llama(), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded), trained, rtol=0, atol=0)
    merged = copy.deepcopy(reloaded).merge_and_unload()
    # Merging rounds W0 + ΔWˢ to float32 in another order than the fused forward: a few float32 ulps.
    torch.testing.assert_close(_logits(merged), trained, rtol=1e-5, atol=1e-6)


def test_the_mixin_with_trls_sft_trainer_refuses_an_adapted_lm_head(tmp_path):
    """TRL's loss multiplies the hidden states by lm_head.weight itself: a SNELL adapter there would never train
    (TRL refuses the same for peft adapters). The q/v adapters alone are fine."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from snell.integrations.transformers import SnellTrainerMixin

    class SnellSFTTrainer(SnellTrainerMixin, trl.SFTTrainer):
        pass

    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"), max_length=12, bf16=False, report_to=[], use_cpu=True, disable_tqdm=True
    )
    data = datasets.Dataset.from_dict({"text": _sentences()})
    for targets, refused in ((["q_proj", "v_proj", "lm_head"], True), (["q_proj", "v_proj"], False)):
        model = snell.get_snell_model(_llama(), snell.SnellConfig(r=4, sparsity=0.5, target_modules=targets))
        if refused:
            with pytest.raises(ValueError, match="adapter on the LM head is not trained by TRL"):
                SnellSFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer())
        else:
            SnellSFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer())


def test_resuming_restores_an_allocators_per_layer_sparsities_and_checks_the_file(tmp_path):
    """A SNELLA allocator changes each layer's sparsity without touching the model's config, and save_adapter records
    them (layer_sparsity); resuming, or load_best_model_at_end, put them back with the factors. Before, the config
    comparison refused every such checkpoint. A corrupt checkpoint is refused as load_adapter refuses it."""
    from snell.integrations.transformers import restore_adapter
    from snell.spec import with_sparsities

    trained = _adapted_llama()
    with torch.no_grad():
        for index, (_, layer) in enumerate(snell.snell_layers(trained)):
            layer.snell_B.add_(0.5)
            layer.snell_spec = with_sparsities(layer.snell_spec, [0.25 * (index + 1)])  # as LayerSlot.set_spec does
    snell.save_adapter(trained, tmp_path / "checkpoint")
    resumed = _adapted_llama()
    assert not torch.equal(_logits(resumed), _logits(trained))
    restore_adapter(resumed, tmp_path / "checkpoint")
    assert [layer.snell_spec for _, layer in snell.snell_layers(resumed)] == [
        layer.snell_spec for _, layer in snell.snell_layers(trained)
    ]
    torch.testing.assert_close(_logits(resumed), _logits(trained), rtol=0, atol=0)

    weights = tmp_path / "checkpoint" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's data
    weights.write_bytes(bytes(data))
    fresh = _adapted_llama()
    before = _logits(fresh)
    with pytest.raises(ValueError, match="is corrupt"):
        restore_adapter(fresh, tmp_path / "checkpoint")
    torch.testing.assert_close(_logits(fresh), before, rtol=0, atol=0)
    # An adapter of another config (sparsity 0.9, same tensor shapes), and one of the same config made for a model
    # of one layer where this one has two (its second layer's factors would silently stay as they are).
    snell.save_adapter(_adapted_llama(sparsity=0.9), tmp_path / "other")
    with pytest.raises(ValueError, match="has another config than the model's"):
        restore_adapter(fresh, tmp_path / "other")
    torch.testing.assert_close(_logits(fresh), before, rtol=0, atol=0)
    snell.save_adapter(_adapted_llama(), tmp_path / "shallow")
    deeper = _adapted_llama(layers=2)
    state = {name: t.clone() for name, t in deeper.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit the model"):
        restore_adapter(deeper, tmp_path / "shallow")
    assert all(torch.equal(t, state[name]) for name, t in deeper.state_dict().items())


def test_reentrant_gradient_checkpointing_trains_a_model_that_takes_pixel_values(tmp_path):
    """transformers makes the embeddings' output require grad for input_ids models and peft's, so a reentrant
    checkpoint passes gradients to the layers inside it; a SNELL ViT got none, and its factors never moved."""
    from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)  # fmt: skip
    model = snell.get_snell_model(ViTForImageClassification(config), snell.SnellConfig(r=4, task_type="IMAGE_CLS"))
    factors = {name: p.detach().clone() for name, p in model.named_parameters() if "snell_A" in name}
    data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 3} for i in range(8)]
    args = TrainingArguments(
        str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )  # fmt: skip
    SnellTrainer(model=model, args=args, train_dataset=data).train()
    assert model.vit.layers[0].gradient_checkpointing  # the checkpoints were on
    assert all(not torch.equal(p, factors[name]) for name, p in model.named_parameters() if name in factors)


def test_the_gguf_llm_loaded_by_the_library_trains_through_peft_and_trainer_and_saves_merged(smollm2, tmp_path) -> None:
    """transformers' own GGUF load keeps the model marked quantized: Trainer refused to train it, and save_pretrained
    of the merged model to save it. snell.integrations.causal_lm.load_causal_lm (the `smollm2` fixture's loader)
    gives a model that does both; a path that is no causal LM is a ValueError naming it."""
    from snell.integrations.causal_lm import load_causal_lm
    from snell.integrations.peft import SnellPeftConfig

    _, loaded, tokenizer = smollm2
    model = peft.get_peft_model(
        copy.deepcopy(loaded), SnellPeftConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    ids = tokenizer(["The capital of France is Paris."], return_tensors="pt")["input_ids"]
    data = [{"input_ids": ids[0], "labels": ids[0]}]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=1, use_cpu=True, report_to=[], save_strategy="no"
    )
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match=r"config\.json: not a causal LM folder .* nor a \.gguf file"):
        load_causal_lm(tmp_path / "merged" / "config.json")
