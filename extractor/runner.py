"""The device loop: packed batches in, per-row embeddings out, with one batch kept in flight."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .batching import Batch, Window, make_batch
from .constants import MAX_TOKENS, SAMPLE_RATE, encoder_tokens, mel_frames
from .embed import encode_batch, to_device
from .model import LoadedModel

if TYPE_CHECKING:
    from .pipeline import Summary
    from .writer import PartWriter

logger = logging.getLogger(__name__)


RSS_SAMPLE_S = 10.0  # host memory is sampled this often into the summary


def host_rss_gb() -> float:
    """Resident memory of this process (Linux), to show it stays flat over a long run."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:
        return float("nan")


def process_age_s() -> float:
    """Seconds since this process was launched (Linux /proc), imports included."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def window_flops(n_mel: int, tokens: int, cfg) -> float:
    """Useful FLOPs of one window by the shared cost formula (real audio only)."""
    D, L = cfg.d_model, cfg.encoder_layers
    return 2 * cfg.num_mel_bins * D * 3 * n_mel + 2 * D * D * 3 * tokens + L * (24 * tokens * D * D + 4 * tokens * tokens * D)


@dataclass
class Budget:
    """Encoder tokens per batch; shared with the producer, halved on out-of-memory."""

    tokens: int


def default_token_budget(device: torch.device) -> int:
    # GPU: ~32k tokens per batch fills an H100's GEMMs (M ≥ 16k) while the fc1 activation stays
    # well under 1 GB in bf16 (16k and 64k measured slower on an H200). CPU: one full window.
    return 32_768 if device.type == "cuda" else MAX_TOKENS


def default_max_windows(device: torch.device) -> int:
    # CPU: one window per batch, so a row's numbers never depend on which rows shared its batch
    # (CPU GEMMs are not batch-invariant; measured 7.6e-6 differences) and a resumed run gives
    # bit-identical embeddings. GPUs pack as many windows as the budget allows.
    return 1 if device.type == "cpu" else 4096


@dataclass
class RowState:
    windows_left: int
    duration_s: float
    sum: np.ndarray | None = None
    frames: int = 0
    frame_parts: dict[int, np.ndarray] = field(default_factory=dict)


class RowResults:
    """Thread-safe accumulator: window outputs in, finished rows out."""

    def __init__(self, d_model: int, keep_frames: bool):
        self.d_model = d_model
        self.keep_frames = keep_frames
        self._rows: dict[int, RowState] = {}
        self._lock = threading.Lock()

    def register(self, item: int, n_windows: int, duration_s: float) -> None:
        with self._lock:
            self._rows[item] = RowState(n_windows, duration_s)

    def add(self, window: Window, window_sum: np.ndarray, frames: np.ndarray | None):
        """Returns (item, embedding, frames, duration) when this was the item's last window."""
        with self._lock:
            st = self._rows[window.item]
            st.sum = window_sum.astype(np.float64) if st.sum is None else st.sum + window_sum
            st.frames += window.out
            if frames is not None:
                st.frame_parts[window.index] = frames
            st.windows_left -= 1
            if st.windows_left:
                return None
            del self._rows[window.item]
        emb = (st.sum / st.frames).astype(np.float32)
        all_frames = np.concatenate([st.frame_parts[i] for i in sorted(st.frame_parts)]) if self.keep_frames else None
        return window.item, emb, all_frames, st.duration_s


def _split(windows: list[Window]) -> list[list[Window]]:
    half = len(windows) // 2
    return [windows[:half], windows[half:]]


