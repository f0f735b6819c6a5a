"""One run's pending rows through the stages: the threads and the bounded queues between them.

  decode workers (processes)  read, downmix, resample and cut audio into 30 s windows; a crash
                              or a hang costs only its file (audio.pool)
  receiver thread             sends the decode requests (audio.requests) and takes the workers'
                              messages in, into a bounded queue: a worker gets its next request
                              at once, whatever the producer is doing
  producer thread             answers each message (audio.requests), batches the windows
                              (batching.policy) and stages batches into pinned slots
                              (batching.staging), in the order the device takes them
  the caller's thread         the device loop: copies, log-mel, encoder, pooling reductions
                              (batching.device), windows back into rows (batching.rows)
  writer thread               finished rows and failures → committed parts (output.writer)

Every queue is bounded (requests in flight, the receiver's queue, what the producer holds, the
batch queue, the staging slots, the writer's queue), so host memory stays flat however long the
manifest is and however long its files are. What travels is typed: Batch, and the rows' records
(ledger.Decoded, FailedRows, Retrying), in the order the device loop handles them.

A Pipeline is a context manager: decoding starts at construction, while the model loads;
`attach(device)` hands the producer what it needs of the device; leaving the `with` stops every
thread and process it started, on every path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from contextlib import closing
from typing import TYPE_CHECKING

import numpy as np

from .audio.decode import OPUS_DECODER
from .audio.pool import DecodePool
from .audio.requests import Limits, Requests
from .batching.policy import BatchPolicy
from .batching.rows import RowPooling
from .batching.staging import GPU_TOKEN_BUDGET, Lane, Stopped, stage
from .ledger import Decoded, FailedRows, Retrying, Rows
from .manifest.embedded import EmbeddedAudio
from .model.config import EncoderConfig
from .options import JobOptions, default_decode_workers
from .pending import Pending
from .progress import Progress
from .seams import NONE, Seams
from .summary import DeviceStats

if TYPE_CHECKING:
    from .model.load import LoadedModel
    from .output.writer import PartWriter

logger = logging.getLogger(__name__)

QUEUE_BATCHES = 4  # packed batches waiting for the device (~40 MB of waveforms each on a GPU)
STAGING_SLOTS = QUEUE_BATCHES + 6  # + the one being packed, in flight, and an out-of-memory split
# Tokens the producer may hold (the policy's pool and batches waiting for the queue), in batches:
# past it, it stops reading from the decoders. Below it, it keeps reading while the device's
# queue is full, so decoding never pauses for the device (bench/RESULTS.md: the device waited
# for resampled formats when it did).
HELD_BATCHES = 8
POLL_S = 0.05  # the producer looks at the device's queue at least this often while decoders work
POOL_WAIT_BATCHES = 4  # batches' worth of windows decoded ahead while the device is not known yet
JOIN_S = 5.0
RECEIVED_PER_WORKER = 1  # results the receiver holds for the producer, per decode worker (~2 MB each)
FAILURE_LINES_PER_MINUTE = 10  # failed rows logged one by one; past it, a count per minute


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
    is held; reading the pool on its thread, those pauses held the workers up too (a worker that
    finished waited for its next request). Here they wait only once `size` results are queued.

    Leaving the `with` stops the thread (within a poll) and abandons the stream: the pool kills
    the workers still on its requests. An exception on the thread (a request that cannot be
    made, a pool error) is raised to whoever iterates.
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
        self._thread.join(JOIN_S)

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
    """Decode requests out, windows in, staged batches and the rows' records onto `batches`,
    then None. Decoding starts before the device is known (hand_over): windows are held until
    then, up to a few batches' worth."""

    def __init__(self, requests: Requests, policy: BatchPolicy, *, workers: int, timeout_s: float, decode_fn, stop: threading.Event):
        super().__init__(name="producer", daemon=True)
        self.requests, self.policy = requests, policy
        self.workers, self.timeout_s, self.decode_fn, self.stop = workers, timeout_s, decode_fn, stop
        self.batches: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self.error: BaseException | None = None
        self._lane_box: queue.Queue = queue.Queue(maxsize=1)
        self._lane: Lane | None = None
        self._ready: deque = deque()  # batches (staged on the way out) and records, in the order the device takes them
        self._ready_tokens = 0
        self._decoded: list[tuple[int, int, float]] = []
        self.pool: DecodePool | None = None

    def hand_over(self, lane: Lane) -> None:
        """The device is known: its budget, staging slots and batch size, once."""
        self._lane_box.put(lane)

    def run(self) -> None:
        try:
            with DecodePool(self.workers, timeout_s=self.timeout_s, decode_fn=self.decode_fn) as pool:
                self.pool = pool
                requests = iter(self.requests)
                while requests is not None:
                    with Receiver(pool, requests, RECEIVED_PER_WORKER * max(1, self.workers)) as received:
                        for key, message in received:
                            if self.stop.is_set():
                                return
                            if key is not None:  # None: nothing from the decoders yet, a moment to feed the device
                                self._receive(key, message)
                            self._push()
                    retry = self.requests.retries()
                    requests = iter(retry) if retry else None
            self._flush()
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
        answer = self.requests.answer(key, message)
        failed = answer.failed + self.requests.unsent()
        if failed:
            self._ready.append(FailedRows(np.array([i for i, _ in failed], dtype=np.int64), [f for _, f in failed]))
        if answer.retrying:
            self.policy.drop(set(answer.retrying))
            self._ready.append(Retrying(answer.retrying))
        self._decoded.extend(answer.decoded)
        if answer.block is not None:
            b = answer.block
            self.policy.add(b.items, b.index, b.lengths, np.split(b.samples, np.cumsum(b.lengths)[:-1]))
        lane = self._lane or self._lane_now()
        if lane is None:
            if self.policy.tokens < POOL_WAIT_BATCHES * GPU_TOKEN_BUDGET:
                return  # keep decoding while the job imports torch and loads its model
            lane = self._wait_for_lane()  # enough held: hold the decoders until there is a device
        if self.policy.ready(lane.budget.tokens):
            self._emit(lane)
        while self.policy.tokens + self._ready_tokens > HELD_BATCHES * lane.budget.tokens and self._ready:
            self._push(block=True, one=True)  # enough held: wait for the device before reading more

    def _lane_now(self) -> Lane | None:
        try:
            self._lane = self._lane_box.get_nowait()
        except queue.Empty:
            return None
        return self._lane

    def _wait_for_lane(self) -> Lane:
        while self._lane is None:
            try:
                self._lane = self._lane_box.get(timeout=0.2)
            except queue.Empty:
                if self.stop.is_set():
                    raise Stopped from None
        return self._lane

    def _emit(self, lane: Lane) -> None:
        if self._decoded:
            self._ready.append(Decoded(self._decoded))
            self._decoded = []
        for batch in self.policy.take(lane.budget.tokens, lane.max_windows):
            self._ready.append(batch)  # staged when it goes on the queue: a slot is held only that long
            self._ready_tokens += batch.num_tokens

    def _flush(self) -> None:
        """The decoders are done: everything held becomes batches (and records)."""
        lane = self._wait_for_lane()
        self._emit(lane)
        for failure in self.requests.unsent():
            self._ready.append(FailedRows(np.array([failure[0]], dtype=np.int64), [failure[1]]))

    def _push(self, block: bool = False, one: bool = False) -> None:
        """Hand ready batches and records to the device's queue, in order: as many as it takes now,
        or (block) all of them, or (one) the next one, waiting for room."""
        lane = self._lane
        if lane is None and not block:
            return
        while self._ready:
            item = self._ready[0]
            if not block and self.batches.full():
                return
            if not isinstance(item, (Decoded, FailedRows, Retrying)):  # a Batch
                if item.staged is None:
                    stage(item, lane.staging, self.stop)
                self._ready_tokens -= item.num_tokens
            self._put(item)
            self._ready.popleft()
            if one:
                return

    def _put(self, item) -> None:
        # Gives up once stopped: a blocking put on a full queue nobody reads any more (the device
        # loop died on a write fault, or the run was refused) would hold the exit forever.
        if not _put_unless(self.batches, item, self.stop):
            raise Stopped


