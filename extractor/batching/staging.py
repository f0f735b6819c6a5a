"""Hand-over from the producer thread to the device loop: a token budget and pinned staging slots.

Torch is imported only when a slot is first filled: the producer starts decoding before the job
has imported torch or loaded its model (pipeline.Pipeline), and needs none of this until then.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from ..constants import MAX_TOKENS
from .packing import Batch, Staged

GPU_TOKEN_BUDGET = 32_768  # ~32k tokens fill an H100's GEMMs (M ≥ 16k) while fc1's activation stays
# well under 1 GB in bf16; 16k and 64k measured slower on an H200.
GPU_MAX_WINDOWS = 4096


def default_token_budget(device) -> int:
    # CPU: one full window per batch (see default_max_windows).
    return GPU_TOKEN_BUDGET if device.type == "cuda" else MAX_TOKENS


def default_max_windows(device) -> int:
    # CPU: one window per batch, so a row's numbers never depend on which rows shared its batch
    # (CPU GEMMs are not batch-invariant; measured 7.6e-6 differences) and a resumed run gives
    # bit-identical embeddings. GPUs pack as many windows as the budget allows.
    return 1 if device.type == "cpu" else GPU_MAX_WINDOWS


class Budget:
    """Encoder tokens per batch; shared with the producer, halved on out-of-memory."""

    def __init__(self, tokens: int):
        self.tokens = tokens


@dataclass(frozen=True)
class Lane:
    """What the producer needs of the device, handed over once it is known: the token budget
    (which the device loop halves on out-of-memory), the staging slots, the windows a batch may hold."""

    budget: Budget
    staging: Staging
    max_windows: int

    @classmethod
    def for_device(cls, device, token_budget: int | None, slots: int) -> Lane:
        return cls(Budget(token_budget or default_token_budget(device)), Staging(device, slots), default_max_windows(device))


class Staging:
    """Pinned host slots the producer packs batches into, reused once their copy is done.

    Pinning is what makes a host → device copy asynchronous; pinning a fresh 40 MB array per
    batch costs more than the copy itself, so slots are allocated once (grown if a batch needs
    more) and each remembers the event after its last copy. On the CPU, slots are plain arrays.
    """

    def __init__(self, device, slots: int):
        self.cuda = device.type == "cuda"
        self._free: queue.Queue = queue.Queue()
        for i in range(slots):
            self._free.put(_Slot(i))

    def acquire(self, n_waves: int, n_index: int, stop: threading.Event) -> _Slot:
        while True:
            try:
                slot = self._free.get(timeout=0.2)
                break
            except queue.Empty:
                if stop.is_set():
                    raise Stopped from None
        if slot.event is not None:
            slot.event.synchronize()  # its last copy to the device is done
            slot.event = None
        slot.ensure(n_waves, n_index, self.cuda)
        return slot

    def release(self, slot: _Slot, event) -> None:
        slot.event = event
        self._free.put(slot)


class Stopped(Exception):
    """The run is stopping: whoever waits for a slot or a queue gives up."""


class _Slot:
    def __init__(self, i: int):
        self.i = i
        self.waves = None  # a torch float32 tensor, flat (pinned on CUDA)
        self.index = None  # a torch int64 tensor, flat
        self.event = None

    def ensure(self, n_waves: int, n_index: int, pin: bool) -> None:
        import torch

        if self.waves is None or self.waves.numel() < n_waves:
            self.waves = torch.empty(int(n_waves * 1.25), dtype=torch.float32, pin_memory=pin)
        if self.index is None or self.index.numel() < n_index:
            self.index = torch.empty(int(n_index * 1.25), dtype=torch.int64, pin_memory=pin)


INDEX_KEYS = ("keep_frames", "token_index", "position_index", "cu_seqlens", "pool_index", "frame_window")


def stage(batch: Batch, staging: Staging, stop: threading.Event) -> None:
    """Pack `batch` into a staging slot (the producer thread's side of the hand-over)."""
    idx = batch.indices()
    n_index = sum(len(idx[k]) for k in INDEX_KEYS)
    slot = staging.acquire(batch.size * batch.padded_samples(), n_index, stop)
    waves = batch.fill_waves(slot.waves.numpy())
    flat = slot.index.numpy()
    offsets, pos = {}, 0
    for k in INDEX_KEYS:
        flat[pos : pos + len(idx[k])] = idx[k]
        offsets[k] = (pos, len(idx[k]))
        pos += len(idx[k])
    batch.staged = Staged(slot, waves.shape, offsets, pos)
    batch.samples = []  # the received blocks they point into can go


