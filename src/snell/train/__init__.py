"""Training package: data loading, training loops and evaluation for SNELL fine-tuning runs."""
