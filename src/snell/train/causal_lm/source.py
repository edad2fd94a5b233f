"""Where a causal LM comes from: a transformers folder, or a GGUF file (llama.cpp's single-file format).

``--model`` names either a folder whose ``config.json`` has a causal-LM architecture (``...ForCausalLM``,
``GPT2LMHeadModel`` ...: :func:`is_causal_architecture`), a ``.gguf``
file, or a folder holding exactly one ``.gguf`` file and no ``config.json``. transformers reads GGUF files
itself (through the ``gguf`` package): it dequantizes the weights into plain ``nn.Linear`` layers and builds
the tokenizer, chat template included, from the file's metadata. What it leaves behind is a quantizer marker
that makes ``save_pretrained`` refuse although nothing is quantized any more; :func:`load_causal_lm` clears
it, so a merged model saves as a normal transformers folder.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snell.train.config import UserError

GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True)
class ModelSource:
    """A causal LM on disk: the folder transformers reads, and the GGUF file in it (None: a plain folder)."""

    folder: Path
    gguf_file: str | None = None

    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def describe(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def _architectures(config: Path) -> list[str]:
    try:
        return [str(name) for name in json.loads(config.read_text()).get("architectures") or []]
    except (json.JSONDecodeError, AttributeError, OSError):
        return []


def is_causal_architecture(name: str) -> bool:
    """A class transformers' ``AutoModelForCausalLM`` builds for text: any ``...ForCausalLM``, and the older heads it
    maps to under other names (GPT-2's ``GPT2LMHeadModel``, GPT's, CTRL's, XLM's, XLNet's, BERT as a decoder). Its
    ``...ForConditionalGeneration`` entries take images or audio, which this pipeline does not feed."""
    if name.endswith("ForCausalLM"):
        return True
    if name.endswith("ForConditionalGeneration"):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def find_source(model: str | Path) -> ModelSource | None:
    """The causal LM that ``model`` names, or None when it names something else (a timm name, a classifier)."""
    path = Path(model)
    if path.is_file():
        return ModelSource(path.parent, path.name) if path.suffix == GGUF_SUFFIX else None
    if not path.is_dir():
        return None
    config = path / "config.json"
    if config.is_file():
        return ModelSource(path) if any(is_causal_architecture(a) for a in _architectures(config)) else None
    ggufs = sorted(p.name for p in path.glob(f"*{GGUF_SUFFIX}"))
    if len(ggufs) > 1:
        raise UserError(f"{path} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}); pass one of them as --model")
    return ModelSource(path, ggufs[0]) if ggufs else None


def is_causal_lm(model: str | Path) -> bool:
    """True for a transformers causal-LM folder, a ``.gguf`` file, or a folder holding one."""
    return find_source(model) is not None


def describe_model(model: str | Path) -> str:
    """What ``model`` is, for an error message that says why it cannot train on instruction data."""
    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file():
        names = _architectures(path / "config.json")
        return f"a {' / '.join(names) or 'transformers model without an architecture'} folder"
    if path.exists():
        return "not a transformers folder or a .gguf file"
    if path.suffix == GGUF_SUFFIX or path.is_absolute() or len(path.parts) > 1:  # a path, not a timm name
        return "a path that does not exist"
    return "a timm model name"


@contextmanager
def _gguf_loading(progress: bool) -> Iterator[None]:
    """Two things of transformers' GGUF loader, for one load. Its de-quantization bar, which it draws with tqdm past
    its own progress-bar switch, follows ``progress``. And gguf-py's tensor-name map, which it rebuilds for every
    module of the model while matching names (397 times for SmolLM2-135M: 6-8 s of an 18 s load on 2 cores), is
    built once per architecture and depth: transformers only reads it."""
    try:
        import gguf
    except ImportError:
        raise UserError("reading a .gguf file needs the gguf package: pip install 'snell[text]'") from None
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar, name_map = gguf_utils.tqdm, gguf.get_tensor_name_map
    if not progress:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf_utils.tqdm, gguf.get_tensor_name_map = bar, name_map


def cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters and saved buffers of ``model`` to ``dtype``, in place, as ``from_pretrained(dtype=...)``
    builds them. Buffers a model does not save (rotary embeddings' ``inv_freq``) keep their dtype: a merged folder
    rebuilds them in float32 when it loads, and ``model.to(bfloat16)`` rounded them, so the trained model's rotary
    angles differed from the merged one's (logits by up to 1 on SmolLM2, another greedy answer)."""
    for param in model.parameters():  # once each: a tied pair stays one Parameter
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                setattr(module, name, buffer.to(dtype))


def load_causal_lm(source: ModelSource, dtype: torch.dtype, progress: bool = True) -> tuple[Any, Any]:
    """The model in ``dtype`` and its tokenizer; GGUF weights are dequantized in float32, then cast. ``progress``:
    show the de-quantization bar of a GGUF file (its only one: transformers' "Loading weights" bar is off)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kwargs = source.load_kwargs()
    try:
        # float32 first: transformers warns that GGUF weights asked for in half precision compute through casts.
        load_dtype = torch.float32 if source.gguf_file else dtype
        with _gguf_loading(progress) if source.gguf_file else nullcontext():
            model = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=load_dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(source.folder), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as err:  # struct: a GGUF header cut short
        raise UserError(f"{source.describe()}: cannot load a transformers causal LM: {err}") from None
    if source.gguf_file:
        cast_weights(model, dtype)
        # The weights are plain tensors now; the marker would only make save_pretrained refuse.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tokenizer
