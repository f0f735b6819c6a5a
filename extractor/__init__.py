"""Batch audio embeddings from Qwen2-Audio's audio tower, with a LoRA adapter merged in."""

from .version import __version__

__all__ = ["Embedder", "__version__"]


def __getattr__(name: str):
    # Lazy: decode workers import extractor.decode and must not pay for torch (3 s, 220 MB each).
    if name == "Embedder":
        from .api import Embedder

        return Embedder
    raise AttributeError(f"module 'extractor' has no attribute {name!r}")
