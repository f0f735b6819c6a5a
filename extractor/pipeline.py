"""The job: manifest rows → decode workers → windows → packed batches → device → Parquet parts.

Threads and processes, and what each owns:
  decode workers (processes)  read and resample audio; a crash or hang costs only its file
  producer thread             turns decoded rows into windows, sorts them by length in a pool
                              of a few batches' worth, packs batches (host-side numpy)
  main thread                 the device loop: copy, log-mel, encoder, pooled sums back
  writer thread               accumulates finished rows and failures, commits parts
Queues between them are bounded, so host memory stays flat however long the manifest is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from . import __version__
from .batching import Batch, Window, make_batch, plan_batches, split_windows
from .constants import OUTPUT_FRAME_RATE_HZ, SAMPLE_RATE, encoder_tokens, mel_frames
from .decode import DecodeRequest
from .embed import encode_batch, to_device
from .manifest import Manifest, ManifestSpec, read_manifest, shard_of
from .model import LoadedModel, load_model, resolve_device, resolve_dtype
from .output import OutputDir, Shard
from .progress import Progress
from .recipe import METADATA_KEY, Recipe
from .workers import DecodePool, WorkerFailure

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_UNEXPECTED, EXIT_CONFIG, EXIT_FAILURE_RATE = 0, 1, 2, 3
MAX_SEGMENTS_PER_REQUEST = 64  # rows of one file decoded together (the file is read once)


@dataclass(frozen=True)
class JobOptions:
    manifest: ManifestSpec
    output: str
    model: str
    adapter: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    padding_mask: bool = True
    pooling: str = "mean"  # mean | none
    output_dtype: str = "float32"
    part_rows: int = 10_000
    part_bytes: int = 256 << 20
    commit_seconds: float = 60.0
    max_failure_rate: float = 0.01
    retry_failed: bool = False
    decode_workers: int | None = None  # None: one per core, leaving one for the device loop
    decode_timeout_s: float = 120.0
    max_duration_s: float = 4 * 3600.0
    token_budget: int | None = None  # None: device default
    shard: Shard = Shard()
    progress: bool = True


@dataclass
class Summary:
    output: str
    rows_total: int = 0
    skipped: int = 0  # already done (embedded or failed) before this run
    embedded: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    failure_rate: float = 0.0
    complete: bool = False
    # device-side figures, for the benchmark and for operators sizing a fleet
    time_to_first_batch_s: float | None = None
    steady_audio_seconds: float = 0.0
    steady_wall_seconds: float = 0.0
    useful_flops: float = 0.0
    steady_useful_flops: float = 0.0
    gpu_peak_mem_gb: float | None = None
    device: str = ""
    batches: int = 0
    oom_retries: int = 0
    device_idle_fraction: float | None = None

    @property
    def audio_seconds_per_second(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def line(self) -> str:
        return (
            f"done: {self.embedded} embedded, {self.failed} failed, {self.skipped} skipped of {self.rows_total} rows; "
            f"{self.audio_seconds / 3600:.3f} h audio in {self.wall_seconds:.1f} s "
            f"({self.audio_seconds_per_second:,.1f} audio-s/s); output {self.output}"
        )

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["audio_seconds_per_second"] = self.audio_seconds_per_second
        return d


def window_flops(n_mel: int, tokens: int, cfg) -> float:
    """Useful FLOPs of one window by the shared cost formula (real audio only)."""
    D, L = cfg.d_model, cfg.encoder_layers
    return 2 * cfg.num_mel_bins * D * 3 * n_mel + 2 * D * D * 3 * tokens + L * (24 * tokens * D * D + 4 * tokens * tokens * D)


def default_decode_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def default_token_budget(device: torch.device) -> int:
    # GPU: ~32k tokens per batch fills an H100's GEMMs (M ≥ 16k) while the fc1 activation stays
    # well under 1 GB in bf16. CPU: one full window; CPU batches hold one window each anyway.
    return 32_768 if device.type == "cuda" else 1_500


# ---------------------------------------------------------------------------------------------
# Results of one row, assembled from its windows
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


class PartWriter:
    """Collects finished rows and failures; commits a part when it is big or old enough."""

    def __init__(self, out: OutputDir, manifest: Manifest, pending: pl.DataFrame, recipe: Recipe, opts: JobOptions, d_model: int, progress: Progress):
        self.out, self.manifest, self.pending, self.recipe, self.opts, self.d_model = out, manifest, pending, recipe, opts, d_model
        self.progress = progress
        self.seq = out.next_seq()
        self.rows: list[tuple[int, np.ndarray, np.ndarray | None, float]] = []
        self.failures: list[tuple[int, str]] = []
        self.bytes = 0
        self.first_at: float | None = None
        self.embedded = self.failed = 0
        self.audio_s = 0.0
        self._q: queue.Queue = queue.Queue(maxsize=4096)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="writer", daemon=True)
        self._kept = list(opts.manifest.keep_columns)
        self._meta = {METADATA_KEY: recipe.to_json().encode()}

    def start(self) -> None:
        self._thread.start()

    def put_row(self, item, emb, frames, duration) -> None:
        self._check()
        self._q.put(("row", (item, emb, frames, duration)))

    def put_failure(self, item: int, error: str) -> None:
        self._check()
        self._q.put(("fail", (item, error)))

    def close(self) -> None:
        self._q.put(("close", None))
        self._thread.join()
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing the output failed: {self.error}") from self.error

    def _loop(self) -> None:
        try:
            while True:
                try:
                    kind, payload = self._q.get(timeout=1.0)
                except queue.Empty:
                    kind, payload = "tick", None
                if kind == "row":
                    self.rows.append(payload)
                    self.bytes += payload[1].nbytes + (payload[2].nbytes if payload[2] is not None else 0)
                    self.first_at = self.first_at or time.monotonic()
                elif kind == "fail":
                    self.failures.append(payload)
                    self.first_at = self.first_at or time.monotonic()
                elif kind == "close":
                    self._commit()
                    return
                n = len(self.rows) + len(self.failures)
                if n and (
                    n >= self.opts.part_rows
                    or self.bytes >= self.opts.part_bytes
                    or time.monotonic() - self.first_at >= self.opts.commit_seconds
                ):
                    self._commit()
        except BaseException as e:  # surfaced to the device loop through _check()
            logger.error("writer failed: %s", e)
            self.error = e
            # Keep draining so producers never block on a dead writer.
            while True:
                try:
                    if self._q.get(timeout=0.1)[0] == "close":
                        return
                except queue.Empty:
                    continue

    def _commit(self) -> None:
        name = f"part-{self.out.shard.tag}-{self.seq:06d}.parquet"
        if self.rows:
            self.out.commit_table(self._rows_table(), name, failures=False)
        if self.failures:
            self.out.commit_table(self._failures_table(), name, failures=True)
        if self.rows or self.failures:
            self.seq += 1
            audio = sum(r[3] for r in self.rows)
            self.embedded += len(self.rows)
            self.failed += len(self.failures)
            self.audio_s += audio
            self.progress.update(len(self.rows) + len(self.failures), len(self.failures), audio)
        self.rows, self.failures, self.bytes, self.first_at = [], [], 0, None

    def _rows_table(self) -> pa.Table:
        items = [r[0] for r in self.rows]
        base = self.pending[items]
        np_dtype = np.float16 if self.opts.output_dtype == "float16" else np.float32
        pa_type = pa.float16() if self.opts.output_dtype == "float16" else pa.float32()
        emb = np.stack([r[1] for r in self.rows]).astype(np_dtype)
        cols = {
            "id": self.manifest.to_arrow("id", base["id"]),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa_type), self.d_model),
            "duration_s": pa.array([r[3] for r in self.rows], type=pa.float64()),
        }
        if self.opts.pooling == "none":
            counts = np.array([len(r[2]) for r in self.rows], dtype=np.int32)
            flat = np.concatenate([r[2] for r in self.rows]).astype(np_dtype)
            inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa_type), self.d_model)
            offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
            cols["frames"] = pa.ListArray.from_arrays(offsets, inner)
            cols["frame_rate_hz"] = pa.array(np.full(len(items), OUTPUT_FRAME_RATE_HZ), type=pa.float64())
        for c in self._kept:
            cols[c] = self.manifest.to_arrow(c, base[c])
        return pa.table(cols).replace_schema_metadata(self._meta)

    def _failures_table(self) -> pa.Table:
        items = [f[0] for f in self.failures]
        base = self.pending[items]
        return pa.table(
            {"id": self.manifest.to_arrow("id", base["id"]), "path": self.manifest.to_arrow("path", base["path"]), "error": pa.array([f[1] for f in self.failures], type=pa.string())}
        ).replace_schema_metadata(self._meta)


# ---------------------------------------------------------------------------------------------
# Producer: decoded rows → windows → batches
# ---------------------------------------------------------------------------------------------


def decode_requests(pending: pl.DataFrame, max_duration_s: float):
    """(items, DecodeRequest) per file; consecutive rows of one file share one request."""
    paths = pending["path"].to_list()
    starts = pending["start_s"].to_list() if "start_s" in pending.columns else [None] * len(paths)
    ends = pending["end_s"].to_list() if "end_s" in pending.columns else [None] * len(paths)
    i = 0
    while i < len(paths):
        j = i + 1
        while j < len(paths) and paths[j] == paths[i] and j - i < MAX_SEGMENTS_PER_REQUEST:
            j += 1
        items = list(range(i, j))
        yield items, DecodeRequest(paths[i], [(starts[k], ends[k]) for k in items], max_duration_s)
        i = j


class Producer(threading.Thread):
    def __init__(self, pending, opts: JobOptions, results: RowResults, writer: PartWriter, budget: "Budget", workers: int, max_windows: int):
        super().__init__(name="producer", daemon=True)
        self.pending, self.opts, self.results, self.writer, self.budget = pending, opts, results, writer, budget
        self.workers, self.max_windows = workers, max_windows
        self.batches: queue.Queue = queue.Queue(maxsize=3)
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def _emit(self, windows: list[Window]) -> None:
        for group in plan_batches(windows, token_budget=self.budget.tokens, max_windows=self.max_windows):
            batch = make_batch(group)
            while not self.stop.is_set():
                try:
                    self.batches.put(batch, timeout=0.5)
                    break
                except queue.Full:
                    continue

    def run(self) -> None:
        try:
            pool_tokens = 0
            windows: list[Window] = []
            with DecodePool(self.workers, timeout_s=self.opts.decode_timeout_s) as pool:
                for items, result in pool.imap(decode_requests(self.pending, self.opts.max_duration_s)):
                    if self.stop.is_set():
                        return
                    per_item = [result] * len(items) if isinstance(result, WorkerFailure) else result
                    for item, res in zip(items, per_item):
                        if isinstance(res, WorkerFailure):
                            self.writer.put_failure(item, res.error)
                            continue
                        if isinstance(res, BaseException):
                            self.writer.put_failure(item, f"{type(res).__name__}: {res}")
                            continue
                        ws = split_windows(item, res.samples, padding_mask=self.opts.padding_mask)
                        if not ws:
                            self.writer.put_failure(
                                item, f"TooShort: {self.pending['path'][item]} is too short ({res.duration_s * 1000:.1f} ms) for one output frame"
                            )
                            continue
                        self.results.register(item, len(ws), res.duration_s)
                        windows.extend(ws)
                        pool_tokens += sum(w.tokens for w in ws)
                    # Sort within a pool of a few batches: little padding, bounded memory.
                    if pool_tokens >= 4 * self.budget.tokens:
                        self._emit(windows)
                        windows, pool_tokens = [], 0
            if windows:
                self._emit(windows)
        except BaseException as e:
            self.error = e
            logger.error("producer failed: %s", e, exc_info=True)
        finally:
            self.batches.put(None)


@dataclass
class Budget:
    tokens: int


# ---------------------------------------------------------------------------------------------
# Device loop
# ---------------------------------------------------------------------------------------------


def _split(windows: list[Window]) -> list[list[Window]]:
    half = len(windows) // 2
    return [windows[:half], windows[half:]]


class DeviceLoop:
    """Runs batches; one batch stays in flight so the next one's copies and launches overlap."""

    def __init__(self, model: LoadedModel, results: RowResults, writer: PartWriter, budget: Budget, summary: Summary):
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
            event = torch.cuda.Event()
            event.record()
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
            self.budget.tokens = max(self.budget.tokens // 2, max(w.tokens for w in batch.windows))
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

    def run(self, producer: Producer, t0: float) -> None:
        inflight = []
        steady_start = None
        cfg = self.model.cfg
        idle = 0.0
        while True:
            t_wait = time.monotonic()
            batch = producer.batches.get()
            waited = time.monotonic() - t_wait
            if batch is None:
                break
            if self.summary.time_to_first_batch_s is None:
                self.summary.time_to_first_batch_s = time.monotonic() - t0
            elif steady_start is not None:
                idle += waited
            flops = sum(window_flops(mel_frames(len(w.samples)), encoder_tokens(mel_frames(len(w.samples))), cfg) for w in batch.windows)
            audio = sum(len(w.samples) for w in batch.windows) / SAMPLE_RATE
            self.summary.useful_flops += flops
            launched = self._launch_with_backoff(batch)
            for item in inflight:
                self._finish(item)
            inflight = launched
            if steady_start is None:
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
        if steady_start is not None:
            self.summary.steady_wall_seconds = time.monotonic() - steady_start
            if self.summary.steady_wall_seconds > 0:
                self.summary.device_idle_fraction = idle / self.summary.steady_wall_seconds


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """Usage or configuration problem found before any work (exit 2)."""


def build_recipe(model: LoadedModel, opts: JobOptions) -> Recipe:
    return Recipe(
        model_fingerprint=model.model_fingerprint,
        adapter_fingerprint=model.adapter.fingerprint if model.adapter else None,
        d_model=model.cfg.d_model,
        padding_mask=opts.padding_mask,
        dtype=str(model.dtype).removeprefix("torch."),
        pooling=opts.pooling,
        output_dtype=opts.output_dtype,
        package_version=__version__,
    )


def pending_rows(manifest: pl.DataFrame, out: OutputDir, *, include_failed: bool) -> tuple[pl.DataFrame, int, int]:
    """(rows still to do, rows already embedded, rows already failed) for this manifest."""
    done_ids = out.read_ids(out.part_files())
    failed_ids = out.read_ids(out.failure_files())
    pending = manifest
    counts = []
    for ids, exclude in ((done_ids, True), (failed_ids, not include_failed)):
        if ids is None:
            counts.append(0)
            continue
        s = pl.from_arrow(ids).alias("id").cast(manifest.schema["id"])
        hit = manifest.filter(pl.col("id").is_in(s.implode()))
        counts.append(len(hit))
        if exclude:
            pending = pending.filter(~pl.col("id").is_in(s.implode()))
    return pending, counts[0], counts[1]


def run_job(opts: JobOptions, model: LoadedModel | None = None) -> Summary:
    t0 = time.monotonic()
    source = read_manifest(opts.manifest)
    manifest = source.rows
    if opts.shard.count > 1:
        manifest = manifest.filter(shard_of(manifest["id"], opts.shard.count) == opts.shard.index)
    device = resolve_device(opts.device)
    if model is None:
        model = load_model(Path(opts.model), Path(opts.adapter) if opts.adapter else None, device, resolve_dtype(opts.dtype, device))
    recipe = build_recipe(model, opts)
    out = OutputDir(opts.output, opts.shard)
    summary = Summary(output=str(out.root), rows_total=len(manifest), device=torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu")

    if out.existing_recipe() is not None:
        out.check_recipe(recipe)
    pending, n_done, n_failed = pending_rows(manifest, out, include_failed=opts.retry_failed)
    summary.skipped = n_done + (0 if opts.retry_failed else n_failed)
    if not len(pending) and out.existing_recipe() is not None and (out.root / opts.shard.marker).exists() and out.is_complete():
        return _finish_summary(summary, t0, n_failed, opts, noop=True)

    lock = out.open_for_writing(recipe)
    try:
        # Re-read under the lock: a run that just finished may have committed more.
        if opts.retry_failed:
            dropped = out.drop_failures()
            if dropped:
                logger.info("--retry-failed: %d failed rows are pending again", dropped)
        pending, n_done, n_failed = pending_rows(manifest, out, include_failed=opts.retry_failed)
        summary.skipped = n_done + (0 if opts.retry_failed else n_failed)
        if len(pending):
            out.clear_markers()
            logger.info("%d rows to embed (%d already embedded, %d failed earlier) → %s", len(pending), n_done, n_failed, out.root)
            _stream(source, pending, opts, model, out, recipe, summary, t0)
        out.write_markers()
        summary.complete = out.is_complete()
    finally:
        lock.release()
    _, _, n_failed_total = pending_rows(manifest, out, include_failed=True)
    return _finish_summary(summary, t0, n_failed_total, opts)


def _finish_summary(summary: Summary, t0: float, failed_total: int, opts: JobOptions, noop: bool = False) -> Summary:
    summary.wall_seconds = time.monotonic() - t0
    summary.failure_rate = failed_total / summary.rows_total if summary.rows_total else 0.0
    summary.complete = summary.complete or noop
    if noop:
        logger.info("nothing to do: every row of the manifest is already in %s", summary.output)
    logger.info(summary.line())
    return summary


def _stream(source: Manifest, pending: pl.DataFrame, opts: JobOptions, model: LoadedModel, out: OutputDir, recipe: Recipe, summary: Summary, t0: float) -> None:
    progress = Progress(len(pending), enabled=opts.progress)
    results = RowResults(model.cfg.d_model, keep_frames=opts.pooling == "none")
    writer = PartWriter(out, source, pending, recipe, opts, model.cfg.d_model, progress)
    budget = Budget(opts.token_budget or default_token_budget(model.device))
    # CPU: one window per batch, so a row's numbers never depend on which rows shared its batch
    # (CPU GEMMs are not batch-invariant; measured 7.6e-6 differences) and a resumed run gives
    # bit-identical embeddings. GPUs pack as many windows as the budget allows.
    max_windows = 1 if model.device.type == "cpu" else 4096
    workers = opts.decode_workers if opts.decode_workers is not None else default_decode_workers()
    producer = Producer(pending, opts, results, writer, budget, workers, max_windows)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    writer.start()
    producer.start()
    try:
        DeviceLoop(model, results, writer, budget, summary).run(producer, t0)
    except BaseException:
        producer.stop.set()
        raise
    finally:
        producer.join(timeout=30)
        progress.close()
    writer.close()
    if producer.error is not None:
        raise RuntimeError(f"decoding failed: {producer.error}") from producer.error
    summary.embedded, summary.failed, summary.audio_seconds = writer.embedded, writer.failed, writer.audio_s
    if model.device.type == "cuda":
        summary.gpu_peak_mem_gb = torch.cuda.max_memory_allocated(model.device) / 1e9