class DeviceLoop:
    """Runs batches; one batch stays in flight so the next one's copies and launches overlap."""

    def __init__(self, model: LoadedModel, results: RowResults, writer: "PartWriter", budget: Budget, summary: "Summary"):
        self.model, self.results, self.writer, self.budget, self.summary = model, results, writer, budget, summary
        self.keep_frames = results.keep_frames
        self.cuda = model.device.type == "cuda"

    def _launch(self, batch: Batch):
        dev = to_device(batch, self.model.device)
        sums, frames = encode_batch(self.model, batch, dev, keep_frames=self.keep_frames)
        if self.cuda:
            host_sums = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            host_sums.copy_(sums, non_blocking=True)
            host_frames = None
            if frames is not None:
                host_frames = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
                host_frames.copy_(frames, non_blocking=True)
            # Record on the model's device's stream: with --device cuda:1 the current device may be 0.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.model.device))
            return batch, host_sums, host_frames, event
        return batch, sums, frames, None

    def _finish(self, inflight) -> None:
        batch, sums, frames, event = inflight
        if event is not None:
            event.synchronize()
        sums = sums.numpy()
        frames = frames.numpy() if frames is not None else None
        for j, w in enumerate(batch.windows):
            f = frames[batch.frame_window == j] if frames is not None else None
            done = self.results.add(w, sums[j], f)
            if done is not None:
                self.writer.put_row(*done)
        self.summary.batches += 1

    def _launch_with_backoff(self, batch: Batch) -> list:
        """Launch a batch; on out-of-memory halve the budget and split it, never losing a window."""
        try:
            return [self._launch(batch)]
        except torch.cuda.OutOfMemoryError:
            if len(batch.windows) == 1:
                raise
            torch.cuda.empty_cache()
            self.budget.tokens = max(self.budget.tokens // 2, MAX_TOKENS)
            self.summary.oom_retries += 1
            logger.warning("out of GPU memory on a batch of %d windows (%d tokens); retrying in halves, token budget now %d",
                           len(batch.windows), batch.num_tokens, self.budget.tokens)
            out = []
            for half in _split(batch.windows):
                out.extend(self._launch_with_backoff(make_batch(half)))
                # Finish all but the last immediately: halves must not pile up on a full device.
                while len(out) > 1:
                    self._finish(out.pop(0))
            return out

    def run(self, batches: queue.Queue, t0: float) -> None:
        """Consume `batches` until a None arrives; t0 is the job's start, for time to first batch."""
        inflight = []
        steady_start = None
        last_rss = time.monotonic()
        cfg = self.model.cfg
        idle = 0.0
        while True:
            t_wait = time.monotonic()
            batch = batches.get()
            waited = time.monotonic() - t_wait
            if batch is None:
                break
            if isinstance(batch, list):  # failure records from the producer
                for item, error in batch:
                    self.writer.put_failure(item, error)
                continue
            if self.summary.time_to_first_batch_s is None:
                self.summary.time_to_first_batch_s = time.monotonic() - t0
                logger.info("first batch on the device %.1f s after start", self.summary.time_to_first_batch_s)
            elif steady_start is not None:
                idle += waited
            flops = sum(window_flops(mel_frames(len(w.samples)), encoder_tokens(mel_frames(len(w.samples))), cfg) for w in batch.windows)
            audio = sum(len(w.samples) for w in batch.windows) / SAMPLE_RATE
            self.summary.useful_flops += flops
            launched = self._launch_with_backoff(batch)
            for item in inflight:
                self._finish(item)
            inflight = launched
            if time.monotonic() - last_rss >= RSS_SAMPLE_S:
                last_rss = time.monotonic()
                self.summary.host_rss_gb_samples.append(round(host_rss_gb(), 3))
            if steady_start is None:
                self.summary.host_rss_gb_first_batch = host_rss_gb()
                # Steady state starts once the first batch is back: compilation, warm-up and the
                # decode pipeline's fill are behind us.
                for item in inflight:
                    self._finish(item)
                inflight = []
                steady_start = time.monotonic()
            else:
                self.summary.steady_useful_flops += flops
                self.summary.steady_audio_seconds += audio
            self.writer._check()
        for item in inflight:
            self._finish(item)
        self.summary.host_rss_gb_end = host_rss_gb()
        if steady_start is not None:
            self.summary.steady_wall_seconds = time.monotonic() - steady_start
            if self.summary.steady_wall_seconds > 0:
                self.summary.device_idle_fraction = idle / self.summary.steady_wall_seconds


