"""Reading checkpoints: HF directories (safetensors), GGUF files, and the registry of named models."""
