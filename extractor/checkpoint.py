"""Read the audio tower out of a Qwen2-Audio checkpoint, and nothing else.

A Qwen2-Audio-7B checkpoint is ~16 GB, of which the tower is ~1.3 GB. We open only the shards
that hold `audio_tower.*` tensors (through the index when there is one), so a checkpoint whose
language-model shards are missing or unreadable still loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

TOWER_PREFIX = "audio_tower."
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(Exception):
    """The checkpoint directory cannot give us an audio tower."""


@dataclass(frozen=True)
class EncoderConfig:
    """The tower's shape, from config.json's `audio_config`."""

    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    num_mel_bins: int
    max_source_positions: int
    activation_function: str
    scale_embedding: bool

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @classmethod
    def from_dict(cls, audio_config: dict) -> "EncoderConfig":
        # Defaults are Qwen2AudioEncoderConfig's own: a hub config.json often omits them.
        cfg = cls(
            d_model=int(audio_config.get("d_model", 1280)),
            encoder_layers=int(audio_config.get("encoder_layers", 32)),
            encoder_attention_heads=int(audio_config.get("encoder_attention_heads", 20)),
            encoder_ffn_dim=int(audio_config.get("encoder_ffn_dim", 5120)),
            num_mel_bins=int(audio_config.get("num_mel_bins", 128)),
            max_source_positions=int(audio_config.get("max_source_positions", 1500)),
            activation_function=str(audio_config.get("activation_function", "gelu")),
            scale_embedding=bool(audio_config.get("scale_embedding", False)),
        )
        if cfg.d_model % cfg.encoder_attention_heads:
            raise CheckpointError(f"d_model {cfg.d_model} is not divisible by {cfg.encoder_attention_heads} heads")
        if cfg.activation_function != "gelu":
            raise CheckpointError(f"unsupported activation_function {cfg.activation_function!r} (only 'gelu')")
        return cfg


def read_config(model_dir: Path) -> EncoderConfig:
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{model_dir} has no config.json: not a Hugging Face checkpoint directory") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if "audio_config" not in config:
        raise CheckpointError(f"{path} has no audio_config: not a Qwen2-Audio checkpoint (model_type={config.get('model_type')!r})")
    return EncoderConfig.from_dict(config["audio_config"])


def _tower_files(model_dir: Path) -> dict[str, list[str]]:
    """Shard file → the tower keys it holds."""
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot read {index_path}: {e}") from e
        files: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            if key.startswith(TOWER_PREFIX):
                files.setdefault(shard, []).append(key)
        return files
    single = model_dir / SINGLE_FILE
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return {SINGLE_FILE: [k for k in f.keys() if k.startswith(TOWER_PREFIX)]}
    raise CheckpointError(f"{model_dir} has neither {INDEX_FILE} nor {SINGLE_FILE}")


def read_tower_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """The tower's tensors keyed without the `audio_tower.` prefix; no other tensor is read."""
    model_dir = Path(model_dir)
    files = _tower_files(model_dir)
    state: dict[str, torch.Tensor] = {}
    for shard, keys in sorted(files.items()):
        try:
            with safe_open(model_dir / shard, framework="pt") as f:
                for key in keys:
                    state[key[len(TOWER_PREFIX):]] = f.get_tensor(key)
        except Exception as e:  # safetensors raises several types for a bad file
            raise CheckpointError(f"cannot read tower tensors from {model_dir / shard}: {e}") from e
    if not state:
        raise CheckpointError(f"{model_dir} holds no {TOWER_PREFIX}* tensors")
    return state


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor in key order: it changes with the
    weights and not with how they were sharded."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy().data)
    return h.hexdigest()
