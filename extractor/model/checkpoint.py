"""Read the audio tower out of a Qwen2-Audio checkpoint, and nothing else.

A Qwen2-Audio-7B checkpoint is ~16 GB, of which the tower is ~1.3 GB. We open only the shards
that hold `audio_tower.*` tensors (through the index when there is one), so a checkpoint whose
language-model shards are missing or unreadable still loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from .config import INDEX_FILE, SINGLE_FILE, TOWER_PREFIX, CheckpointError, cached_fingerprint, remember_fingerprint, tower_files

logger = logging.getLogger(__name__)

def _tower_keys(model_dir: Path) -> dict[Path, list[str]]:
    """Checkpoint file → the tower keys it holds."""
    files = tower_files(model_dir)
    if len(files) == 1 and files[0].name == SINGLE_FILE:
        with safe_open(files[0], framework="pt") as f:
            return {files[0]: [k for k in f.keys() if k.startswith(TOWER_PREFIX)]}
    weight_map = json.loads((Path(model_dir) / INDEX_FILE).read_text())["weight_map"]
    keys: dict[Path, list[str]] = {}
    for key, shard in weight_map.items():
        if key.startswith(TOWER_PREFIX):
            keys.setdefault(Path(model_dir) / shard, []).append(key)
    return keys


def read_tower_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """The tower's tensors keyed without the `audio_tower.` prefix; no other tensor is read."""
    model_dir = Path(model_dir)
    state: dict[str, torch.Tensor] = {}
    for shard, keys in sorted(_tower_keys(model_dir).items()):
        try:
            with safe_open(shard, framework="pt") as f:
                for key in keys:
                    state[key[len(TOWER_PREFIX):]] = f.get_tensor(key)
        except Exception as e:  # safetensors raises several types for a bad file
            raise CheckpointError(f"cannot read tower tensors from {shard}: {e}") from e
    if not state:
        raise CheckpointError(f"{model_dir} holds no {TOWER_PREFIX}* tensors")
    return state


def check_finite(state: dict[str, torch.Tensor], where: str, error: type[Exception] = CheckpointError) -> None:
    """A NaN or Inf weight makes every embedding NaN, which would be blamed on the audio: refuse it
    at load, naming the tensor (issue 11). Run on the device, where it costs milliseconds."""
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise error(f"{where}: tensor {bad[0]} holds NaN or Inf{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}")


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor in key order: it changes with the
    weights and not with how they were sharded."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy().data)
    return h.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """The tower's fingerprint without building a model: cached by the files' stat signature."""
    files = tower_files(Path(model_dir))
    fp = cached_fingerprint(files)
    if fp is None:
        fp = fingerprint(read_tower_tensors(Path(model_dir)))
        remember_fingerprint(files, fp)
    return fp
