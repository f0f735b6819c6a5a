"""Decoding in isolated worker processes, over a wire that cannot wedge.

Native decoders (libsndfile, FFmpeg) can segfault, abort or spin forever on a malformed file.
Out of millions of files some will, so every decode runs in a worker process: a crash or a
hang costs that one file (reported as a WorkerFailure) and a replacement worker, not the run.

Workers are started with 'forkserver' where available ('spawn' elsewhere), never plain fork: the
parent may hold CUDA contexts and threads, which a forked child would inherit half-broken.
Like any spawn-style start, the parent's `__main__` module is imported in each worker, so a
script must keep its work under `if __name__ == "__main__":`.

The wire. Each worker has two pipes, one per direction. The parent's ends are non-blocking and
it never waits on a write: a request (which may carry megabytes of audio stored in the manifest)
goes into the worker's outbox and is written as the pipe takes it, while the parent goes on
reading every worker's results. A worker writes its results with blocking writes, which always
complete because the parent always reads. So neither side can be blocked writing while the other
is blocked writing too (the deadlock of one duplex pipe with a large request queued behind a
worker that is sending a large result), and every wait of the parent has a deadline. A message is
a small pickled header plus the raw bytes of every array or buffer (pickle protocol 5
out-of-band buffers), read straight into writable buffers, never pickled in-band.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import inspect
import logging
import math
import multiprocessing as mp
import os
import pickle
import select
import signal
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass
from itertools import islice
from multiprocessing.connection import Connection
from typing import Any, Callable, Hashable, Iterable, Iterator

from ..ledger import Failure
from .decode import DecodeRequest, decode_request

logger = logging.getLogger(__name__)

__all__ = ["END", "DecodePool", "DecodeRequest", "WorkerFailure"]

STARTUP_TIMEOUT_S = 60.0  # a worker that is not ready by then (import deadlock, ...) is killed
MAX_STARTUP_FAILURES = 3  # consecutive workers dying before ready: decode_fn cannot run at all
CLOSE_GRACE_S = 1.0  # idle workers exit on EOF within this; the rest get SIGKILL
# A worker holds a second request, queued behind the one it decodes, while requests are short
# (their jobs send at most this many messages on average: a block of clips and END): it then
# never idles through a round trip to the parent. A long file's job streams dozens of messages
# and takes seconds; one queued behind it could idle another worker at the end of a run.
SHORT_JOB_MESSAGES = 3.0
_MESSAGES_EMA = 0.2  # weight of the last finished job in the running mean of messages per job
# Request bytes (audio stored in the manifest) the parent holds for requests not yet answered:
# past it no request is pulled, whatever max_inflight allows (at least one always is).
INFLIGHT_BYTES = 256 << 20
PIPE_BYTES = 1 << 20  # each pipe's kernel buffer (Linux allows 1 MB unprivileged): fewer wake-ups
_F_SETPIPE_SZ = 1031  # from <linux/fcntl.h>
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_READY = "ready"
_IOV_MAX = 64  # buffers per writev


class _End:
    def __repr__(self) -> str:
        return "END"

    def __reduce__(self):
        return "END"  # unpickles as this module's END: compared with `is`


END = _End()  # stream(): a job's last message, after all it yielded


@dataclass(frozen=True)
class WorkerFailure:
    """The result for a request whose decode did not return normally: `failure` says why
    (DecoderCrashed, DecodeTimeout, or the exception that escaped decode_fn). `killed`: its
    worker was killed by SIGKILL from outside the pool (the OOM killer, an operator), which says
    nothing about the file: the caller may try it once more on another worker."""

    failure: Failure
    killed: bool = False

    @property
    def error(self) -> str:
        return str(self.failure)


# --- the wire: framing over raw pipe descriptors ------------------------------------------------
#
# A message is a head (body length, buffer count), each buffer's length, the pickled body, then
# each out-of-band buffer, back to back.

_HEAD = struct.Struct("<QI")
_SIZE = struct.Struct("<Q")
MAX_MESSAGE_BYTES = 1 << 40  # a length past this is a broken stream, not a message


def encode(obj: Any) -> list[memoryview]:
    """`obj` as the views a writer sends in order; raises what pickle raises."""
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = _HEAD.pack(len(body), len(raws)) + b"".join(_SIZE.pack(r.nbytes) for r in raws)
    return [memoryview(head), memoryview(body), *raws]


def _message_parts():
    """A generator that yields each buffer to fill, in wire order, and returns the message."""
    head = bytearray(_HEAD.size)
    yield head
    body_len, count = _HEAD.unpack(head)
    sizes = bytearray(_SIZE.size * count)
    if count:
        yield sizes
    lengths = struct.unpack(f"<{count}Q", sizes)
    if body_len > MAX_MESSAGE_BYTES or any(n > MAX_MESSAGE_BYTES for n in lengths):
        raise EOFError("protocol error: an implausible message length")
    body = bytearray(body_len)
    yield body
    # bytearrays keep the arrays writable and avoid a copy in pickle.loads.
    buffers = [bytearray(n) for n in lengths]
    for buf in buffers:
        if buf:
            yield buf
    return body, buffers


def decode(body: bytearray, buffers: list[bytearray]) -> Any:
    """A message read by Reader, unpickled (its arrays are views of the received buffers)."""
    return pickle.loads(body, buffers=buffers)


class Reader:
    """Messages from a descriptor. Non-blocking: `read()` takes what is there and returns the
    messages completed by it, never waiting for the rest of one. Blocking: `read_one()`."""

    def __init__(self, fd: int):
        self.fd = fd
        self._parts = None
        self._target: memoryview | None = None
        self._got = 0
        self.bytes_read = 0

    def _advance(self, value=None):
        """The next buffer to fill, or (None, message) once the message is complete."""
        try:
            buf = self._parts.send(value) if value is not None else next(self._parts)
        except StopIteration as done:
            self._parts = None
            return None, done.value
        return memoryview(buf), None

    def _fill(self) -> tuple[bool, Any]:
        """Read into the current buffer; (True, message) when one completed, (True, None) when a
        buffer filled, (False, None) when nothing more is there now. EOFError at the end."""
        if self._parts is None:
            self._parts = _message_parts()
            self._target, _ = self._advance()
            self._got = 0
        n = os.readv(self.fd, [self._target[self._got :]])  # BlockingIOError when non-blocking and empty
        if n == 0:
            raise EOFError("the pipe closed")
        self._got += n
        self.bytes_read += n
        if self._got < len(self._target):
            return True, None
        self._target, done = self._advance()
        self._got = 0
        if self._target is None:
            return True, done
        return True, None

    def read(self) -> list[Any]:
        """Messages completed by what is readable now (raw: (body, buffers))."""
        out = []
        while True:
            try:
                _, message = self._fill()
            except BlockingIOError:
                return out
            if message is not None:
                out.append(message)

    def read_one(self) -> Any:
        """The next whole message, waiting for it (blocking descriptors only)."""
        while True:
            _, message = self._fill()
            if message is not None:
                return message


class Outbox:
    """Messages waiting to be written to a non-blocking descriptor, written as it takes them."""

    def __init__(self, fd: int):
        self.fd = fd
        self._views: deque[memoryview] = deque()
        self.bytes = 0

    def __bool__(self) -> bool:
        return bool(self._views)

    def put(self, views: list[memoryview]) -> None:
        for v in views:
            v = v.cast("B") if v.format != "B" or v.ndim != 1 else v
            if len(v):
                self._views.append(v)
                self.bytes += len(v)

    def flush(self) -> None:
        """Write what the pipe takes now; BrokenPipeError if the reader is gone."""
        while self._views:
            try:
                n = os.writev(self.fd, list(islice(self._views, _IOV_MAX)))
            except BlockingIOError:
                return
            self.bytes -= n
            while n:
                v = self._views[0]
                if n >= len(v):
                    n -= len(v)
                    self._views.popleft()
                else:
                    self._views[0] = v[n:]
                    n = 0


def write_all(fd: int, views: list[memoryview]) -> None:
    """Write every view to a blocking descriptor."""
    box = Outbox(fd)
    box.put(views)
    while box:
        box.flush()


def _set_pipe_size(fd: int) -> None:
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass  # not Linux, or over this system's pipe-max-size: the default buffer works, with more wake-ups


# --- the pool -----------------------------------------------------------------------------------


class DecodePool:
    """Run `decode_fn(request)` for many requests in `num_workers` isolated worker processes.

    `stream(items)` takes `(key, request)` pairs and yields `(key, message)`: each item that
    decode_fn yields (a generator streams: a long file's first windows arrive while it decodes),
    or its return value, then END; or a WorkerFailure in their place when the decode did not
    finish. `num_workers=0` runs decode_fn in the calling thread: no processes and no isolation,
    for notebooks and tiny runs.

    A job's timeout counts from its worker's last progress (bytes of a message), so a long file
    that streams steadily is not cut off, and a decoder that stops making progress is. While jobs
    are short, a worker is sent its next request before it finishes the current one
    (SHORT_JOB_MESSAGES): the queued request is not started, so a crash or a timeout of the
    current one fails that one alone and the queued request goes to another worker.
    """

    def __init__(
        self,
        num_workers: int,
        *,
        timeout_s: float = 120.0,
        decode_fn: Callable[[Any], Any] | None = None,
        max_inflight: int | None = None,
        max_inflight_bytes: int = INFLIGHT_BYTES,
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if max_inflight is None:
            # Three per worker: one decoding, one queued behind it, one ready in the parent.
            max_inflight = max(1, 3 * num_workers)
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self._decode_fn = decode_fn if decode_fn is not None else decode_request
        self._num_workers = num_workers
        self._timeout_s = float(timeout_s)
        self._max_inflight = max_inflight
        self._max_inflight_bytes = max_inflight_bytes
        self._workers: list[_Worker] = []
        self._startup_failures = 0
        self._messages_per_job: float | None = None  # running mean over finished jobs
        self._pending: deque[_Job] = deque()  # the running stream's requests not yet sent
        self._inflight_bytes = 0  # request bytes of jobs pulled and not yet finished
        self._closed = False
        self._running = False
        self._inline: str | None = None  # what decode_fn is on, with no workers
        if num_workers == 0:
            return
        try:
            pickle.dumps(self._decode_fn)
        except Exception as e:
            raise TypeError(f"decode_fn must be a picklable top-level function, got {self._decode_fn!r}") from e
        self._ctx = _mp_context(self._decode_fn)
        try:
            for _ in range(num_workers):
                self._workers.append(self._start_worker())
        except BaseException:
            self.close()
            raise

    # --- public API ---------------------------------------------------------------------------

    def stream(self, items: Iterable[tuple[Hashable, Any]], *, poll_s: float | None = None) -> Iterator[tuple[Hashable, Any]]:
        """Yield `(key, message)` for every `(key, request)` of `items` (see the class doc).

        At most max_inflight requests (and max_inflight_bytes of them) are outstanding; `items`
        is pulled lazily. Stopping the iteration early kills the workers still busy with requests
        of it (they are replaced). With poll_s, `(None, None)` comes whenever that long passes
        without a message, so the caller can do other work while the workers decode.
        """
        if self._closed:
            raise ValueError("DecodePool is closed")
        if self._num_workers == 0:
            return self._stream_inline(items)
        return self._stream_workers(items, poll_s)

    def busy(self) -> list[str]:
        """What the workers are decoding now (a snapshot, safe from another thread)."""
        if self._num_workers == 0:
            label = self._inline
            return [label] if label else []
        try:
            return [w.jobs[0].label for w in list(self._workers) if w.jobs]
        except (IndexError, RuntimeError):  # changed while looked at: the next look will do
            return []

    def close(self) -> None:
        """Stop all workers: idle ones exit on EOF, busy or stuck ones are killed."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            w.hang_up()  # EOF: an idle worker returns from its loop
            if w.jobs:
                w.kill()  # its result is not wanted any more; do not wait for it
        deadline = time.monotonic() + CLOSE_GRACE_S
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            w.kill()
        self._workers.clear()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- in-process -------------------------------------------------------------------------

    def _stream_inline(self, items):
        for key, request in items:
            self._inline = _label(key, request)
            try:
                for message in _messages(self._decode_fn, request):
                    yield key, message
            finally:
                self._inline = None

    # --- worker processes ---------------------------------------------------------------------

    def _stream_workers(self, items, poll_s: float | None = None):
        if self._running:
            raise RuntimeError("DecodePool.stream is already running; one iteration at a time")
        self._running = True
        # Workers killed when a previous iteration was abandoned are replaced now, not then:
        # an abandoning caller is often about to close the pool.
        while len(self._workers) < self._num_workers:
            self._workers.append(self._start_worker())
        source = iter(items)
        pending = self._pending = deque()
        results: deque[tuple[Hashable, Any]] = deque()  # finished, not yet yielded
        exhausted = False
        try:
            while True:
                if self._closed:
                    raise ValueError("DecodePool was closed during stream")
                # Refill and hand out work before yielding: the consumer may be slow, and the
                # workers should be decoding meanwhile. Outstanding = pending + busy + results.
                busy = sum(len(w.jobs) for w in self._workers)
                while (not exhausted and len(pending) + busy + len(results) < self._max_inflight
                       and (self._inflight_bytes < self._max_inflight_bytes or not (pending or busy or results))):
                    try:
                        key, request = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    job = self._job(key, request)
                    if isinstance(job, WorkerFailure):
                        results.append((key, job))
                    else:
                        pending.append(job)
                self._dispatch(pending)
                if results:
                    yield results.popleft()
                elif exhausted and not pending and not any(w.jobs for w in self._workers):
                    return
                else:
                    results.extend(self._poll(poll_s))
                    if not results and poll_s is not None:
                        yield None, None
        finally:
            self._running = False
            self._inflight_bytes = 0
            if not self._closed:
                # Abandoned mid-run: results still being computed would reach the next stream.
                for w in self._workers:
                    if w.jobs:
                        w.kill()
                self._workers = [w for w in self._workers if not w.jobs]

    def _job(self, key: Hashable, request: Any) -> _Job | WorkerFailure:
        try:
            views = encode(request)
        except Exception as e:
            return WorkerFailure(Failure(type(e).__name__, f"cannot send request: {e}"))
        size = sum(len(v) for v in views)
        self._inflight_bytes += size
        return _Job(key, _label(key, request), views, size)

    def _depth(self) -> int:
        """Requests a worker may hold: two while finished jobs were short, else one."""
        short = self._messages_per_job is not None and self._messages_per_job <= SHORT_JOB_MESSAGES
        return 2 if short else 1

    def _dispatch(self, pending: deque) -> None:
        """Hand pending requests to idle workers, then (short jobs) one to queue behind each busy one."""
        for depth in range(1, self._depth() + 1):
            for w in self._workers:
                if not pending:
                    return
                if w.ready and not w.broken and len(w.jobs) < depth:
                    job = pending.popleft()
                    # A queued request's timeout starts when the worker gets to it (see _finished).
                    job.deadline = time.monotonic() + self._timeout_s if not w.jobs else math.inf
                    w.jobs.append(job)
                    w.outbox.put(job.views)
                    self._write(w)

    def _write(self, w: _Worker) -> None:
        try:
            w.outbox.flush()
        except OSError:
            # The worker is gone (EPIPE). What it sent before dying is still to be read, and its
            # death is judged by _poll with the rest: its current job fails, queued ones go back.
            w.broken = True

    def _finished(self, w: _Worker) -> None:
        """The worker's current job sent its last message: the queued one (if any) starts now."""
        job = w.jobs.popleft()
        self._inflight_bytes -= job.size
        job.views = []
        m = self._messages_per_job
        self._messages_per_job = job.messages if m is None else (1 - _MESSAGES_EMA) * m + _MESSAGES_EMA * job.messages
        if w.jobs:
            w.jobs[0].deadline = time.monotonic() + self._timeout_s

    def _requeue(self, w: _Worker) -> None:
        """Requests queued behind a dying worker's current job were never started: back to the
        front of the queue, in their order, for another worker."""
        while len(w.jobs) > 1:
            job = w.jobs.pop()
            job.deadline = math.inf
            self._pending.appendleft(job)

    def _fail_current(self, w: _Worker, failure: WorkerFailure) -> tuple[Hashable, WorkerFailure]:
        job = w.jobs[0]
        self._requeue(w)
        self._finished(w)
        return job.key, failure

    def _poll(self, poll_s: float | None = None) -> list[tuple[Hashable, Any]]:
        """Wait for results, writable pipes, deaths or the next deadline; handle what happened."""
        deadlines = [w.deadline for w in self._workers if w.deadline is not None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        if poll_s is not None:
            timeout = poll_s if timeout is None else min(timeout, poll_s)
        poller = select.poll()
        for w in self._workers:
            poller.register(w.reader.fd, select.POLLIN)
            poller.register(w.process.sentinel, select.POLLIN)
            if w.outbox and not w.broken:
                poller.register(w.outbox.fd, select.POLLOUT)
        events = dict(poller.poll(None if timeout is None else math.ceil(timeout * 1000)))
        done: list[tuple[Hashable, Any]] = []
        # Read results before judging deaths and deadlines: a worker may have finished just in
        # time, or sent its result and then died.
        for i, w in enumerate(self._workers):
            if w.outbox and not w.broken and events.get(w.outbox.fd):
                self._write(w)
            if events.get(w.reader.fd):
                try:
                    done.extend(self._receive(w))
                    continue
                except (EOFError, OSError):
                    pass  # the pipe broke: a death, judged below
            elif not events.get(w.process.sentinel):
                continue
            done.extend(self._replace_dead(i))
        now = time.monotonic()
        for i, w in enumerate(self._workers):
            if w.job is not None and w.job.deadline <= now:
                job = w.job
                logger.warning("decode timed out after %gs on %s; worker %s killed", self._timeout_s, job.label, w.process.pid)
                failure = Failure("DecodeTimeout", f"decode timed out after {self._timeout_s:g} s on {job.label}")
                done.append(self._fail_current(w, WorkerFailure(failure)))
                w.kill()
                self._workers[i] = self._start_worker()
            elif w.started_deadline is not None and w.started_deadline <= now:
                w.kill()
                self._startup_failed(w, f"not ready after {STARTUP_TIMEOUT_S:g} s")
                self._workers[i] = self._start_worker()
        return done

    def _receive(self, w: _Worker) -> list[tuple[Hashable, Any]]:
        before = w.reader.bytes_read
        raw = w.reader.read()
        if w.reader.bytes_read > before and w.job is not None:
            w.job.deadline = time.monotonic() + self._timeout_s  # progress, if not yet a whole message
        done = []
        for body, buffers in raw:
            try:
                message = decode(body, buffers)
            except Exception as e:  # e.g. a class the parent cannot import; the worker itself is fine
                message = WorkerFailure(Failure(type(e).__name__, f"cannot unpickle the result: {e}"))
            if not w.ready:
                if message != _READY:
                    raise EOFError("unexpected first message")
                w.ready = True
                w.started_deadline = None
                self._startup_failures = 0
                continue
            job = w.job
            if job is None:
                raise EOFError("a message for no job")
            done.append((job.key, message))
            job.messages += 1
            if message is END or isinstance(message, WorkerFailure):
                self._finished(w)  # a failure is the job's last message too
        return done

    def _replace_dead(self, i: int) -> list[tuple[Hashable, Any]]:
        w = self._workers[i]
        w.process.join(5.0)  # the pipe closes a moment before the process is reaped
        if w.process.exitcode is None:
            w.kill()  # it closed its pipe but lives on: not a usable worker
        code = w.process.exitcode
        how = _describe_exit(code)
        done = []
        if w.job is not None:
            killed = code == -signal.SIGKILL
            if killed:
                logger.warning("decode worker %s was killed (%s) from outside while on %s", w.process.pid, how, w.job.label)
                failure = Failure("DecoderKilled", f"decode worker {w.process.pid} was killed ({how}) on {w.job.label}")
            else:
                logger.warning("decoder crashed (%s) on %s; replacing the worker", how, w.job.label)
                failure = Failure("DecoderCrashed", f"decoder crashed ({how}) on {w.job.label}")
            done.append(self._fail_current(w, WorkerFailure(failure, killed=killed)))
        elif not w.ready:
            self._startup_failed(w, how)
        else:
            logger.warning("idle decode worker %s died (%s); replacing it", w.process.pid, how)
        w.kill()
        self._workers[i] = self._start_worker()
        return done

    def _startup_failed(self, w: _Worker, how: str) -> None:
        self._startup_failures += 1
        logger.error("decode worker %s failed to start (%s)", w.process.pid, how)
        if self._startup_failures >= MAX_STARTUP_FAILURES:
            raise RuntimeError(
                f"decode workers keep failing to start ({how}); is decode_fn importable in a "
                f"fresh process (a top-level function of an importable module)?"
            )

    def _start_worker(self) -> _Worker:
        requests_r, requests_w = self._ctx.Pipe(duplex=False)
        results_r, results_w = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=_worker_main, args=(requests_r, results_w, self._decode_fn), name="decode-worker",
                                    daemon=True)
        try:
            process.start()  # the worker's ends travel with it (multiprocessing passes their descriptors)
        finally:
            requests_r.close()  # else the parent holds the worker's ends open and never sees EOF or EPIPE
            results_w.close()
        for conn in (requests_w, results_r):
            _set_pipe_size(conn.fileno())
            os.set_blocking(conn.fileno(), False)
        return _Worker(process, results_r, requests_w, time.monotonic() + STARTUP_TIMEOUT_S)


def _mp_context(decode_fn: Callable[[Any], Any]):
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # Workers fork from the fork server, a clean single-threaded process started by exec. What
    # it imports once, no worker imports again: importing `extractor` pulls in torch, seconds
    # and ~200 MB per worker otherwise (shared copy-on-write this way). Only takes effect if
    # this process's fork server is not running yet, and (Python 3.11) only for modules on the
    # interpreter's default sys.path; workers import whatever else they need themselves.
    modules = ["__main__", __name__, getattr(decode_fn, "__module__", None)]
    ctx.set_forkserver_preload([m for m in dict.fromkeys(modules) if m])
    return ctx


@dataclass(eq=False)
class _Job:
    key: Hashable
    label: str  # the request's path, or the key: what error messages name
    views: list  # the encoded request, kept to send it elsewhere should its worker die first
    size: int  # its bytes
    deadline: float = math.inf  # math.inf while queued behind another job
    messages: int = 0  # received so far


class _Worker:
    def __init__(self, process, results: Connection, requests: Connection, started_deadline: float):
        self.process = process
        # The parent's ends, read and written raw (non-blocking); the Connections own the descriptors.
        self._conns = (results, requests)
        self.reader = Reader(results.fileno())
        self.outbox = Outbox(requests.fileno())
        self.ready = False
        self.started_deadline: float | None = started_deadline
        self.jobs: deque[_Job] = deque()  # the one it decodes, then the one queued behind it
        self.broken = False  # a write to it failed: it is dying, and is sent nothing more

    @property
    def job(self) -> _Job | None:
        """The job the worker is on (its messages are the next to come)."""
        return self.jobs[0] if self.jobs else None

    @property
    def deadline(self) -> float | None:
        return self.job.deadline if self.job is not None else self.started_deadline

    def hang_up(self) -> None:
        """Close the request pipe: an idle worker sees EOF and exits."""
        self._conns[1].close()
        self.broken = True

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()
        self.process.join(5.0)
        for conn in self._conns:
            conn.close()


def _label(key: Hashable, request: Any) -> str:
    """What a failure message names: the request's file, or its first of several."""
    files = getattr(request, "files", None)
    if files:
        return files[0].name if len(files) == 1 else f"{files[0].name} (and {len(files) - 1} more files of its request)"
    path = getattr(request, "path", None)
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    return str(key)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"signal {-code}: {name}"
    return f"exit code {code}"


def _messages(decode_fn: Callable[[Any], Any], request: Any) -> Iterator[Any]:
    """What a job sends: each item a generator yields (or the one return value), then END; a
    WorkerFailure instead of END when decode_fn raises."""
    try:
        result = decode_fn(request)
        if inspect.isgenerator(result):
            yield from result
        else:
            yield result
    except Exception as e:
        yield WorkerFailure(Failure.of(e))
        return
    yield END


# --- the worker process ---------------------------------------------------------------------


def _worker_main(requests: Connection, results: Connection, decode_fn: Callable[[Any], Any]) -> None:
    die_with_parent()
    # Everything inherited from the fork server (torch and all) is long-lived: keep the garbage
    # collector from walking it, which costs time and copies the shared pages into this process.
    gc.freeze()
    # Ctrl-C goes to the whole process group; the parent decides how the run ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _no_core_dumps()
    reader, results_fd = Reader(requests.fileno()), results.fileno()
    try:
        write_all(results_fd, encode(_READY))
    except OSError:
        return  # the pool was closed before this worker got going
    while True:
        try:
            body, buffers = reader.read_one()
        except (EOFError, OSError):
            return  # the parent closed the pool or died
        try:
            request = decode(body, buffers)
        except Exception as e:  # e.g. the request's class is not importable here
            messages = iter([WorkerFailure(Failure(type(e).__name__, f"cannot unpickle the request: {e}"))])
        else:
            messages = _messages(decode_fn, request)
        del body, buffers
        try:
            for message in messages:
                try:
                    views = encode(message)
                except Exception as e:
                    views = encode(WorkerFailure(Failure(type(e).__name__, f"cannot send the result to the parent: {e}")))
                write_all(results_fd, views)
        except OSError:
            return


def die_with_parent() -> None:
    """Get SIGKILL when the parent dies, even mid-decode (when EOF on the pipe goes unseen).

    Under forkserver the kernel's parent is the fork server, which exits when the pool's
    process dies; under spawn it is the pool's process itself.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %s", ctypes.get_errno())
    except (OSError, AttributeError) as e:
        logger.warning("cannot set PR_SET_PDEATHSIG: %s", e)


def _no_core_dumps() -> None:
    # A corpus of malformed files can crash decoders thousands of times; core files would fill
    # the disk. The crash is reported through the exit signal instead.
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
