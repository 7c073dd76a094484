"""The embedded defaults: offline tokenizer, tiny Qwen-style models and the synthetic task."""
