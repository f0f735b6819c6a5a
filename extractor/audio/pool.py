"""Decoding in isolated worker processes.

Native decoders (libsndfile, FFmpeg) can segfault, abort or spin forever on a malformed file.
Out of millions of files some will, so every decode runs in a worker process: a crash or a
hang costs that one file (reported as a WorkerFailure) and a replacement worker, not the run.

Workers are started with 'forkserver' where available ('spawn' elsewhere), never plain fork: the
parent may hold CUDA contexts and threads, which a forked child would inherit half-broken.
Like any spawn-style start, the parent's `__main__` module is imported in each worker, so a
script must keep its work under `if __name__ == "__main__":`.

Results come back over a pipe as a small pickled header plus the raw bytes of every array
(pickle protocol 5 out-of-band buffers), received straight into writable buffers, so 16
workers can stream ~500 MB/s of float32 audio to one parent without pickling arrays in-band.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import logging
import math
import multiprocessing as mp
import os
import pickle
import signal
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Hashable, Iterable, Iterator

from extractor.audio.decode import DecodeRequest, decode_request

logger = logging.getLogger(__name__)

__all__ = ["END", "DecodePool", "DecodeRequest", "WorkerFailure"]

STARTUP_TIMEOUT_S = 60.0  # a worker that is not ready by then (import deadlock, ...) is killed
MAX_STARTUP_FAILURES = 3  # consecutive workers dying before ready: decode_fn cannot run at all
CLOSE_GRACE_S = 1.0  # idle workers exit on EOF within this; the rest get SIGKILL
# A worker holds a second request, queued behind the one it decodes, while requests are short
# (their jobs send at most this many messages on average: a block of clips and END). A short
# request takes ~40 ms to decode; waiting for the next one from the parent, 15 decoders of 48 kHz
# MP3 clips were busy 85 % of the time, 91 % with the next request queued (bench/RESULTS.md). A
# long file's job streams dozens of messages and takes seconds; one queued behind it could idle
# another worker at the end of a run.
SHORT_JOB_MESSAGES = 3.0
_MESSAGES_EMA = 0.2  # weight of the last finished job in the running mean of messages per job
_READY = b"ready"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class _End:
    def __repr__(self) -> str:
        return "END"

    def __reduce__(self):
        return "END"  # unpickles as this module's END: compared with `is`


END = _End()  # stream(): a job's last message, after all it yielded


@dataclass(frozen=True)
class WorkerFailure:
    """The result for a request whose decode did not return normally.

    `error` reads like the pipeline's other failures, "<Kind>: <message>":
    "DecoderCrashed: decoder crashed (signal 11: SIGSEGV) on /x/a.mp3",
    "DecodeTimeout: decode timed out after 120 s on /x/a.mp3", or
    "<ExceptionType>: <message>" for an exception that escaped decode_fn.
    """

    error: str


class DecodePool:
    """Run `decode_fn(request)` for many requests in `num_workers` isolated worker processes.

    `stream(items)` takes `(key, request)` pairs and yields `(key, message)`: each item that
    decode_fn yields (a generator streams: a long file's first windows arrive while it decodes),
    or its return value, then END; or a WorkerFailure in their place when the decode did not
    finish. `imap(items)` yields one `(key, result)` per request, for plain functions.
    `num_workers=0` runs decode_fn in the calling thread: no processes and no isolation, for
    notebooks and tiny runs.

    A job's timeout counts from its last message, so a long file that streams steadily is not
    cut off, and a decoder that stops making progress is. While jobs are short, a worker is sent
    its next request before it finishes the current one (SHORT_JOB_MESSAGES): the queued request
    is not started, so a crash or a timeout of the current one fails that one alone and the
    queued request goes to another worker.
    """

    def __init__(
        self,
        num_workers: int,
        *,
        timeout_s: float = 120.0,
        decode_fn: Callable[[Any], Any] | None = None,
        max_inflight: int | None = None,
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
        self._workers: list[_Worker] = []
        self._startup_failures = 0
        self._messages_per_job: float | None = None  # running mean over finished jobs
        self._pending: deque = deque()  # the running stream's requests not yet sent
        self._closed = False
        self._running = False
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

        At most max_inflight requests are outstanding; `items` is pulled lazily. Stopping the
        iteration early kills the workers still busy with requests of it (they are replaced).
        With poll_s, `(None, None)` comes whenever that long passes without a message, so the
        caller can do other work while the workers decode.
        """
        if self._closed:
            raise ValueError("DecodePool is closed")
        if self._num_workers == 0:
            return self._stream_inline(items)
        return self._stream_workers(items, poll_s)

    def imap(self, items: Iterable[tuple[Hashable, Any]]) -> Iterator[tuple[Hashable, Any]]:
        """Yield `(key, result)` once per request, in completion order: decode_fn's return value
        (the last item, for a generator) or a WorkerFailure."""
        return self._results(self.stream(items))

    @staticmethod
    def _results(stream: Iterator[tuple[Hashable, Any]]) -> Iterator[tuple[Hashable, Any]]:
        last: dict[Hashable, Any] = {}
        for key, message in stream:
            if message is END:
                yield key, last.pop(key, None)
            elif isinstance(message, WorkerFailure):
                last.pop(key, None)
                yield key, message
            else:
                last[key] = message

    def close(self) -> None:
        """Stop all workers: idle ones exit on EOF, busy or stuck ones are killed."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            w.conn.close()  # EOF: an idle worker returns from its loop
            if w.jobs:
                w.kill()  # its result is not wanted any more; do not wait for it
        deadline = time.monotonic() + CLOSE_GRACE_S
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.exitcode is None:
                w.kill()
        self._workers.clear()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- in-process -------------------------------------------------------------------------

    def _stream_inline(self, items):
        for key, request in items:
            for message in _messages(self._decode_fn, request):
                yield key, message

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
        pending = self._pending = deque()  # (key, request) pulled, not yet sent to a worker
        results: deque[tuple[Hashable, Any]] = deque()  # finished, not yet yielded
        exhausted = False
        try:
            while True:
                if self._closed:
                    raise ValueError("DecodePool was closed during imap")
                # Refill and hand out work before yielding: the consumer may be slow, and the
                # workers should be decoding meanwhile. Outstanding = pending + busy + results.
                busy = sum(len(w.jobs) for w in self._workers)
                while not exhausted and len(pending) + busy + len(results) < self._max_inflight:
                    try:
                        pending.append(next(source))
                    except StopIteration:
                        exhausted = True
                results.extend(self._dispatch(pending))
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
            if not self._closed:
                # Abandoned mid-run: results still being computed would reach the next imap.
                for w in self._workers:
                    if w.jobs:
                        w.kill()
                self._workers = [w for w in self._workers if not w.jobs]

    def _depth(self) -> int:
        """Requests a worker may hold: two while finished jobs were short, else one."""
        short = self._messages_per_job is not None and self._messages_per_job <= SHORT_JOB_MESSAGES
        return 2 if short else 1

    def _dispatch(self, pending: deque) -> list[tuple[Hashable, Any]]:
        """Send pending requests to idle workers, then (short jobs) one to queue behind each busy
        one; return results that are known without a worker."""
        done = []
        for depth in range(1, self._depth() + 1):
            done.extend(self._send(pending, depth))
        return done

    def _send(self, pending: deque, depth: int) -> list[tuple[Hashable, Any]]:
        done = []
        for i, w in enumerate(self._workers):
            if not pending:
                break
            if not w.ready or w.broken or len(w.jobs) >= depth:
                continue
            key, request = pending.popleft()
            try:
                data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:
                done.append((key, WorkerFailure(f"{type(e).__name__}: cannot send request: {e}")))
                continue
            try:
                w.conn.send_bytes(data)
            except OSError:
                # The worker died. The request was never received, so it goes back to the queue
                # rather than failing.
                pending.appendleft((key, request))
                if w.jobs:
                    # Busy: what it sent before dying is still to be read, and says which of its
                    # jobs it died on. _poll reads it, then fails that job and replaces the worker.
                    w.broken = True
                    continue
                how = _describe_exit(w.process.exitcode)
                logger.warning("idle decode worker %s died (%s); replacing it", w.process.pid, how)
                w.kill()
                self._workers[i] = self._start_worker()
                continue
            # A queued request's timeout starts when the worker gets to it (see _finished).
            w.jobs.append(_Job(key, _label(key, request), time.monotonic() + self._timeout_s if not w.jobs else math.inf, request))
        return done

    def _finished(self, w: _Worker) -> None:
        """The worker's current job sent its last message: the queued one (if any) starts now."""
        job = w.jobs.popleft()
        m = self._messages_per_job
        self._messages_per_job = job.messages if m is None else (1 - _MESSAGES_EMA) * m + _MESSAGES_EMA * job.messages
        if w.jobs:
            w.jobs[0].deadline = time.monotonic() + self._timeout_s

    def _requeue(self, w: _Worker) -> None:
        """Requests queued behind a dying worker's current job were never started: back to the
        front of the queue, in their order, for another worker."""
        while len(w.jobs) > 1:
            job = w.jobs.pop()
            self._pending.appendleft((job.key, job.request))

    def _poll(self, poll_s: float | None = None) -> list[tuple[Hashable, Any]]:
        """Wait for results, deaths, readiness or the next deadline; handle whatever happened."""
        deadlines = [w.deadline for w in self._workers if w.deadline is not None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        if poll_s is not None:
            timeout = poll_s if timeout is None else min(timeout, poll_s)
        conns = {w.conn: w for w in self._workers}
        sentinels = {w.process.sentinel: w for w in self._workers}
        ready = set(wait(list(conns) + list(sentinels), timeout))
        done: list[tuple[Hashable, Any]] = []
        # Read results before judging deaths and deadlines: a worker may have finished just in
        # time, or sent its result and then died.
        for i, w in enumerate(self._workers):
            if w.conn in ready:
                try:
                    if not w.ready:
                        if w.conn.recv_bytes() != _READY:
                            raise EOFError("unexpected first message")
                        w.ready = True
                        w.started_deadline = None
                        self._startup_failures = 0
                    else:
                        message = _recv_result(w.conn)
                        job = w.job
                        if job is not None:
                            done.append((job.key, message))
                            job.messages += 1
                            if message is END or isinstance(message, WorkerFailure):
                                self._finished(w)  # a failure is the job's last message too
                            else:
                                job.deadline = time.monotonic() + self._timeout_s
                    continue
                except (EOFError, OSError):
                    pass  # the pipe broke: treat as a death, below
            elif w.process.sentinel not in ready:
                continue
            done.extend(self._replace_dead(i))
        now = time.monotonic()
        for i, w in enumerate(self._workers):
            if w.job is not None and w.job.deadline <= now:
                job = w.job
                self._requeue(w)
                w.kill()
                logger.warning("decode timed out after %gs on %s; worker killed", self._timeout_s, job.label)
                error = f"DecodeTimeout: decode timed out after {self._timeout_s:g} s on {job.label}"
                done.append((job.key, WorkerFailure(error)))
                self._workers[i] = self._start_worker()
            elif w.started_deadline is not None and w.started_deadline <= now:
                w.kill()
                self._startup_failed(w, f"not ready after {STARTUP_TIMEOUT_S:g} s")
                self._workers[i] = self._start_worker()
        return done

    def _replace_dead(self, i: int) -> list[tuple[Hashable, Any]]:
        w = self._workers[i]
        w.process.join(5.0)  # the pipe closes a moment before the process is reaped
        if w.process.exitcode is None:
            w.kill()  # it closed its pipe but lives on: not a usable worker
        how = _describe_exit(w.process.exitcode)
        done = []
        if w.job is not None:
            logger.warning("decoder crashed (%s) on %s; replacing the worker", how, w.job.label)
            done.append((w.job.key, WorkerFailure(f"DecoderCrashed: decoder crashed ({how}) on {w.job.label}")))
            self._requeue(w)
        elif not w.ready:
            self._startup_failed(w, how)
        else:
            logger.warning("idle decode worker %s died (%s); replacing it", w.process.pid, how)
        w.conn.close()
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
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main, args=(child_conn, self._decode_fn), name="decode-worker", daemon=True
        )
        process.start()
        child_conn.close()  # else the parent holds the worker's end open and never sees EOF
        return _Worker(process, parent_conn, time.monotonic() + STARTUP_TIMEOUT_S)


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


@dataclass
class _Job:
    key: Hashable
    label: str  # the request's path, or the key: what error messages name
    deadline: float  # math.inf while queued behind another job
    request: Any = None  # kept to send it elsewhere should the worker die before starting it
    messages: int = 0  # received so far


class _Worker:
    def __init__(self, process, conn: Connection, started_deadline: float):
        self.process = process
        self.conn = conn
        self.ready = False
        self.started_deadline: float | None = started_deadline
        self.jobs: deque[_Job] = deque()  # the one it decodes, then the one queued behind it
        self.broken = False  # a send to it failed: it is dying, and is sent nothing more

    @property
    def job(self) -> _Job | None:
        """The job the worker is on (its messages are the next to come)."""
        return self.jobs[0] if self.jobs else None

    @property
    def deadline(self) -> float | None:
        return self.job.deadline if self.job is not None else self.started_deadline

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()
        self.process.join(5.0)
        self.conn.close()


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
        yield WorkerFailure(f"{type(e).__name__}: {e}")
        return
    yield END


# --- the wire: a pickled header, then each out-of-band buffer as its own message ----------------


def _send_result(conn: Connection, result: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    try:
        body = pickle.dumps(result, protocol=5, buffer_callback=buffers.append)
        raws = [b.raw() for b in buffers]
    except Exception as e:
        failure = WorkerFailure(f"{type(e).__name__}: cannot send the result to the parent: {e}")
        body, raws = pickle.dumps(failure, protocol=5), []
    conn.send_bytes(pickle.dumps((body, [r.nbytes for r in raws]), protocol=5))
    for raw in raws:
        conn.send_bytes(raw)


def _recv_result(conn: Connection) -> Any:
    body, sizes = pickle.loads(conn.recv_bytes())
    # bytearrays keep the arrays writable and avoid a copy in pickle.loads.
    buffers = [bytearray(n) for n in sizes]
    for buf in buffers:
        _recv_bytes_into(conn, buf)
    try:
        return pickle.loads(body, buffers=buffers)
    except Exception as e:  # e.g. a class the parent cannot import; the worker itself is fine
        return WorkerFailure(f"{type(e).__name__}: cannot unpickle the result: {e}")


def _recv_bytes_into(conn: Connection, buf: bytearray) -> None:
    """Connection.recv_bytes_into without its two intermediate copies (via BytesIO).

    Reads one message in Connection's framing (a 4-byte big-endian length, or -1 and an 8-byte
    length) straight into `buf` with readv. Connection keeps no read buffer, so mixing this with
    its own recv_bytes on the same pipe is safe.
    """
    fd = conn.fileno()
    (size,) = struct.unpack("!i", _read_exact(fd, 4))
    if size == -1:
        (size,) = struct.unpack("!Q", _read_exact(fd, 8))
    if size != len(buf):
        raise EOFError(f"protocol error: expected {len(buf)} bytes, got a message of {size}")
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError("worker pipe closed mid-message")
        got += n


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError("worker pipe closed mid-message")
        data += chunk
    return data


# --- the worker process ---------------------------------------------------------------------


def _worker_main(conn: Connection, decode_fn: Callable[[Any], Any]) -> None:
    die_with_parent()
    # Everything inherited from the fork server (torch and all) is long-lived: keep the garbage
    # collector from walking it, which costs time and copies the shared pages into this process.
    gc.freeze()
    # Ctrl-C goes to the whole process group; the parent decides how the run ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _no_core_dumps()
    try:
        conn.send_bytes(_READY)
    except OSError:
        return  # the pool was closed before this worker got going
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent closed the pool or died
        try:
            request = pickle.loads(data)
        except Exception as e:  # e.g. the request's class is not importable here
            messages = iter([WorkerFailure(f"{type(e).__name__}: cannot unpickle the request: {e}")])
        else:
            messages = _messages(decode_fn, request)
        try:
            for message in messages:
                _send_result(conn, message)
        except (EOFError, OSError):
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
