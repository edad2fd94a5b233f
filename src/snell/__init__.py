"""snell: memory-lean sparse fine-tuning with kernelized LoRA (SNELL, NeurIPS 2024)."""

__version__ = "0.1.0"  # before the imports: snell.io records it in adapter files

from snell.config import SnellConfig
from snell.io import load_adapter, save_adapter
from snell.model import (
    disable_adapters,
    get_snell_model,
    merge_adapters,
    merge_and_unload,
    snell_layers,
    trainable_parameters,
    unload,
    unmerge_adapters,
)

__all__ = [
    "SnellConfig",
    "__version__",
    "disable_adapters",
    "get_snell_model",
    "load_adapter",
    "merge_adapters",
    "merge_and_unload",
    "save_adapter",
    "snell_layers",
    "trainable_parameters",
    "unload",
    "unmerge_adapters",
]