class Pipeline:
    """Decoding starts at construction; attach(device) once the device is known; run() drives it;
    leaving the `with` stops it all."""

    def __init__(self, rows: Pending, opts: JobOptions, cfg: EncoderConfig, stop: threading.Event,
                 audio: EmbeddedAudio | None = None, decode_fn=None, opus_decoder: str = OPUS_DECODER):
        self.rows, self.opts, self.cfg, self.stop = rows, opts, cfg, stop
        self._halt = threading.Event()  # stops the producer: set on the way out, or with `stop`
        requests = Requests(rows, Limits(opts.max_duration_s, opts.storage_options, opts.read_timeout_s, opus_decoder), audio)
        policy = BatchPolicy((cfg.d_model, cfg.encoder_layers, cfg.num_mel_bins), padding_mask=opts.padding_mask)
        workers = opts.decode_workers if opts.decode_workers is not None else default_decode_workers()
        self.producer = Producer(requests, policy, workers=workers, timeout_s=opts.decode_timeout_s, decode_fn=decode_fn, stop=self._halt)
        self.producer.start()
        self.lane: Lane | None = None

    def waiting_on(self) -> str:
        """What the run waits on, in a few words, for a line when no row finishes (progress)."""
        p = self.producer
        busy = p.pool.busy() if p.pool is not None else []
        parts = [f"decoding {len(busy)} request(s) ({', '.join(busy[:3])}{', …' if len(busy) > 3 else ''})" if busy
                 else ("decoding finished" if not p.is_alive() else "no decode request in flight")]
        parts.append(f"{p.batches.qsize()} batch(es) queued for the device")
        return "; ".join(parts)

    def attach(self, device) -> None:
        """The device is known (a torch.device): the producer may batch and stage for it."""
        self.lane = Lane.for_device(device, self.opts.token_budget, STAGING_SLOTS)
        self.producer.hand_over(self.lane)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._halt.set()
        # The producer stops within a poll once halted; only a decoder stuck in this very process
        # (--decode-workers 0: no isolation) can hold it, and it writes nothing: leave it to die
        # with the process rather than hold the run's exit.
        self.producer.join(timeout=JOIN_S)
        if self.producer.is_alive():
            logger.warning("the producer did not stop within %.0f s (a decoder stuck in-process?); leaving it", JOIN_S)

    def run(self, model: LoadedModel, pooling, writer: PartWriter, progress: Progress, stats: DeviceStats, t0: float,
            seams: Seams = NONE) -> None:
        """Embed every pending row into `writer`, or stop early when `stop` is set."""
        import torch

        from .batching.device import DeviceLoop

        def emit_rows(rows: Rows) -> None:
            writer.put_rows(rows)
            progress.update(len(rows.items), 0, float(rows.durations.sum()))

        said = _FailureLines(self.rows)

        def emit_failures(items: np.ndarray, failures: list) -> None:
            writer.put_failures(items, failures)
            progress.update(len(items), len(items), 0.0)
            said(items, failures)

        rows = RowPooling(pooling, emit_rows, emit_failures)

        def handle(record) -> None:
            if isinstance(record, Decoded):
                rows.decoded(record.entries)
            elif isinstance(record, FailedRows):
                rows.fail(record.items, record.failures)
            else:
                rows.retrying(record.items)

        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
        stats.device = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
        loop = DeviceLoop(model, self.lane, stats, pooling, rows.add, on_first_batch=lambda: seams.event("first-batch"))
        stopper = threading.Thread(target=self._relay_stop, name="stop-relay", daemon=True)
        stopper.start()
        loop.run(self.producer.batches, handle, self.stop, t0)
        if model.device.type == "cuda":
            stats.gpu_peak_mem_gb = torch.cuda.max_memory_allocated(model.device) / 1e9
        if self.stop.is_set():
            return
        if self.producer.error is not None:
            raise RuntimeError(f"decoding failed: {self.producer.error}") from self.producer.error
        if len(rows):
            raise RuntimeError(f"{len(rows)} row(s) came back neither embedded nor failed")

    def _relay_stop(self) -> None:
        while not self._halt.is_set():
            if self.stop.wait(0.2):
                self._halt.set()
                return


class _FailureLines:
    """Failed rows logged one line each (id, file, reason), up to FAILURE_LINES_PER_MINUTE; past
    that, one line a minute counts the rest (their records are in the output either way)."""

    def __init__(self, rows: Pending):
        self.rows = rows
        self.minute, self.said, self.held = time.monotonic(), 0, 0

    def __call__(self, items: np.ndarray, failures: list) -> None:
        now = time.monotonic()
        if now - self.minute >= 60.0:
            if self.held:
                logger.warning("... and %d more failed rows in the last minute (see the output's failure records)", self.held)
            self.minute, self.said, self.held = now, 0, 0
        room = max(0, FAILURE_LINES_PER_MINUTE - self.said)
        if room:
            shown = self.rows.gather(np.asarray(items[:room]))
            for row_id, path, failure in zip(shown["id"].to_list(), shown["path"].to_list(), failures[:room]):
                logger.warning("row %s failed (%s): %s", row_id, path, failure, extra={"event": "row_failed", "id": row_id,
                                                                                      "path": path, "error_kind": failure.kind})
        self.said += min(room, len(items))
        self.held += max(0, len(items) - room)
