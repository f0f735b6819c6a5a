"""One shard's pending rows through the stages: decode → windows → packed batches → device → rows.

Threads and processes, and what each owns:
  decode workers (processes)  read, downmix, resample and cut audio into 30 s windows; a crash or a
                              hang costs only its file (audio.pool)
  receiver thread             sends decode requests to the workers and takes their windows in, into
                              a bounded queue (Receiver): a worker gets its next request at once
  producer thread             sorts received windows by length in a pool of a few batches, packs
                              batches into pinned staging slots (numpy)
  the caller's thread         the device loop: copies, log-mel, encoder, pooled sums back, pooling
  writer thread               finished rows and failures → committed parts (output.writer)
Queues between them are bounded (decode requests in flight, the window pool, the batch queue,
the staging slots, the writer's queue), so host memory stays flat however long the manifest is
and however long its files are.

A Pipeline is a context manager: it starts decoding at construction (while the model loads) and
stops every thread and process it started on every path out.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import time
from collections import deque
from typing import TYPE_CHECKING
from contextlib import closing

import numpy as np
import polars as pl

from .audio.decode import DecodeRequest, FileJob, WindowBlock
from .audio.pool import END, DecodePool, WorkerFailure
from .batching.packing import Batch, plan_batches, window_flops, window_shapes
from .batching.staging import GPU_TOKEN_BUDGET, Budget, Staging, Stopped, default_max_windows, default_token_budget, stage
from .batching.pooling import RowPooling
from .constants import HOP_LENGTH, SAMPLE_RATE
from .ledger import Failure
from .manifest.embedded import EmbeddedAudio
from .manifest.read import ROW
from .model.config import EncoderConfig
from .options import JobOptions, default_decode_workers
from .output.writer import PartWriter, Rows
from .progress import Progress
from .summary import DeviceStats

if TYPE_CHECKING:
    from .model.load import LoadedModel

logger = logging.getLogger(__name__)

QUEUE_BATCHES = 4  # packed batches waiting for the device (~40 MB of waveforms each on a GPU)
STAGING_SLOTS = QUEUE_BATCHES + 6  # + the one being packed, in flight, and an out-of-memory split
POOL_BATCHES = 4  # windows are sorted by length within a pool of this many batches' tokens
# Tokens the producer may hold (sorting pool + packed batches waiting for the queue), in batches:
# past it, it stops reading from the decoders. Below it, it keeps reading while the device's
# queue is full, so decoding never pauses for the device (it did, and the GPU then waited for
# resampled formats: 18-20% idle on 48 kHz MP3 and 44.1 kHz stereo FLAC, H100).
HELD_BATCHES = 2 * POOL_BATCHES
POLL_S = 0.05  # the producer looks at the device's queue at least this often while decoders work
MAX_SEGMENTS_PER_FILE = 64  # rows of one file decoded together (the file is read once)
REQUEST_AUDIO_S = 20.0  # audio per decode request: many short clips in one, a long file alone
MAX_FILES_PER_REQUEST = 64
PRODUCER_JOIN_S = 5.0
RECEIVED_PER_WORKER = 1  # results the receiver holds for the producer, per decode worker (~2 MB each)


def files_per_request(mean_audio_s: float) -> int:
    """Files per decode request, for files of `mean_audio_s` on average: REQUEST_AUDIO_S of audio."""
    return int(min(MAX_FILES_PER_REQUEST, max(1, REQUEST_AUDIO_S // max(mean_audio_s, 1e-3))))


def _put_unless(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` on `q`, waiting for room; False, with nothing put, once `stop` is set."""
    while True:
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            if stop.is_set():
                return False


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


class Receiver:
    """`pool.stream(requests)` read on a thread of its own, its messages handed over through a
    bounded queue: iterate it for `(key, message)`, or `(None, None)` every POLL_S without one.

    The producer packs and stages batches between messages, and waits for the device when enough
    is held. Reading the pool on the producer's thread, those pauses held the workers up too: a
    worker that finished waited for its next request, and one with a message waited for it to be
    read. On 48 kHz MP3 clips the workers were busy 10.8 of 16 cores inside the job, against 14.5
    reading the pool alone, and the device waited 9.8 % of the time. Here they wait only once
    `size` results are queued; with it, the device was the bound on that corpus (0.0 % idle; one
    call, a faster host: bench/RESULTS.md, dea48d3).

    Leaving the `with` stops the thread (within a poll) and abandons the stream: the pool kills
    the workers still on its requests, as when the producer stopped reading before. An exception
    on the thread (a request that cannot be made, a pool error) is raised to whoever iterates.
    """

    def __init__(self, pool: DecodePool, requests, size: int):
        self._pool, self._requests = pool, requests
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decode-receiver", daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._quit.set()
        # Within a poll, unless a decoder is stuck in this very process (--decode-workers 0),
        # which nothing can stop; the pool's close() then leaves it, as Pipeline.close does.
        self._thread.join(PRODUCER_JOIN_S)

    def __iter__(self):
        while True:
            try:
                item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():  # cannot happen: it always says why it ended
                    raise RuntimeError("the decode receiver ended without a word") from None
                yield None, None
                continue
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def _run(self) -> None:
        try:
            # closing: leaving early abandons the stream here, on this thread (see DecodePool.stream).
            with closing(self._pool.stream(self._requests, poll_s=POLL_S)) as stream:
                for item in stream:
                    if self._quit.is_set() or (item[0] is not None and not self._put(item)):
                        return
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001  (raised on the iterating thread)
            self._put(_Failed(e))

    def _put(self, item) -> bool:
        return _put_unless(self._queue, item, self._quit)


