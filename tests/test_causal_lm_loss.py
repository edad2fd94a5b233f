"""The chunked next-token loss gives the full-logits loss, values and gradients, while never running the head on
more rows than one chunk; on the small LLaMA shipped with the package, with each fine-tuning method.

Tolerances. Both paths compute the same fp32 formulas; what differs is the order of sums: the head's GEMM runs on
a few rows instead of all (the 128-term dot products may block differently), and the per-sequence loss sums and
the gradients' sums over tokens add the same terms in another order. Reordering a sum of n terms changes it by at
most about n·eps·Σ|term| (eps = 6e-8 in fp32). Per-sequence sums of ≤ 31 positive losses: rtol 1e-5 (> 31·eps
plus the logits' own few ulps). Gradients add ≤ 4·31 token terms of either sign, so the bound is relative to the
size of the terms, not of the sum: atol 1e-5 × the tensor's largest entry (> 124·eps = 7.4e-6).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import snell
from snell.train.causal_lm import loss as L
from snell.train.causal_lm.demo import TINY_MODEL_DIR

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
CHUNK_ROWS = 5


def _lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))


METHODS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "snell": lambda m: snell.get_snell_model(m, snell.SnellConfig(r=4, sparsity=0.5, target_modules=TARGETS)),
    "lora": _lora,
    "full": lambda m: m.requires_grad_(True),
}


def _model(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = METHODS[method](AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)).train()
    if method == "snell":  # the factors start at zero (ΔW = 0): give the adapter something to contribute
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_(std=0.1)
    return model


def _batch(vocab: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Four rows of 32: a masked prompt with right padding, no response token at all, trained on the prompt
    (every label counted, as ``--train-on-prompt``), and a response cut after 3 tokens."""
    ids = torch.randint(4, vocab, (4, 32), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[0, :20] = -100
    mask[0, 27:], labels[0, 27:] = 0, -100
    labels[1] = -100
    labels[3, :25], labels[3, 28:] = -100, -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def _grads(model: nn.Module, parts: L.LossParts) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    sums, _, counts = parts
    (sums.sum() / counts.sum()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(METHODS))
def test_chunked_loss_equals_the_full_logits_loss(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(method)
    vocab = model.config.vocab_size
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", CHUNK_ROWS * vocab)  # 7 + 31 + 3 = 41 rows: 9 chunks, the last short
    inputs, labels = _batch(vocab)
    head_rows: list[tuple[int, ...]] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_rows.append(out.shape[:-1]))
    chunked = L.chunked_response_loss(model, inputs, labels)
    forward_calls = len(head_rows)
    chunked_grads = _grads(model, chunked)
    hook.remove()
    full = L.response_loss(model(**inputs).logits, labels)
    full_grads = _grads(model, full)

    # the forward computed one position's logits; every other head call was one chunk of counted positions, and
    # backward recomputed each chunk's logits once (none of them was kept alive for it)
    assert head_rows[0] == (4, 1)
    assert sorted(rows for (rows,) in head_rows[1:forward_calls]) == [1] + [CHUNK_ROWS] * 8
    assert sorted(rows for (rows,) in head_rows[forward_calls:]) == [1] + [CHUNK_ROWS] * 8
    torch.testing.assert_close(chunked[0], full[0], rtol=1e-5, atol=0)
    assert chunked[0][1] == 0 and chunked[2].tolist() == [7, 0, 31, 3]
    assert torch.equal(chunked[1], full[1]) and torch.equal(chunked[2], full[2])
    assert chunked_grads.keys() == full_grads.keys() and len(chunked_grads) > 0
    for name, grad in full_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(chunked_grads[name], grad, rtol=0, atol=1e-5 * float(grad.abs().max()))


def test_no_grad_evaluation_gives_the_same_loss() -> None:
    model = _model("snell").eval()
    inputs, labels = _batch(model.config.vocab_size)
    with torch.no_grad():
        chunked = L.chunked_response_loss(model, inputs, labels)
        full = L.response_loss(model(**inputs).logits, labels)
    torch.testing.assert_close(chunked[0], full[0], rtol=1e-5, atol=0)
    assert torch.equal(chunked[1], full[1]) and torch.equal(chunked[2], full[2])


def test_a_batch_without_response_tokens_still_backpropagates_zeros() -> None:
    """A batch of examples whose responses ``--max-length`` cut off counts nothing, and must not break backward."""
    model = _model("lora")
    inputs, labels = _batch(model.config.vocab_size)
    sums, hits, counts = L.chunked_response_loss(model, inputs, torch.full_like(labels, -100))
    assert sums.tolist() == [0.0] * 4 and hits.tolist() == [0] * 4 and counts.tolist() == [0] * 4
    sums.sum().backward()
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_a_model_that_rescales_its_logits_gets_the_full_logits_loss(family: str) -> None:
    """Gemma-2 soft-caps its logits after the head, Cohere multiplies them by logit_scale: running the head alone
    would change the loss."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    if family == "gemma2":
        config = transformers.Gemma2Config(**common, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5)
        model = transformers.Gemma2ForCausalLM(config).eval()
    else:
        config = transformers.CohereConfig(**common, num_key_value_heads=1, logit_scale=0.0625)
        model = transformers.CohereForCausalLM(config).eval()
    inputs, labels = _batch(64)
    with torch.no_grad():
        chunked = L.chunked_response_loss(model, inputs, labels)
        full = L.response_loss(model(**inputs).logits, labels)
        assert not L._chunkable(model)
    assert torch.equal(chunked[0], full[0])
