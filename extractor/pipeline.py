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

import importlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch

from . import __version__
from .batching import Window, make_batch, plan_batches, split_windows
from .decode import DecodeRequest
from .lora import plain_config
from .manifest import Manifest, ManifestSpec, read_manifest
from .checkpoint import EncoderConfig, read_config
from .model import LoadedModel, load_model, resolve_device, resolve_dtype
from .output import OutputDir, Shard
from .progress import Progress
from .recipe import Recipe
from .runner import Budget, DeviceLoop, RowResults, default_max_windows, default_token_budget, process_age_s
from .writer import PartWriter
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
    max_duration_s: float = 2 * 3600.0
    token_budget: int | None = None  # None: device default
    shard: Shard = Shard()
    progress: bool = True
    # Called with (rows, failed, audio_s) per committed part, in the writer thread; how a worker
    # of `--devices` reports to its parent's one progress bar (extractor/multidevice.py).
    on_progress: Callable[[int, int, float], None] | None = None
    # "module:function" run in the decode workers instead of decode_request; for tests that need
    # a decoder which really crashes or hangs. Not a user-facing knob.
    decode_fn: str | None = None
    # fsspec options (credentials, endpoint) for "://" manifest, audio and output; None: the
    # filesystem's defaults, e.g. AWS_* environment variables for s3://.
    storage_options: dict | None = None


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
    host_rss_gb_first_batch: float | None = None
    host_rss_gb_end: float | None = None
    host_rss_gb_samples: list[float] = field(default_factory=list)  # every RSS_SAMPLE_S of the device loop

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


def default_decode_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 2) - 1))


# ---------------------------------------------------------------------------------------------
# Producer: decoded rows → windows → batches
# ---------------------------------------------------------------------------------------------


def decode_requests(pending: pl.DataFrame, max_duration_s: float, storage_options: dict | None = None):
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
        yield items, DecodeRequest(paths[i], [(starts[k], ends[k]) for k in items], max_duration_s, storage_options)
        i = j


class Producer(threading.Thread):
    """Decoded rows → windows → packed batches, onto `self.batches`.

    The queue carries Batch objects and, between them, lists of (item, error) failure records;
    the device loop forwards the failures to the writer. Failures travel with the batches so the
    producer can start before the writer exists: decoding overlaps model loading at startup.
    """

    def __init__(self, pending, opts: JobOptions, results: RowResults, budget: Budget, workers: int, max_windows: int):
        super().__init__(name="producer", daemon=True)
        self.pending, self.opts, self.results, self.budget = pending, opts, results, budget
        self.workers, self.max_windows = workers, max_windows
        self.batches: queue.Queue = queue.Queue(maxsize=4)  # ~40 MB of waveforms per GPU batch
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._failures: list[tuple[int, str]] = []

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.batches.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _fail(self, item: int, error: str) -> None:
        self._failures.append((item, error))
        if len(self._failures) >= 256:
            self._flush_failures()

    def _flush_failures(self) -> None:
        if self._failures:
            self._put(self._failures)
            self._failures = []

    def _emit(self, windows: list[Window]) -> None:
        self._flush_failures()
        for group in plan_batches(windows, token_budget=self.budget.tokens, max_windows=self.max_windows):
            self._put(make_batch(group))

    def run(self) -> None:
        try:
            pool_tokens, first = 0, True
            windows: list[Window] = []
            with DecodePool(self.workers, timeout_s=self.opts.decode_timeout_s, decode_fn=_resolve(self.opts.decode_fn)) as pool:
                for items, result in pool.imap(decode_requests(self.pending, self.opts.max_duration_s, self.opts.storage_options)):
                    if self.stop.is_set():
                        return
                    per_item = [result] * len(items) if isinstance(result, WorkerFailure) else result
                    for item, res in zip(items, per_item):
                        if isinstance(res, WorkerFailure):
                            self._fail(item, res.error)
                        elif isinstance(res, BaseException):
                            self._fail(item, f"{type(res).__name__}: {res}")
                        elif not (ws := split_windows(item, res.samples, padding_mask=self.opts.padding_mask)):
                            path = self.pending["path"][item]
                            self._fail(item, f"TooShort: {path} is too short ({res.duration_s * 1000:.1f} ms) for one output frame")
                        else:
                            self.results.register(item, len(ws), res.duration_s)
                            windows.extend(ws)
                            pool_tokens += sum(w.tokens for w in ws)
                    # Sort within a pool of a few batches: little padding, bounded memory. The
                    # first pool is one batch, so the device starts as early as possible.
                    if pool_tokens >= (1 if first else 4) * self.budget.tokens:
                        self._emit(windows)
                        windows, pool_tokens, first = [], 0, False
            if windows:
                self._emit(windows)
            self._flush_failures()
        except BaseException as e:
            self.error = e
            logger.error("producer failed: %s", e, exc_info=True)
        finally:
            # _put gives up once stopped: a blocking put on a full queue nobody reads any more (the
            # device loop died on a write fault, or the lock was refused) held the exit for 2 x 30 s.
            self._put(None)


