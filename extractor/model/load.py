"""Build the ready-to-run encoder: tower tensors → device → (LoRA merged) → dtype → fused q/k/v."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .checkpoint import check_finite, fingerprint, read_tower_tensors
from .config import CheckpointError, EncoderConfig, cached_fingerprint, read_config, remember_fingerprint, tower_files
from .encoder import AudioEncoder
from .logmel import LogMel
from .lora import MergeReport, merge_adapter

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r} is not a device (auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: only cpu and cuda are supported")
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


def load_model(model_dir: Path, adapter_dir: Path | None, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    t = time.monotonic()
    cfg = read_config(Path(model_dir))
    files = tower_files(Path(model_dir))
    state = read_tower_tensors(Path(model_dir))
    logger.debug("model: tower tensors read in %.2f s", time.monotonic() - t)
    # Hash while the weights move to the device (hashlib releases the GIL), unless these files were
    # hashed before (a stat-keyed cache: nightly reruns skip 1.3 GB of SHA-256). Before the merge,
    # which may change the very tensors being hashed in place (CPU, float32 checkpoint).
    model_fp = cached_fingerprint(files)
    hashing = None
    if model_fp is None:
        hashing = ThreadPoolExecutor(1, thread_name_prefix="fingerprint")
        future = hashing.submit(fingerprint, state)
        hashing.shutdown(wait=False)
    with torch.device("meta"):
        encoder = AudioEncoder(cfg)
    expected = set(encoder.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{model_dir}: audio_tower tensors do not match audio_config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    wrong = [f"{k} is {tuple(state[k].shape)}, config says {s}" for k, s in shapes.items() if tuple(state[k].shape) != s]
    if wrong:
        raise CheckpointError(f"{model_dir}: audio_tower tensors do not match audio_config: {wrong[0]}")
    encoder.load_state_dict(state, strict=True, assign=True)
    del state
    # Move in the checkpoint's dtype, then upcast on the device: the float32 copy never exists on the host.
    t = time.monotonic()
    encoder = encoder.to(device=device)
    check_finite(dict(encoder.state_dict()), f"{model_dir} (audio_tower)")
    logger.debug("model: moved to %s in %.2f s", device, time.monotonic() - t)
    if hashing is not None:
        model_fp = future.result()
        remember_fingerprint(files, model_fp)
    adapter = None
    if adapter_dir is not None:
        t = time.monotonic()
        # The merge is done in float32 whatever the checkpoint's dtype, then cast once.
        encoder, adapter = merge_adapter(encoder.float(), Path(adapter_dir))
        logger.debug("model: LoRA merged in %.2f s", time.monotonic() - t)
    encoder = encoder.to(dtype=dtype)
    encoder.prepare_for_inference()
    logger.info(
        "model: %d layers × d_model %d on %s in %s (tower %s…%s)",
        cfg.encoder_layers, cfg.d_model, device, str(dtype).removeprefix("torch."),
        model_fp[:8], f", adapter {adapter.fingerprint[:8]}…" if adapter else "",
    )
    return LoadedModel(encoder, LogMel(cfg.num_mel_bins, device), cfg, device, dtype, model_fp, adapter)
