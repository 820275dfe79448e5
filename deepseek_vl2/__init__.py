"""DeepSeek-VL2 inference: model, processor and generation engine, weight-compatible with the
official Hugging Face checkpoints."""
