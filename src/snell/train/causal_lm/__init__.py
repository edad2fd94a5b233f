"""Fine-tuning causal language models on instruction data (the LLM-Adapters setting of the SNELL paper, App. C.4).

Kept apart from the classification code: ``source`` finds and loads the model (a transformers folder or a
GGUF file), ``instructions`` reads the data and renders the prompt (Alpaca or the model's chat template),
``scoring`` turns generations into answers and accuracies, ``run`` plugs them into the shared training harness.
"""

from snell.train.causal_lm.source import is_causal_lm

__all__ = ["is_causal_lm"]
