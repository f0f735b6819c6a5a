"""The device loop: packed batches in, pooled window sums out, with one batch kept in flight.

The loop runs on the thread that owns the device, and does as little Python as a batch allows:
the producer thread has already packed the batch and copied its waveforms into a pinned staging
slot (Staging), so the loop copies to the device, launches log-mel and the encoder, and while the
device computes it finishes the previous batch (a pinned copy back, then pooling).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from ..constants import MAX_TOKENS, SAMPLE_RATE
from ..model.encoder import PackedSeqs
from ..model.load import LoadedModel
from ..summary import DeviceStats
from .packing import Batch
from .staging import Lane, Staging, stage

logger = logging.getLogger(__name__)

RSS_SAMPLE_S = 10.0  # host memory is sampled this often into the summary
def host_rss_gb() -> float:
    """Resident memory of this process (Linux), to show it stays flat over a long run."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:
        return float("nan")


@torch.inference_mode()
def forward(model: LoadedModel, batch: Batch, waves: torch.Tensor, ix: dict[str, torch.Tensor], pooling) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, D) float32, frames (N, D) float32) on the device, for a batch's (B, S) waveforms
    and index arrays already there: each window's valid output frames, and the pooling
    strategy's reduction of them (extractor.pooling)."""
    mel = model.logmel(waves, ix["keep_frames"]).to(model.dtype)  # (B, n_mels, F)
    tokens = model.encoder.embed_tokens(mel, ix["token_index"], ix["position_index"])  # (T, D)
    lengths = batch.tokens.tolist()
    # Only full 30 s windows (podcasts' middles, --no-padding-mask): one dense attention call.
    dense = waves.is_cuda and batch.size > 1 and min(lengths) == MAX_TOKENS
    seqs = PackedSeqs(ix["cu_seqlens"].to(torch.int32), lengths, batch.max_tokens, dense)
    frames = model.encoder(tokens, seqs, ix["pool_index"]).float()  # (N, D)
    return pooling.reduce(frames, ix["frame_window"], batch.size), frames


def run_batch(model: LoadedModel, batch: Batch, pooling) -> tuple[np.ndarray, np.ndarray]:
    """One batch, synchronously, no staging: (values (B, D), frames (N, D)) on the host. For the
    notebook API and tests; the job's device loop overlaps this with the next batch."""
    waves = batch.fill_waves(np.empty(batch.size * batch.padded_samples(), np.float32))
    ix = {k: torch.from_numpy(v).to(model.device) for k, v in batch.indices().items()}
    values, frames = forward(model, batch, torch.from_numpy(waves).to(model.device), ix, pooling)
    return values.cpu().numpy(), frames.cpu().numpy()


