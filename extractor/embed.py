"""Run one packed batch through log-mel and the encoder on the model's device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .batching import Batch
from .encoder import PackedSeqs
from .model import LoadedModel


@dataclass
class BatchOutput:
    """Per-window results on the host, float32.

    sums: (B, D) sum of each window's valid output frames (mean pooling is sum / frames, done
    per item once all its windows are back). frames: (N, D) every valid frame, or None.
    """

    sums: np.ndarray
    frames: np.ndarray | None


def to_device(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """Host → device copies; non_blocking only helps when the host tensor is pinned."""
    pin = device.type == "cuda"

    def put(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return (t.pin_memory() if pin else t).to(device, non_blocking=pin)

    return {
        "waves": put(batch.waves),
        "keep_frames": put(batch.keep_frames),
        "token_index": put(batch.token_index),
        "position_index": put(batch.position_index),
        "cu_seqlens": put(batch.cu_seqlens),
        "pool_index": put(batch.pool_index),
        "frame_window": put(batch.frame_window),
    }


@torch.inference_mode()
def encode_batch(model: LoadedModel, batch: Batch, dev: dict[str, torch.Tensor], *, keep_frames: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sums (B, D) float32, frames (N, D) float32 or None), still on the device."""
    mel = model.logmel(dev["waves"], dev["keep_frames"]).to(model.dtype)
    tokens = model.encoder.embed_tokens(mel, dev["token_index"], dev["position_index"])
    seqs = PackedSeqs(dev["cu_seqlens"], [w.tokens for w in batch.windows], batch.max_tokens)
    frames = model.encoder(tokens, seqs, dev["pool_index"]).float()  # (N, D)
    sums = torch.zeros(len(batch.windows), frames.shape[1], device=frames.device, dtype=torch.float32)
    sums.index_add_(0, dev["frame_window"], frames)
    return sums, (frames if keep_frames else None)


def run_batch(model: LoadedModel, batch: Batch, *, keep_frames: bool = False) -> BatchOutput:
    sums, frames = encode_batch(model, batch, to_device(batch, model.device), keep_frames=keep_frames)
    return BatchOutput(sums.cpu().numpy(), None if frames is None else frames.cpu().numpy())
