"""Fine-tuning causal language models on instruction data (the LLM-Adapters setting of the SNELL paper, App. C.4).

Kept apart from the classification code: ``instructions`` reads and tokenises the data, ``scoring`` turns
greedy generations into answers and accuracies, ``run`` plugs both into the shared training harness.
"""

from __future__ import annotations

import json
from pathlib import Path


def is_causal_lm(model: str | Path) -> bool:
    """True for a local transformers folder whose config names a ``...ForCausalLM`` architecture."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (json.JSONDecodeError, AttributeError, OSError):
        return False
    return any(str(name).endswith("ForCausalLM") for name in architectures)