class DeviceLoop:
    """Runs batches from a queue; the one thread that touches the device."""

    def __init__(self, model: LoadedModel, lane: Lane, stats: DeviceStats, pooling,
                 on_batch: Callable[[Batch, np.ndarray, np.ndarray | None], None], on_first_batch: Callable[[], None] = lambda: None):
        self.model, self.budget, self.staging, self.stats = model, lane.budget, lane.staging, stats
        self.pooling, self.on_batch, self.on_first_batch = pooling, on_batch, on_first_batch
        self.keep_frames = pooling.keeps_frames
        self.cuda = model.device.type == "cuda"
        self._stream = torch.cuda.current_stream(model.device) if self.cuda else None
        # Host → device copies on their own stream, so the next batch's ~40 MB of waveforms cross
        # PCIe while the current one computes, instead of stalling the compute stream (~2 ms a batch).
        self._copies = torch.cuda.Stream(model.device) if self.cuda else None

    @torch.inference_mode()
    def _launch(self, batch: Batch):
        dev = self.model.device
        staged = batch.staged
        slot, (B, S) = staged.slot, staged.waves_shape
        if self.cuda:
            with torch.cuda.stream(self._copies):
                waves = slot.waves[: B * S].view(B, S).to(dev, non_blocking=True)
                flat = slot.index[: staged.n_index].to(dev, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self._copies)
            self._stream.wait_event(copied)
            # Made on the copy stream, used on the compute stream: the allocator must know.
            waves.record_stream(self._stream)
            flat.record_stream(self._stream)
        else:
            waves = slot.waves[: B * S].view(B, S)
            flat = slot.index[: staged.n_index]
        ix = {k: flat[a : a + n] for k, (a, n) in staged.offsets.items()}
        self.stats.fused_batches += self.model.encoder.fused_add_layer_norm  # it turns on, never off
        sums, frames = forward(self.model, batch, waves, ix, self.pooling)
        # Launched: the producer may refill the slot once its copy is done (an out-of-memory error
        # above leaves it held, for _halves to read back).
        self.staging.release(slot, copied if self.cuda else None)
        if not self.cuda:
            return batch, sums, frames if self.keep_frames else None, None
        host_sums = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
        host_sums.copy_(sums, non_blocking=True)
        host_frames = None
        if self.keep_frames:
            host_frames = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
            host_frames.copy_(frames, non_blocking=True)
        done = torch.cuda.Event()
        done.record(self._stream)
        return batch, host_sums, host_frames, done

    def _finish(self, inflight) -> None:
        batch, sums, frames, event = inflight
        if event is not None:
            event.synchronize()
        self.on_batch(batch, sums.numpy(), None if frames is None else frames.numpy())
        self.stats.batches += 1
        self.stats.last_batch_at = time.monotonic()

    def _launch_with_backoff(self, batch: Batch) -> list:
        """Launch a batch; on out-of-memory halve the budget and split it, never losing a window."""
        try:
            return [self._launch(batch)]
        except torch.cuda.OutOfMemoryError:
            if batch.size == 1:
                raise
            torch.cuda.synchronize(self.model.device)
            torch.cuda.empty_cache()
            self.budget.tokens = max(self.budget.tokens // 2, MAX_TOKENS)
            self.stats.oom_retries += 1
            logger.warning("out of GPU memory on a batch of %d windows (%d tokens); retrying in halves, token budget now %d",
                           batch.size, batch.num_tokens, self.budget.tokens)
            out = []
            halves = _halves(batch, self.staging)
            self.staging.release(batch.staged.slot, None)
            for half in halves:
                out.extend(self._launch_with_backoff(half))
                while len(out) > 1:  # halves must not pile up on a full device
                    self._finish(out.pop(0))
            return out

    def run(self, batches: queue.Queue, handle: Callable[[object], None], stop: threading.Event, t0: float) -> None:
        """Consume `batches` until None (or `stop`); other queue items (the rows' records) go to
        `handle`, in their order among the batches.

        t0: the process's launch on the monotonic clock, for time to first batch."""
        inflight: list = []
        steady_start = None
        last_rss = time.monotonic()
        idle = 0.0
        st = self.stats
        while True:
            t_wait = time.monotonic()
            try:
                item = batches.get(timeout=0.2)
            except queue.Empty:
                if stop.is_set():
                    break
                if steady_start is not None:
                    idle += time.monotonic() - t_wait
                continue
            if steady_start is not None:
                idle += time.monotonic() - t_wait
            if item is None:
                break
            if not isinstance(item, Batch):
                handle(item)
                continue
            if st.time_to_first_batch_s is None:
                self.on_first_batch()
                if stop.is_set():  # stopped while it started: the batch is left to a rerun
                    break
                st.time_to_first_batch_s = time.monotonic() - t0
                logger.info("first batch on the device %.1f s after launch", st.time_to_first_batch_s)
            st.useful_flops += item.flops
            launched = self._launch_with_backoff(item)
            for f in inflight:
                self._finish(f)
            inflight = launched
            if time.monotonic() - last_rss >= RSS_SAMPLE_S:
                last_rss = time.monotonic()
                st.host_rss_gb_samples.append(round(host_rss_gb(), 3))
            if steady_start is None:
                # The fused add + LayerNorm compiles now, on its own thread, not before the first
                # batch: that batch waits for no compiler, and later ones take it once it is ready.
                self.model.encoder.compile_kernels()
                st.host_rss_gb_first_batch = host_rss_gb()
                # Steady state starts once the first batch is back: compilation, warm-up and the
                # decode pipeline's fill are behind us.
                for f in inflight:
                    self._finish(f)
                inflight = []
                steady_start = time.monotonic()
            else:
                st.steady_useful_flops += item.flops
                st.steady_audio_seconds += item.audio_samples / SAMPLE_RATE
            if stop.is_set():
                break
        for f in inflight:
            self._finish(f)
        st.host_rss_gb_end = host_rss_gb()
        if steady_start is not None:
            st.steady_wall_seconds = time.monotonic() - steady_start
            if st.steady_wall_seconds > 0:
                st.device_idle_fraction = idle / st.steady_wall_seconds


def _halves(batch: Batch, staging: Staging) -> list[Batch]:
    """Split a staged batch in two, restaged (its waveforms are read back from its slot)."""
    B, S = batch.staged.waves_shape
    waves = batch.staged.slot.waves[: B * S].view(B, S).numpy().copy()
    never = threading.Event()
    out = []
    for sel in (slice(0, B // 2), slice(B // 2, B)):
        half = Batch(batch.items[sel], batch.index[sel], batch.tokens[sel], batch.outs[sel], [])
        half.samples = [waves[b, : half.padded_samples()] for b in range(B)[sel]]  # zeros past the audio
        stage(half, staging, never)
        out.append(half)
    return out
