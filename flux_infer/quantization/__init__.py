"""Weight-only quantization: formats and round-to-nearest (``rtn``), activation-aware scales (``awq``),
quantized modules (``modules``), and reading/writing quantized checkpoints (``checkpoints``)."""