def _resolve(spec: str | None):
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


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
        gelu="tanh-epilogue" if model.encoder.fused_gelu else "erf",
        package_version=__version__,
    )


def _in(manifest: pl.DataFrame, ids) -> pl.Expr:
    return pl.col("id").is_in(pl.from_arrow(ids).alias("id").cast(manifest.schema["id"]).implode())


def pending_rows(manifest: pl.DataFrame, out: OutputDir, *, include_failed: bool) -> tuple[pl.DataFrame, int, int]:
    """(rows still to do, rows already embedded, rows already failed) for this manifest."""
    done_ids = out.read_ids(out.part_files())
    failed_ids = out.read_ids(out.failure_files())
    pending = manifest
    n_done = n_failed = 0
    if done_ids is not None:
        n_done = manifest.filter(_in(manifest, done_ids)).height
        pending = pending.filter(~_in(manifest, done_ids))
    if failed_ids is not None:
        n_failed = manifest.filter(_in(manifest, failed_ids)).height
        if not include_failed:
            pending = pending.filter(~_in(manifest, failed_ids))
    return pending, n_done, n_failed


def failed_rows(manifest: pl.DataFrame, out: OutputDir) -> int:
    """Rows of this manifest with a failure record: the numerator of the failure rate. Reads only
    the failure files (the parts' ids, millions of them, are not needed for this)."""
    failed_ids = out.read_ids(out.failure_files())
    return 0 if failed_ids is None else manifest.filter(_in(manifest, failed_ids)).height


