"""Where a causal LM comes from (a folder, a GGUF file), which prompt it is given, and how its answers are scored:
`snell train` / `eval` / `merge` end to end on the tiny LLaMA, and once on the real SmolLM2 GGUF file."""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llm_cases import TASKS, train_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from snell.cli import main
from snell.train.causal_lm import instructions as I
from snell.train.causal_lm import run as causal_lm_run
from snell.train.causal_lm import source as source_module
from snell.train.causal_lm.source import ModelSource, cast_weights, find_source, load_causal_lm
from snell.train.config import UserError
from snell.train.evaluate import evaluate_run

REPO = Path(__file__).resolve().parents[1]
#: A chat template of the usual ChatML shape (SmolLM2's, without its default system turn).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def chat_model(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA whose tokenizer has a chat template."""
    folder = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny[0], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def test_prompt_format_follows_the_tokenizer_unless_given(tiny: tuple[Path, Path], chat_model: Path) -> None:
    plain, chat = AutoTokenizer.from_pretrained(tiny[0]), AutoTokenizer.from_pretrained(chat_model)
    assert I.resolve_prompt_format(None, plain) == "alpaca" and I.resolve_prompt_format(None, chat) == "chat"
    assert I.resolve_prompt_format("alpaca", chat) == "alpaca"
    with pytest.raises(UserError, match="no chat template"):
        I.resolve_prompt_format("chat", plain)
    example = I.Example("Is it?", "It rained.", "true", "true", None, "x:1")
    assert I.render_prompt(example, chat, "chat") == (
        "<|im_start|>user\nIs it?\n\nIt rained.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert I.render_prompt(example, chat, "alpaca") == I.build_prompt("Is it?", "It rained.")


def test_a_chat_run_records_its_format_and_eval_and_merge_reuse_it(
    tiny: tuple[Path, Path], chat_model: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert main([*train_args(chat_model, tiny[1], run, "--max-eval-samples", "4"), "--epochs", "1"]) == 0
    record = json.loads((run / "config.json").read_text())
    assert record["backbone"]["prompt_format"] == "chat" and record["config"]["prompt_format"] is None
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["training"] == {"prompt_format": "chat"}
    summary = json.loads((run / "summary.json").read_text())
    assert evaluate_run(run)["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)  # the same prompts
    assert main(["merge", str(run), "--output", str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "snell_prompt.json").read_text()) == {"prompt_format": "chat"}
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == CHAT_TEMPLATE


def test_likelihood_scoring_picks_one_answer_of_the_tasks_set(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    extra = ("--method", "lora", "--score-by", "likelihood", "--max-eval-samples", "6")
    assert main([*train_args(*tiny, run, *extra), "--epochs", "1"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    predictions = json.loads((run / "test_predictions.json").read_text())
    records = [json.loads(line) for line in (tiny[1] / "test.jsonl").read_text().splitlines()][:6]
    assert [p["chosen"] for p in predictions] == [p["extracted"] for p in predictions]
    assert all(p["chosen"] in TASKS[r["task"]] for p, r in zip(predictions, records, strict=True))
    per_task = {
        task: sum(p["chosen"] == r["answer"] for p, r in zip(predictions, records, strict=True) if r["task"] == task)
        / sum(r["task"] == task for r in records)
        for task in TASKS
    }
    assert summary["test_accuracy_per_task"] == pytest.approx(per_task)
    assert summary["accuracy_kind"].endswith("(mean over tasks; answers by the most likely answer of each task's set)")
    assert evaluate_run(run)["accuracy"] == summary["test_accuracy"]


def test_instruction_data_with_a_model_that_is_not_a_causal_lm_is_one_line(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bert = tmp_path / "bert"
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(bert)
    capsys.readouterr()  # save_pretrained's progress bar, on unless an earlier test turned transformers' bars off
    assert main(train_args(bert, tiny[1], tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "instruction data" in err and "BertForMaskedLM" in err
    assert main(train_args(tmp_path / "no_model", tiny[1], tmp_path / "run")) == 2  # a path, not a timm name
    assert "is a path that does not exist" in capsys.readouterr().err
    assert main(train_args(tiny[0], tiny[1], tmp_path / "chat", "--prompt-format", "chat")) == 2
    assert "no chat template" in capsys.readouterr().err


def test_a_gpt2_lm_head_folder_is_a_causal_lm_that_trains_and_merges(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """GPT-2's causal LM class is GPT2LMHeadModel, not ...ForCausalLM: instruction data with it was refused as
    "not a causal LM". A classifier and a multimodal ...ForConditionalGeneration folder are still not causal LMs."""
    tokenizer = AutoTokenizer.from_pretrained(tiny[0])
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    gpt2 = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    assert find_source(gpt2) == ModelSource(gpt2)
    run = tmp_path / "run"
    assert main([*train_args(gpt2, tiny[1], run, "--merge"), "--epochs", "1"]) == 0
    factors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    layers = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the block rule: every Conv1D of the blocks
    expected = {f"transformer.h.{i}.{n}" for i in range(2) for n in layers}
    assert {key.rpartition(".snell_")[0] for key in factors} == expected
    assert type(AutoModelForCausalLM.from_pretrained(run / "merged")).__name__ == "GPT2LMHeadModel"
    for architecture in ("GPT2ForSequenceClassification", "Gemma3ForConditionalGeneration"):
        folder = tmp_path / architecture
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": [architecture]}))
        assert find_source(folder) is None


def test_merge_into_a_tied_lm_head_is_refused_before_training(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The tiny LLaMA ties its head to the embeddings: SNELL on the head trains, but --merge failed only after the
    whole run, with a traceback."""
    run = tmp_path / "run"
    assert main(train_args(*tiny, run, "--target-modules", "lm_head", "--merge")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("snell train: error: --merge: lm_head.weight is shared with model.embed_tokens.weight")
    assert not run.exists()


def test_gguf_sources_are_a_file_or_a_folder_with_exactly_one(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert find_source(tmp_path / "a.gguf").gguf_file == "a.gguf" and find_source(tmp_path).gguf_file == "a.gguf"
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="2 GGUF files"):
        find_source(tmp_path)
    assert find_source(tmp_path / "missing.gguf") is None and find_source(tmp_path / "a.txt") is None


def test_a_gguf_model_cast_to_bf16_computes_what_its_merged_folder_will(tmp_path: Path) -> None:
    """A GGUF model loads in float32 and is cast. model.to(bfloat16) rounded the rotary embeddings' inv_freq too, which
    a merged folder rebuilds in float32 when it loads: SmolLM2 trained and scored on other angles than it was merged
    with (logits by up to 1, another greedy answer). cast_weights must give what from_pretrained(dtype=bf16) gives."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    reference = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    cast = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    cast_weights(cast, torch.bfloat16)
    rounded = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).to(torch.bfloat16)
    ids = torch.randint(0, 64, (1, 200))  # far positions: the angles' rounding shows there
    with torch.no_grad():
        expected, got, before = (m(ids).logits for m in (reference, cast, rounded))
    assert {p.dtype for p in cast.parameters()} == {
        torch.bfloat16
    } and cast.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(got, expected) and not torch.equal(before, expected)  # the check can tell the two casts apart


def test_a_gguf_file_cut_off_in_its_header_is_one_line(tmp_path: Path) -> None:
    """gguf-py's reader raised struct.error (a traceback, exit 1) where the header's key-value pairs ran out."""
    path = tmp_path / "cut.gguf"  # magic, version 3, 2 tensors, 5 key-value pairs, then the first key cut short
    path.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 2, 5, 40) + b"general.arch")
    with pytest.raises(UserError, match=r"cut\.gguf.*: cannot load a transformers causal LM: unpack_from requires"):
        load_causal_lm(find_source(path), torch.float32, progress=False)


@pytest.mark.parametrize("progress", [True, False])
def test_the_gguf_de_quantization_bar_follows_progress(
    tiny: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, progress: bool
) -> None:
    """transformers draws that bar with tqdm itself (its progress-bar switch leaves it on), inside from_pretrained:
    stood in for here by a from_pretrained that draws it as transformers does, so no real GGUF file is read."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    model = AutoModelForCausalLM.from_pretrained(tiny[0])

    def from_pretrained(folder: str, **kwargs: object) -> torch.nn.Module:
        assert kwargs["gguf_file"] == "m.gguf"
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda folder, **kwargs: None)
    bar = gguf_utils.tqdm
    load_causal_lm(ModelSource(tiny[0], "m.gguf"), torch.float32, progress=progress)
    assert ("de-quantizing GGUF tensors" in capsys.readouterr().err) is progress
    assert gguf_utils.tqdm is bar  # transformers' own name, back as it was


def test_the_gguf_name_map_is_built_once_per_load_and_maps_every_tensor_as_before(tiny: tuple[Path, Path]) -> None:
    """transformers matches GGUF tensor names to the model's by rebuilding gguf-py's name map for every module;
    during snell's load it is built once. The mapping it yields is the same, and gguf-py's function is its own after."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, get_gguf_hf_weights_map

    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    processor = TENSOR_PROCESSORS["llama"](config={})
    function = gguf.get_tensor_name_map
    expected = get_gguf_hf_weights_map(model, processor)
    assert sorted(expected.values()) == sorted(model.state_dict())  # every tensor of the model has its name
    with source_module._gguf_loading(progress=False):
        assert get_gguf_hf_weights_map(model, processor) == expected
        assert gguf.get_tensor_name_map.cache_info().misses == 1  # one model: one architecture and depth
    assert gguf.get_tensor_name_map is function


@pytest.mark.slow
def test_smollm2_gguf_trains_merges_to_a_plain_folder_and_loads_back(
    smollm2: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real model as users load it: the .gguf path, a chat template, one short SNELL run, and `snell merge`
    writing a transformers folder whose outputs are the adapted model's. In float32: the merged weights are W0 + ΔWˢ
    rounded once, as the adapted forward forms them, so the two differ by GEMM summation order at most: |logit| is
    below 40 here and 30 layers of float32 reordering (2^-23 relative each) move it by about 40·30·2^-23 ≈ 1.5e-4;
    2e-3 leaves a 10x margin. (In bf16 the same comparison is a rounding lottery: 2^-8 per weight.)

    The `smollm2` fixture loaded the file through snell's loader; `train` and `merge` get copies of that load, and
    must ask for this file in float32."""
    source, loaded, tokenizer = smollm2
    asked = []

    def copy_of_the_load(wanted: ModelSource, dtype: torch.dtype, progress: bool) -> tuple:
        asked.append((wanted, dtype, progress))
        return copy.deepcopy(loaded), copy.deepcopy(tokenizer)

    monkeypatch.setattr(causal_lm_run, "load_causal_lm", copy_of_the_load)
    gguf = source.folder / source.gguf_file
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w, "answer": w} for w in ("yes", "no") * 2]
    for split in ("train", "val", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    args = ["train", "--model", str(gguf), "--data", str(data), "--output-dir", str(run), "--epochs", "1",
            "--batch-size", "4", "--eval-batch-size", "4", "--max-length", "64", "--model-dtype", "float32",
            "--score-by", "likelihood", "--target-modules", "q_proj,v_proj", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    backbone = json.loads((run / "config.json").read_text())["backbone"]
    assert backbone == {"architecture": "LlamaForCausalLM", "dtype": "float32", "prompt_format": "chat",
                        "gguf_file": gguf.name}  # fmt: skip
    assert 0 <= summary["test_accuracy"] <= 1
    assert main(["merge", str(run), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert asked == [(source, torch.float32, False)] * 2  # train, then merge (the run's --no-progress)
    model = copy.deepcopy(loaded)
    import snell

    adapted = snell.load_adapter(model, run / "adapter").eval()
    ids = torch.tensor([[1, 504, 3458, 314, 260, 2]])
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        assert expected.abs().max() < 40
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=2e-3, rtol=0)


@pytest.mark.slow
def test_the_chat_lm_eval_example_prompts_as_snell_does(
    chat_model: Path, tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    """examples/lm-eval/snell_instructions_chat.yaml with lm-eval's --apply_chat_template on a merged chat run:
    every prompt lm-eval builds is the one snell trained and scored with."""
    run = tmp_path / "run"
    assert main([*train_args(chat_model, tiny[1], run, "--max-eval-samples", "2"), "--epochs", "1"]) == 0
    assert main(["merge", str(run), "--output", str(tmp_path / "merged")]) == 0
    work = tmp_path / "eval"
    (work / "data").mkdir(parents=True)
    (work / "tasks").mkdir()
    shutil.copy(REPO / "examples" / "lm-eval" / "snell_instructions_chat.yaml", work / "tasks")
    records = [
        {"instruction": "Which section?", "input": "Shares rose", "output": "business", "answer": "business"},
        {"instruction": "Which section?", "input": "", "output": "sports", "answer": "sports"},
    ]
    (work / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'merged'}",
               "--include_path", "tasks", "--tasks", "snell_instructions_chat", "--apply_chat_template",
               "--device", "cpu", "--output_path", "out", "--log_samples"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (samples,) = (work / "out").rglob("samples_snell_instructions_chat_*.jsonl")
    prompts = {json.loads(line)["arguments"]["gen_args_0"]["arg_0"] for line in samples.read_text().splitlines()}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    expected = {I.render_prompt(I.Example(r["instruction"], r["input"], "", None, None, ""), tokenizer, "chat")
                for r in records}  # fmt: skip
    assert prompts == expected
