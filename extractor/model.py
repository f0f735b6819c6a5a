"""Build the ready-to-run encoder: tower tensors → (LoRA merged) → device and dtype → fused q/k/v."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, EncoderConfig, fingerprint, read_config, read_tower_tensors
from .encoder import AudioEncoder
from .logmel import LogMel
from .lora import MergeReport, PeftCheck, merge_adapter

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


@dataclass
class LoadedModel:
    encoder: AudioEncoder
    logmel: LogMel
    cfg: EncoderConfig
    device: torch.device
    dtype: torch.dtype
    model_fingerprint: str
    adapter: MergeReport | None
    # With load_model(defer_check=True): PEFT's check of the LoRA merge, still running; whoever
    # writes results waits for it (PartWriter does, before its first commit).
    adapter_check: PeftCheck | None = None


def load_model(model_dir: Path, adapter_dir: Path | None, device: torch.device, dtype: torch.dtype, *, defer_check: bool = False) -> LoadedModel:
    t = time.monotonic()
    cfg = read_config(Path(model_dir))
    state = read_tower_tensors(Path(model_dir))
    logger.debug("model: tower tensors read in %.2f s", time.monotonic() - t)
    # Hash while the weights move to the device (hashlib releases the GIL); done before the merge,
    # which may change the very tensors being hashed in place (CPU, float32 checkpoint).
    hashing = ThreadPoolExecutor(1, thread_name_prefix="fingerprint")
    model_fp = hashing.submit(fingerprint, state)
    hashing.shutdown(wait=False)
    with torch.device("meta"):
        encoder = AudioEncoder(cfg)
    expected = set(encoder.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{model_dir}: audio_tower tensors do not match audio_config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    encoder.load_state_dict(state, strict=True, assign=True)
    del state
    # Move in the checkpoint's dtype first, then upcast on the device: the float32 copy never
    # exists on the host, and the copy overlaps the peft import (a background thread, see run_job).
    t = time.monotonic()
    encoder = encoder.to(device=device)
    logger.debug("model: moved to %s in %.2f s", device, time.monotonic() - t)
    model_fp = model_fp.result()
    logger.debug("model: fingerprinted %.2f s after the move began", time.monotonic() - t)
    adapter = check = None
    if adapter_dir is not None:
        t = time.monotonic()
        # The merge is done in float32 whatever the checkpoint's dtype, then cast once.
        encoder, adapter, check = merge_adapter(encoder.float(), Path(adapter_dir), defer_check=defer_check)
        logger.debug("model: LoRA merged in %.2f s", time.monotonic() - t)
    encoder = encoder.to(dtype=dtype)
    encoder.prepare_for_inference()
    logger.info(
        "model: %d layers × d_model %d on %s in %s (tower %s…%s)",
        cfg.encoder_layers, cfg.d_model, device, str(dtype).removeprefix("torch."),
        model_fp[:8], f", adapter {adapter.fingerprint[:8]}…" if adapter else "",
    )
    return LoadedModel(encoder, LogMel(cfg.num_mel_bins, device), cfg, device, dtype, model_fp, adapter, check)