def _import_ahead(modules: list[str]) -> None:
    """Import what the device loop and the LoRA check will need, on a thread, during start-up."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # whoever needs it imports it again and reports the error
            logger.debug("importing %s ahead failed: %s", name, e)
        else:
            logger.debug("%s imported %.1f s after launch", name, process_age_s())


def run_job(opts: JobOptions, model: LoadedModel | None = None) -> Summary:
    # Clocks start at the process's launch, so wall time and time to first batch include imports.
    t0 = time.monotonic() - process_age_s()
    device = resolve_device(opts.device)
    # Slow imports, on a thread while the manifest is read, decoding starts and the tower loads
    # (measured on an H200 host): FlashAttention's varlen entry point (~1 s, it imports
    # torch._dynamo) is needed by the first batch. peft (and transformers under it, ~7 s) is
    # needed here only by an adapter that is not plain LoRA, before the first batch, or on CPU,
    # where the merge is checked in-process (a GPU job checks it in a child: extractor.lora).
    ahead = ["torch.nn.attention.varlen"] if device.type == "cuda" else []
    if opts.adapter and model is None and (device.type != "cuda" or not plain_config(Path(opts.adapter))):
        ahead.append("peft")
    if ahead:
        threading.Thread(target=_import_ahead, args=(ahead,), name="import-ahead", daemon=True).start()
    source = read_manifest(opts.manifest, opts.storage_options)
    manifest = source.shard_rows(opts.shard.index, opts.shard.count)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # else cuda:0 gets a context and the default streams
    dtype = resolve_dtype(opts.dtype, device)
    cfg = read_config(Path(opts.model)) if model is None else model.cfg
    out = OutputDir(opts.output, opts.shard, opts.storage_options)
    summary = Summary(output=str(out.root), rows_total=len(manifest), device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    pending, n_done, n_failed = pending_rows(manifest, out, include_failed=opts.retry_failed)

    # Decoding starts now, while the model loads; nothing is written until the lock is held.
    stream = Stream(source, pending, opts, cfg, device) if len(pending) else None
    logger.debug("manifest read and decoding started %.1f s after launch", process_age_s())
    try:
        if model is None:
            t = time.monotonic()
            # On a GPU the first batch does not wait for PEFT's check of the LoRA merge (the writer
            # does); a CPU run is not bound by start-up, and its first part waits for nothing.
            model = load_model(Path(opts.model), Path(opts.adapter) if opts.adapter else None, device, dtype,
                               defer_check=device.type == "cuda")
            logger.info("model loaded in %.1f s", time.monotonic() - t)
        recipe = build_recipe(model, opts)
        if out.existing_recipe() is not None:
            out.check_recipe(recipe)
        summary.skipped = n_done + (0 if opts.retry_failed else n_failed)
        if stream is None and out.existing_recipe() is not None and out.shard_done() and out.is_complete():
            return finish_summary(summary, t0, n_failed, noop=True)

        def embed(again: pl.DataFrame) -> None:
            nonlocal stream
            if stream is None or len(again) != len(stream.pending):
                # Another run committed rows since the first look: decode what is left instead.
                if stream is not None:
                    stream.stop()
                stream = Stream(source, again, opts, cfg, device)
            stream.run(model, out, recipe, summary, t0)

        run_locked(out, recipe, manifest, opts, summary, embed)
    finally:
        if stream is not None:
            stream.stop()
        if model is not None and model.adapter_check is not None:
            model.adapter_check.close()  # awaited by the writer if anything was written
    return finish_summary(summary, t0, failed_rows(manifest, out))


def run_locked(out: OutputDir, recipe: Recipe, manifest: pl.DataFrame, opts: JobOptions, summary: Summary,
               embed: Callable[[pl.DataFrame], None]) -> None:
    """The writing half of a run, under the output's lock; `embed(pending)` does the work.

    Shared by the local and Ray engines, so both drop failures for --retry-failed, re-read what is
    done, clear and write markers the same way.
    """
    lock = out.open_for_writing(recipe)
    try:
        if opts.retry_failed:
            dropped = out.drop_failures()
            if dropped:
                logger.info("--retry-failed: %d failed rows are pending again", dropped)
        # Re-read under the lock: a run that ended since the first look may have committed more.
        pending, n_done, n_failed = pending_rows(manifest, out, include_failed=opts.retry_failed)
        summary.skipped = n_done + (0 if opts.retry_failed else n_failed)
        if len(pending):
            out.clear_markers()
            logger.info("%d rows to embed (%d already embedded, %d failed earlier) → %s", len(pending), n_done, n_failed, out.root)
            embed(pending)
        out.write_markers()
        summary.complete = out.is_complete()
    finally:
        lock.release()


def finish_summary(summary: Summary, t0: float, failed_total: int, noop: bool = False) -> Summary:
    summary.wall_seconds = time.monotonic() - t0
    summary.failure_rate = failed_total / summary.rows_total if summary.rows_total else 0.0
    summary.complete = summary.complete or noop
    if noop:
        logger.info("nothing to do: every row of the manifest is already in %s", summary.output)
    logger.info(summary.line())
    return summary


class Stream:
    """One pass over the pending rows: the producer starts at construction, the rest in run()."""

    def __init__(self, source: Manifest, pending: pl.DataFrame, opts: JobOptions, cfg: EncoderConfig, device: torch.device):
        self.source, self.pending, self.opts = source, pending, opts
        self.results = RowResults(cfg.d_model, keep_frames=opts.pooling == "none")
        self.budget = Budget(opts.token_budget or default_token_budget(device))
        workers = opts.decode_workers if opts.decode_workers is not None else default_decode_workers()
        self.producer = Producer(pending, opts, self.results, self.budget, workers, default_max_windows(device))
        self.producer.start()

    def stop(self) -> None:
        self.producer.stop.set()
        self.producer.join(timeout=30)

    def run(self, model: LoadedModel, out: OutputDir, recipe: Recipe, summary: Summary, t0: float) -> None:
        opts = self.opts
        progress = Progress(len(self.pending), enabled=opts.progress, on_update=opts.on_progress)
        writer = PartWriter(
            out, self.source, self.pending, recipe, progress,
            keep_columns=opts.manifest.keep_columns, part_rows=opts.part_rows, part_bytes=opts.part_bytes, commit_seconds=opts.commit_seconds,
            gate=model.adapter_check.wait if model.adapter_check else None,
        )
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
        writer.start()
        try:
            DeviceLoop(model, self.results, writer, self.budget, summary).run(self.producer.batches, t0)
        finally:
            self.stop()
            progress.close()
        writer.close()
        if self.producer.error is not None:
            raise RuntimeError(f"decoding failed: {self.producer.error}") from self.producer.error
        summary.embedded, summary.failed, summary.audio_seconds = writer.embedded, writer.failed, writer.audio_s
        if model.device.type == "cuda":
            summary.gpu_peak_mem_gb = torch.cuda.max_memory_allocated(model.device) / 1e9
