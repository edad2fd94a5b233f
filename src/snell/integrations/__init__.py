"""Bridges to the Hugging Face ecosystem, kept out of the core so that ``import snell`` needs neither peft,
transformers nor timm.

- :mod:`snell.integrations.peft`: ``SnellPeftConfig`` for ``peft.get_peft_model`` / ``PeftModel`` (and TRL's
  ``peft_config=``).
- :mod:`snell.integrations.transformers`: ``SnellTrainer`` so that ``Trainer.save_model`` and every checkpoint
  of a model from ``snell.get_snell_model`` hold a SNELL adapter.
- :mod:`snell.integrations.causal_lm`: ``load_causal_lm`` for a causal LM folder or GGUF file, trainable and
  savable (transformers' own GGUF load leaves it marked quantized).
"""