class Producer(threading.Thread):
    """Decode requests out, windows in, packed and staged batches onto `self.batches`.

    Between batches the queue carries ("done", [(item, windows, duration_s)]) and
    ("failed", items, errors): the device loop hands them to the pooling stage in order.
    """

    def __init__(self, pending: pl.DataFrame, opts: JobOptions, cfg: EncoderConfig, stop: threading.Event,
                 audio: EmbeddedAudio | None = None):
        super().__init__(name="producer", daemon=True)
        self.pending, self.opts, self.cfg, self.stop = pending, opts, cfg, stop
        # Known once the device is (attach): decoding starts before torch is even imported.
        self.budget: Budget | None = None
        self.staging: Staging | None = None
        self.max_windows = 1
        self.attached = threading.Event()
        self.audio = audio
        self.batches: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self.error: BaseException | None = None
        self.workers = opts.decode_workers if opts.decode_workers is not None else default_decode_workers()
        self._outstanding: dict[int, tuple[list[FileJob], set[int]]] = {}
        self._retry: list[tuple[int, DecodeRequest]] = []
        self._killed: set[int] = set()  # rows whose decode worker was killed from outside once
        self._streamed: set[int] = set()  # requests that sent windows (a retry would send them again)
        self._keys = iter(range(1 << 62))
        self._pool: list[tuple] = []  # (items, index, lengths, [sample views]) per received block
        self._pool_tokens = 0
        self._ready: deque = deque()  # packed batches and records, in the order the device takes them
        self._ready_tokens = 0
        self._done: list[tuple[int, int, float]] = []
        self._first = True
        self._rows_seen = 0
        self._audio_seen = 0.0

    # -- requests ---------------------------------------------------------------------------
    def _files(self):
        """FileJobs in manifest order; consecutive rows of one file share one (read once).

        Audio stored in the manifest is read here, lazily, as requests are made: the job holds
        one row group of it plus the requests in flight (manifest.embedded), never the column."""
        paths = self.pending["path"].to_list()
        n = len(paths)
        starts = self.pending["start_s"].to_list() if "start_s" in self.pending.columns else [None] * n
        ends = self.pending["end_s"].to_list() if "end_s" in self.pending.columns else [None] * n
        if self.audio is not None:
            with closing(self.audio.blobs(self.pending[ROW].to_list())) as blobs:  # closes the manifest on every path
                for i, data in zip(range(n), blobs, strict=True):
                    yield FileJob(paths[i], (i,), ((starts[i], ends[i]),), data)
            return
        i = 0
        while i < n:
            j = i + 1
            while j < n and paths[j] == paths[i] and j - i < MAX_SEGMENTS_PER_FILE:
                j += 1
            items = tuple(range(i, j))
            yield FileJob(paths[i], items, tuple((starts[k], ends[k]) for k in items))
            i = j

    def _requests(self):
        files = self._files()
        while True:
            # As many files per request as make REQUEST_AUDIO_S, by the rows seen so far: a
            # request of 0.5 s clips holds dozens (few messages), a podcast goes alone (no tail).
            per_row = self._audio_seen / self._rows_seen if self._rows_seen else REQUEST_AUDIO_S
            group = [f for _, f in zip(range(files_per_request(per_row)), files)]
            if not group:
                return
            yield self._request(group)

    def _request(self, files: list[FileJob]) -> tuple[int, DecodeRequest]:
        key = next(self._keys)
        self._outstanding[key] = (files, {i for f in files for i in f.items})
        return key, DecodeRequest(tuple(files), self.opts.max_duration_s, self.opts.storage_options, self.opts.read_timeout_s)

    # -- the thread -------------------------------------------------------------------------
    def run(self) -> None:
        try:
            with DecodePool(self.workers, timeout_s=self.opts.decode_timeout_s, decode_fn=_resolve(self.opts.decode_fn)) as pool:
                requests = self._requests()
                while requests is not None:
                    with Receiver(pool, requests, RECEIVED_PER_WORKER * self.workers) as received:
                        for key, message in received:
                            if self.stop.is_set():
                                return
                            if key is not None:  # None: nothing from the decoders yet, a moment to feed the device
                                self._receive(key, message)
                            self._push()
                    # Files of a request whose worker died are retried one per request, so the
                    # file that killed it is the only one that fails (and its message names it).
                    retry, self._retry = self._retry, []
                    requests = iter(retry) if retry else None
            self._emit(final=True)
            self._push(block=True)
        except Stopped:
            pass
        except BaseException as e:
            self.error = e
            logger.error("producer failed: %s", e, exc_info=True)
        finally:
            try:
                self._put(None)
            except Stopped:
                pass  # nobody reads any more: the run is over

    def _receive(self, key: int, message) -> None:
        files, items = self._outstanding[key]
        if message is END:
            del self._outstanding[key]
            if items:  # cannot happen: every row is reported done or failed; guard it loudly
                self._fail(sorted(items), [Failure("DecodeError", f"the decoder reported nothing for {self.pending['path'][i]}") for i in sorted(items)])
            return
        if isinstance(message, WorkerFailure):
            del self._outstanding[key]
            left = [FileJob(f.name, tuple(i for i in f.items if i in items), tuple(s for i, s in zip(f.items, f.segments) if i in items), f.data)
                    for f in files if any(i in items for i in f.items)]
            retried = items & self._killed
            if message.killed and not retried and key not in self._streamed:
                # Killed from outside (the OOM killer, an operator): that says nothing about the
                # files, so they get one more try each, on another worker.
                self._killed.update(items)
                logger.warning("retrying %d row(s) of %s once on another decode worker", len(items), files[0].name)
                self._retry.extend(self._request([f]) for f in left)
            elif len(files) == 1:
                self._fail(sorted(items), [message.failure] * len(items))
            else:
                self._retry.extend(self._request([f]) for f in left)
            return
        block: WindowBlock = message
        if len(block.items):
            self._streamed.add(key)
        if block.failed:
            self._fail([i for i, _ in block.failed], [e for _, e in block.failed])
            items.difference_update(i for i, _ in block.failed)
        for item, _, duration in block.done:
            items.discard(item)
            self._rows_seen += 1
            self._audio_seen += duration
        self._done.extend(block.done)
        if len(block.items):
            bounds = np.cumsum(block.lengths)[:-1]
            self._pool.append((block.items, block.index, block.lengths, np.split(block.samples, bounds)))
            tokens, _ = window_shapes(block.lengths, padding_mask=self.opts.padding_mask)
            self._pool_tokens += int(tokens.sum())
        if not self.attached.is_set():
            if self._pool_tokens < POOL_BATCHES * GPU_TOKEN_BUDGET:
                return  # keep decoding while the job imports torch and loads its model
            self._wait_attached()  # enough waiting: hold the decoders until there is a device
        # The first pool is one batch, so the device starts as early as possible.
        if self._pool_tokens >= (1 if self._first else POOL_BATCHES) * self.budget.tokens:
            self._emit()
        while self._pool_tokens + self._ready_tokens > HELD_BATCHES * self.budget.tokens and self._ready:
            self._push(block=True, one=True)  # enough held: wait for the device before reading more

    def _wait_attached(self) -> None:
        while not self.attached.wait(0.2):
            if self.stop.is_set():
                raise Stopped

    def _fail(self, items: list[int], errors: list[Failure]) -> None:
        self._ready.append(("failed", np.asarray(items, dtype=np.int64), errors))

    def _push(self, block: bool = False, one: bool = False) -> None:
        """Hand ready batches and records to the device's queue, in order: as many as it takes now,
        or (block) all of them, or (one) the next one, waiting for room."""
        if not self.attached.is_set() and not block:
            return
        while self._ready:
            item = self._ready[0]
            if not block and self.batches.full():
                return
            if isinstance(item, Batch):
                if "slot" not in item.meta:
                    stage(item, self.staging, self.stop)
                self._ready_tokens -= item.num_tokens
            self._put(item)
            self._ready.popleft()
            if one:
                return

    def _emit(self, final: bool = False) -> None:
        self._wait_attached()
        if self._done:
            self._ready.append(("done", self._done))
            self._done = []
        if not self._pool:
            return
        items = np.concatenate([p[0] for p in self._pool])
        index = np.concatenate([p[1] for p in self._pool])
        lengths = np.concatenate([p[2] for p in self._pool])
        samples = [s for p in self._pool for s in p[3]]
        self._pool, self._pool_tokens, self._first = [], 0, False
        tokens, outs = window_shapes(lengths, padding_mask=self.opts.padding_mask)
        cfg = self.cfg
        n_mel = -(-lengths // HOP_LENGTH)
        flops = window_flops(np.minimum(tokens, (n_mel - 1) // 2 + 1), n_mel, cfg.d_model, cfg.encoder_layers, cfg.num_mel_bins)
        for sel in plan_batches(tokens, (items, index), token_budget=self.budget.tokens, max_windows=self.max_windows):
            batch = Batch(items[sel], index[sel], tokens[sel], outs[sel], [samples[k] for k in sel],
                          audio_samples=int(lengths[sel].sum()), flops=float(flops[sel].sum()))
            self._ready.append(batch)  # staged when it goes on the queue: a slot is held only that long
            self._ready_tokens += batch.num_tokens

    def _put(self, item) -> None:
        # Gives up once stopped: a blocking put on a full queue nobody reads any more (the device
        # loop died on a write fault, or the run was refused) would hold the exit forever.
        if not _put_unless(self.batches, item, self.stop):
            raise Stopped


def _resolve(spec: str | None):
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class Pipeline:
    """Decoding starts at construction; attach(device) once the device is known; run() drives it;
    leaving the `with` stops it all."""

    def __init__(self, pending: pl.DataFrame, opts: JobOptions, cfg: EncoderConfig, stop: threading.Event,
                 audio: EmbeddedAudio | None = None):
        self.pending, self.opts, self.cfg = pending, opts, cfg
        self.stop = stop
        self._halt = threading.Event()  # stops the producer: set on the way out, or with `stop`
        self.producer = Producer(pending, opts, cfg, self._halt, audio)
        self.producer.start()
        self.budget: Budget | None = None
        self.staging: Staging | None = None

    def attach(self, device) -> None:
        """The device is known (a torch.device): the producer may pack and stage batches for it."""
        self.budget = Budget(self.opts.token_budget or default_token_budget(device))
        self.staging = Staging(device, STAGING_SLOTS)
        p = self.producer
        p.budget, p.staging, p.max_windows = self.budget, self.staging, default_max_windows(device)
        p.attached.set()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._halt.set()
        # The producer stops within a poll once halted; only a decoder stuck in this very process
        # (--decode-workers 0: no isolation) can hold it, and it writes nothing: leave it to die
        # with the process rather than hold the run's exit.
        self.producer.join(timeout=PRODUCER_JOIN_S)
        if self.producer.is_alive():
            logger.warning("the producer did not stop within %.0f s (a decoder stuck in-process?); leaving it", PRODUCER_JOIN_S)

    def run(self, model: "LoadedModel", writer: PartWriter, progress: Progress, stats: DeviceStats, t0: float) -> None:
        """Embed every pending row into `writer`, or stop early when `stop` is set."""
        import torch

        from .batching.device import DeviceLoop

        def emit_rows(rows: Rows) -> None:
            writer.put_rows(rows)
            progress.update(len(rows.items), 0, float(rows.durations.sum()))

        def emit_failures(items: np.ndarray, errors: list[Failure]) -> None:
            writer.put_failures(items, errors)
            progress.update(len(items), len(items), 0.0)

        pooling = RowPooling(self.cfg.d_model, self.opts.pooling == "none", emit_rows, emit_failures)

        def handle(item) -> None:
            if item[0] == "done":
                pooling.done(item[1])
            else:
                pooling.fail(item[1], item[2])

        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
        stats.device = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
        loop = DeviceLoop(model, self.budget, self.staging, stats, lambda b, s, f: pooling.add(b, s, f, None),
                          keep_frames=self.opts.pooling == "none")
        stopper = threading.Thread(target=self._relay_stop, name="stop-relay", daemon=True)
        stopper.start()
        loop.run(self.producer.batches, handle, self.stop, t0)
        if model.device.type == "cuda":
            stats.gpu_peak_mem_gb = torch.cuda.max_memory_allocated(model.device) / 1e9
        if self.stop.is_set():
            return
        if self.producer.error is not None:
            raise RuntimeError(f"decoding failed: {self.producer.error}") from self.producer.error
        if len(pooling):
            raise RuntimeError(f"{len(pooling)} row(s) came back neither embedded nor failed")

    def _relay_stop(self) -> None:
        while not self._halt.is_set():
            if self.stop.wait(0.2):
                self._halt.set()
                return
