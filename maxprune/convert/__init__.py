"""Checkpoint conversion: `hf` (safetensors + config.json, both ways) and `gguf` (llama.cpp files, import)."""
