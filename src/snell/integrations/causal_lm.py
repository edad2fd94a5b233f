"""Loading a causal LM for fine-tuning from a folder or a GGUF file, as ``snell train`` does, for library users.

transformers' own GGUF load (``from_pretrained(folder, gguf_file=...)``) de-quantizes the weights into plain
tensors but keeps the model marked as quantized: ``Trainer`` (and TRL's ``SFTTrainer``) then refuse to train it,
and ``save_pretrained`` (of ``merge_and_unload()``'s model too) refuses to save it. :func:`load_causal_lm` clears
that marker, and casts the weights without rounding the rotary embeddings' angles (``model.to(bfloat16)`` rounds
them, which a merged folder then does not).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from snell.train.causal_lm.source import find_source
from snell.train.causal_lm.source import load_causal_lm as _load
from snell.train.config import UserError


def load_causal_lm(
    model: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = True
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a causal LM folder (``config.json`` of a ``...ForCausalLM``) or a ``.gguf`` file
    (or a folder holding one), the weights in ``dtype``, ready for ``get_peft_model``, ``Trainer`` and TRL. ``progress``
    shows a GGUF file's de-quantization bar. ValueError naming ``model`` when it is neither, or cannot be loaded."""
    source = find_source(model)
    if source is None:
        raise ValueError(
            f"{model}: not a causal LM folder (config.json naming a ...ForCausalLM architecture) nor a .gguf file"
        )
    try:
        return _load(source, dtype, progress)
    except UserError as err:
        raise ValueError(str(err)) from None
