"""Build the ready-to-run encoder: tower tensors → device → (LoRA merged) → dtype → fused q/k/v."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..constants import CONV_STRIDE, HOP_LENGTH, POOL_STRIDE, SAMPLE_RATE, encoder_tokens, mel_frames, output_frames
from ..errors import ConfigError
from .checkpoint import check_finite, fingerprint, read_tower_tensors, upload_tower
from .config import AdapterError, CheckpointError, EncoderConfig, cached_fingerprint, read_config, remember_fingerprint, tower_files
from .encoder import AudioEncoder, PackedSeqs
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


def load_model(model_dir: Path, adapter_dir: Path | None, device: torch.device, dtype: torch.dtype,
               on_stage: Callable[[str], None] | None = None) -> LoadedModel:
    """`on_stage(name)` is called as each stage begins: "weights" (the tower's tensors are read onto
    the device), "building" (the module is made and the adapter merged)."""
    on_stage = on_stage or (lambda name: None)
    t = time.monotonic()
    on_stage("weights")
    cfg = read_config(Path(model_dir))
    files = tower_files(Path(model_dir))
    # Hash while the weights move to the device (hashlib releases the GIL), unless these files were
    # hashed before (a stat-keyed cache: nightly reruns skip 1.3 GB of SHA-256). On the CPU, before
    # the merge, which may change the very tensors being hashed in place (float32 checkpoint).
    model_fp = cached_fingerprint(files)
    hashing = future = None
    if model_fp is None:
        hashing = ThreadPoolExecutor(1, thread_name_prefix="fingerprint")
    if device.type == "cuda":
        if hashing is not None:  # the hash reads the files' own bytes, beside the upload
            future = hashing.submit(lambda: fingerprint(read_tower_tensors(Path(model_dir))))
        state = upload_tower(Path(model_dir), device)
        logger.debug("model: tower tensors read onto %s in %.2f s", device, time.monotonic() - t)
    else:
        state = read_tower_tensors(Path(model_dir))
        logger.debug("model: tower tensors read in %.2f s", time.monotonic() - t)
        if hashing is not None:
            future = hashing.submit(fingerprint, state)
    if hashing is not None:
        hashing.shutdown(wait=False)
    on_stage("building")
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
    if hashing is not None and device.type == "cpu":
        # On the CPU the device copy is the checkpoint's own tensors, which the merge changes in place.
        model_fp = future.result()
    adapter = None
    if adapter_dir is not None:
        t = time.monotonic()
        # The merge is done in float32 whatever the checkpoint's dtype, then cast once.
        encoder, adapter = merge_adapter(encoder.float(), Path(adapter_dir))
        logger.debug("model: LoRA merged in %.2f s", time.monotonic() - t)
    encoder = encoder.to(dtype=dtype)
    encoder.prepare_for_inference()
    logmel = LogMel(cfg.num_mel_bins, device)
    if not _probe(encoder, logmel, dtype):
        # Finite weights can still be absurd (lora_alpha 1e38 merges into 1e36-sized weights): every
        # embedding would then be NaN and be blamed on the audio. Refuse the model instead (issue 11).
        what = f"the adapter {adapter_dir} merged into {model_dir}" if adapter is not None else str(model_dir)
        error = AdapterError if adapter is not None else CheckpointError
        raise error(f"{what} gives NaN or Inf on a test signal (1 s of a tone in noise): its weights are broken or absurd")
    if hashing is not None:
        model_fp = future.result()  # hashed while the weights moved, merged and warmed up on the GPU
        remember_fingerprint(files, model_fp)
    logger.info(
        "model: %d layers × d_model %d on %s in %s (tower %s…%s)",
        cfg.encoder_layers, cfg.d_model, device, str(dtype).removeprefix("torch."),
        model_fp[:8], f", adapter {adapter.fingerprint[:8]}…" if adapter else "",
    )
    return LoadedModel(encoder, logmel, cfg, device, dtype, model_fp, adapter)


@torch.inference_mode()
def _probe(encoder: AudioEncoder, logmel: LogMel, dtype: torch.dtype) -> bool:
    """Whether one window of a tone in noise (1 s) comes out of the encoder finite: a few ms."""
    device = logmel.window.device
    n = SAMPLE_RATE
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(n, dtype=torch.float32) / SAMPLE_RATE
    wave = 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.05 * torch.randn(n, generator=gen)
    tokens = encoder_tokens(mel_frames(n))
    padded = torch.zeros(1, HOP_LENGTH * (CONV_STRIDE * tokens + 3))
    padded[0, :n] = wave
    mel = logmel(padded.to(device), torch.tensor([CONV_STRIDE * tokens + 1], device=device)).to(dtype)
    index = torch.arange(tokens, device=device)
    x = encoder.embed_tokens(mel, index, index)
    seqs = PackedSeqs(torch.tensor([0, tokens], dtype=torch.int32, device=device), [tokens], tokens)
    frames = encoder(x, seqs, POOL_STRIDE * torch.arange(output_frames(tokens), device=device))
    return bool(torch.isfinite(frames).all())
