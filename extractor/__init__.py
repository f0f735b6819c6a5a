"""Batch audio embeddings from Qwen2-Audio's audio tower, with a LoRA adapter merged in."""

__version__ = "0.1.0"
