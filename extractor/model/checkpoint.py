"""Read the audio tower out of a Qwen2-Audio checkpoint, and nothing else.

A Qwen2-Audio-7B checkpoint is ~16 GB, of which the tower is ~1.3 GB. We open only the shards
that hold `audio_tower.*` tensors (through the index when there is one), so a checkpoint whose
language-model shards are missing or unreadable still loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .config import (INDEX_FILE, ITEMSIZE, SINGLE_FILE, TOWER_PREFIX, CheckpointError, cached_fingerprint, coalesce, remember_fingerprint,
                     tower_files, tower_layout)

logger = logging.getLogger(__name__)

def _tower_keys(model_dir: Path) -> dict[Path, list[str]]:
    """Checkpoint file → the tower keys it holds."""
    files = tower_files(model_dir)
    if len(files) == 1 and files[0].name == SINGLE_FILE:
        try:
            with safe_open(files[0], framework="pt") as f:
                return {files[0]: [k for k in f.keys() if k.startswith(TOWER_PREFIX)]}
        except Exception as e:  # safetensors raises several types for a bad file
            raise CheckpointError(f"cannot read tower tensors from {files[0]}: {e}") from e
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
        state.update(_read_shard(shard, keys))
    if not state:
        raise CheckpointError(f"{model_dir} holds no {TOWER_PREFIX}* tensors")
    return state


# --- a fast path to the device: the tower's byte ranges, read straight into place -------------

STAGE_BYTES = 16 << 20  # each of the two pinned buffers a CUDA upload goes through
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def upload_tower(model_dir: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The tower's tensors on `device`, read from the files straight into device memory: each
    range of tensors is read once, through two pinned buffers whose copies to the GPU overlap the
    next read (on the CPU, into place), instead of safetensors' mmap-backed tensors and pageable
    copies: with model/ahead.py's warm-up it took the model's load on an H100 host from 2.17 to
    1.54 s (bench/RESULTS.md, start-up). The same tensors as read_tower_tensors, moved; a file this
    reader does not trust is read through safetensors instead."""
    if device.type == "cuda":
        # The pinned buffers and the copies belong to `device`, whatever the caller's current device
        # (the notebook API may load onto cuda:1 from a thread whose current device is cuda:0).
        with torch.cuda.device(device):
            return _upload(Path(model_dir), device, _Stage(device))
    return _upload(Path(model_dir), device, None)


def _upload(model_dir: Path, device: torch.device, stage: _Stage | None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    try:
        for shard, keys in sorted(_tower_keys(model_dir).items()):
            try:
                layout = tower_layout(shard)
                if not set(keys) <= set(layout):
                    raise ValueError("the index names tensors this file does not hold")
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.debug("%s: read through safetensors (%s)", shard, e)
                state.update({k: v.to(device) for k, v in _read_shard(shard, keys).items()})
                continue
            fd = os.open(shard, os.O_RDONLY)
            try:
                for lo, hi in coalesce([layout[k][2:] for k in keys]):
                    buf = torch.empty(hi - lo, dtype=torch.uint8, device=device)
                    _read_into(fd, lo, buf, stage, shard)
                    for k in keys:
                        dtype, shape, a, b = layout[k]
                        if lo <= a and b <= hi:
                            t = buf[a - lo : b - lo]
                            if (a - lo) % ITEMSIZE[dtype]:
                                t = t.clone()  # a view must start at a multiple of its element size
                            state[k[len(TOWER_PREFIX):]] = t.view(_DTYPES[dtype]).view(shape)
            finally:
                os.close(fd)
    finally:
        if stage is not None:
            stage.finish()
    if not state:
        raise CheckpointError(f"{model_dir} holds no {TOWER_PREFIX}* tensors")
    return state


class _Stage:
    """Two pinned host buffers: one is read into while the other's copy to the GPU runs."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.current_stream(device)  # where copy_ runs: the current device is `device`
        self.buffers = [torch.empty(STAGE_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.views = [memoryview(b.numpy()) for b in self.buffers]
        self.done: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def next(self) -> tuple[torch.Tensor, memoryview, int]:
        i, self.turn = self.turn, self.turn ^ 1
        if self.done[i] is not None:
            self.done[i].synchronize()  # its last copy has left the buffer
        return self.buffers[i], self.views[i], i

    def copied(self, i: int) -> None:
        self.done[i] = torch.cuda.Event()
        self.done[i].record(self.stream)

    def finish(self) -> None:
        for event in self.done:
            if event is not None:
                event.synchronize()
        self.done = [None, None]


def _read_into(fd: int, offset: int, dst: torch.Tensor, stage: _Stage | None, name: Path) -> None:
    """Bytes [offset, offset + len(dst)) of the file into `dst` (uint8, on the CPU or the GPU)."""
    pos, total = 0, dst.numel()
    target = None if stage is not None else memoryview(dst.numpy())
    while pos < total:
        if stage is None:
            n = os.preadv(fd, [target[pos:]], offset + pos)
        else:
            host, view, i = stage.next()
            n = os.preadv(fd, [view[: min(STAGE_BYTES, total - pos)]], offset + pos)
            if n > 0:
                dst[pos : pos + n].copy_(host[:n], non_blocking=True)
                stage.copied(i)
        if n <= 0:
            raise CheckpointError(f"cannot read tower tensors from {name}: the file ends at byte {offset + pos}")
        pos += n


def _read_shard(shard: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(shard, framework="pt") as f:
            return {key[len(TOWER_PREFIX):]: f.get_tensor(key) for key in keys}
    except Exception as e:  # safetensors raises several types for a bad file
        raise CheckpointError(f"cannot read tower tensors from {shard}: {e}") from e


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
