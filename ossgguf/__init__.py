"""ossgguf: convert, quantize, run and publish OpenAI gpt-oss checkpoints as GGUF."""

__version__ = "0.1.0"
