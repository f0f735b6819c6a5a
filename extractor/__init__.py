"""Batch audio embeddings from Qwen2-Audio's audio tower, with a LoRA adapter merged in."""

__version__ = "0.1.0"

from .api import Embedder  # noqa: E402  (after __version__: submodules read it)

__all__ = ["Embedder", "__version__"]
