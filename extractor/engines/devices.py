"""Every device of one host: one worker process per device over one shard, under one lock.

`--devices cuda:0,cuda:1,...` (or `all`) runs the shard an orchestrator gave this host, I of N
(default 0 of 1). The parent runs the shard's lifecycle (shard.ShardRun: the checks, the lock,
the plan from what is committed, the markers) once; its Embed starts one worker per device and
hands out the pending rows in chunks, each to whichever worker asks first, so a slower device
takes fewer of them and none waits for another at the end. Workers read neither the manifest
nor the committed ids: they are handed their rows, their part numbers (worker d of D writes
first_seq + d, + D, ...) and a share of the parent's lock (output.locks.SharedLock), so the lock
stays held until the parent and every worker are gone, and a later run with another number of
devices, or on one, resumes from the same parts.

The first worker to load its model and check the recipe makes the parent begin (the shard's
markers go) before any worker writes. The parent shows one progress bar fed by the workers, logs
their records as one stream, and merges their summaries. A worker that fails stops the others;
what they committed stays valid, and rerunning completes the shard. SIGTERM or SIGINT is passed
on to the workers, which stop as one run does (engines/local.py); workers start with both signals
blocked until their handlers are in place, so a signal during their start-up is a graceful stop too.
"""

from __future__ import annotations

import ctypes
import logging
import logging.handlers
import multiprocessing as mp
import os
import pickle
import queue
import re
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import replace

import polars as pl

from ..audio.pool import die_with_parent
from ..errors import ConfigError, Interrupted
from ..options import JobOptions, default_decode_workers
from ..progress import Progress
from ..seams import NONE, Seams
from ..shard import Control, ShardRun, StopSignal, Work, signal_name, start_ahead
from ..signals import SIGNALS, graceful_signals
from ..summary import Summary, merge
from .local import embed as embed_here

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often the parent looks at its workers between messages
STOP_GRACE_S = 20.0  # SIGTERM (a graceful stop), then SIGKILL
CHUNKS_PER_WORKER = 8  # the pending rows are handed out in about this many chunks per worker, smaller towards the end
MIN_CHUNK_ROWS = 1


def cuda_device_count() -> int:
    """CUDA devices visible to this process (CUDA_VISIBLE_DEVICES applies), asked of the driver
    through libcuda, as torch.cuda.device_count() asks it, without importing torch: the parent of
    the device workers never runs a model, and torch's import is seconds of its start-up. The
    driver is initialised here but no context is made; workers are spawned, never forked."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0  # no NVIDIA driver on this machine
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0  # a driver without a usable device (CUDA_VISIBLE_DEVICES="" gives CUDA_ERROR_NO_DEVICE)
    return count.value


_DEVICE = re.compile(r"(?P<type>[a-z_]+)(?::(?P<index>\d+))?")


def parse_devices(spec: str) -> list[str]:
    """`cuda:0,cuda:1`, `all` (every visible CUDA device) or, to test on CPU, `cpu,cpu`."""
    if spec.strip() == "all":
        n = cuda_device_count()
        if n == 0:
            raise ConfigError("--devices all: no CUDA device is visible on this machine")
        return [f"cuda:{i}" for i in range(n)]
    devices = []
    count = None
    for name in (d.strip() for d in spec.split(",")):
        m = _DEVICE.fullmatch(name)
        if m is None:
            raise ConfigError(f"--devices: {name!r} is not a device (expected cuda:N, all, or cpu)")
        if m["type"] == "cuda":
            if m["index"] is None:
                raise ConfigError(f"--devices: name GPUs by index ({spec!r}: cuda:0,cuda:1,...) or use all")
            count = cuda_device_count() if count is None else count
            if int(m["index"]) >= count:
                raise ConfigError(f"--devices: {name} is not visible here ({count} CUDA device(s))")
            devices.append(f"cuda:{int(m['index'])}")
        elif m["type"] == "cpu" and m["index"] is None:
            devices.append("cpu")
        else:
            raise ConfigError(f"--devices: {name!r} is neither a CUDA device (cuda:N) nor cpu")
    twice = sorted(d for d, n in Counter(devices).items() if n > 1 and d.startswith("cuda"))
    if twice:
        raise ConfigError(f"--devices names {', '.join(twice)} more than once; one worker per GPU")
    return devices


def chunk_sizes(rows: int, workers: int) -> list[int]:
    """Sizes of the chunks `rows` are handed out in: each a share of what is left (guided
    self-scheduling), so the last chunks are small and the workers finish together."""
    sizes, left = [], rows
    while left > 0:
        size = min(left, max(MIN_CHUNK_ROWS, -(-left // (CHUNKS_PER_WORKER * workers // 2 or 1))))
        sizes.append(size)
        left -= size
    return sizes


def run_on_devices(opts: JobOptions, devices: str | list[str], stop: StopSignal | None = None, *, seams: Seams = NONE) -> Summary:
    """Run one shard with one worker process per device; the same contract as ShardRun.run."""
    if isinstance(devices, str):
        devices = parse_devices(devices)
    stop = StopSignal() if stop is None else stop
    with graceful_signals(stop):
        run = ShardRun(opts, seams=seams, stop=stop)
        return run.run(lambda work, control: _embed_on_devices(work, control, devices))


def _embed_on_devices(work: Work, control: Control, devices: list[str]) -> Summary:
    opts, n = work.opts, len(devices)
    logger.info("%d rows to embed on %d devices (%s)", len(work.rows), n, ", ".join(devices))
    decode = opts.decode_workers if opts.decode_workers is not None else default_decode_workers(n)
    tags = [dev if devices.count(dev) == 1 else f"{dev}#{d}" for d, dev in enumerate(devices)]
    # spawn, never fork: this process may hold CUDA state, which a forked child inherits broken.
    ctx = mp.get_context("spawn")
    messages, chunks, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    offset = 0
    for size in chunk_sizes(len(work.rows), n):
        chunks.put(work.rows.slice(offset, size))
        offset += size
    for _ in devices:
        chunks.put(None)  # one end for each worker
    level = logging.getLogger().getEffectiveLevel()
    empty = work.rows.clear()
    procs = []
    for d, dev in enumerate(devices):
        job = replace(work, opts=replace(opts, device=dev, progress=False, decode_workers=decode), rows=empty,
                      first_seq=work.first_seq + d, seq_step=n)
        args = (d, tags[d], job, control.lock.share(), chunks, messages, go, level, os.getpid(), control.seams)
        procs.append(ctx.Process(target=_worker_main, args=args, name=f"embed-{tags[d]}"))
    try:
        # Started with SIGINT and SIGTERM blocked, which they inherit until their handlers are in.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            for p in procs:
                p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        control.lock.add_holders([p.pid for p in procs])
        summaries = _supervise(procs, tags, messages, go, control)
    finally:
        _stop(procs)
        chunks.cancel_join_thread()  # chunks never taken (a stopped run) must not hold this process's exit
    summary = merge(summaries, str(work.out.root), str(work.shard), time.monotonic() - work.t0, False)
    if control.stop.is_set():
        summary.interrupted = signal_name(control.stop)
    return summary


def _supervise(procs: list, tags: list[str], messages, go, control: Control) -> list[Summary]:
    """Relay the workers' messages until all have exited; stop them all at the first failure."""
    summaries: dict[int, Summary] = {}
    errors: list[tuple[int, BaseException]] = []
    stopped: set[int] = set()  # workers that said they stopped for the run's own signal
    first_failed: int | None = None
    forwarded = False
    stop = control.stop

    def handle(message) -> None:
        kind, *payload = message
        if kind == "progress":
            control.progress.update(*payload)
        elif kind == "log":
            _relog(*payload)
        elif kind == "ready":
            if first_failed is None and not stop.is_set() and not go.is_set():
                control.begin()  # the first worker has checked the recipe; nothing is written before this
                go.set()
        elif kind == "done":
            summaries[payload[0]] = payload[1]
        elif kind == "error":
            index, error, remote_tb = payload
            if stop.is_set() and isinstance(error, Interrupted):  # stopped before it wrote: not a failure
                stopped.add(index)
            else:
                error.__cause__ = _RemoteTraceback(remote_tb)
                errors.append((index, error))

    def drain() -> None:
        while True:
            try:
                handle(messages.get_nowait())
            except queue.Empty:
                return

    while True:
        if stop.is_set() and not forwarded:
            forwarded = True
            for p in procs:
                if p.exitcode is None and p.pid is not None:
                    os.kill(p.pid, getattr(stop, "signum", None) or signal.SIGTERM)
        if all(p.exitcode is not None for p in procs):
            drain()  # whatever they sent is in the pipe by now
            break
        try:
            handle(messages.get(timeout=POLL_S))
        except queue.Empty:
            pass
        if first_failed is None:
            unexplained = [d for d, p in enumerate(procs) if p.exitcode not in (None, 0) and d not in summaries and d not in stopped]
            if unexplained:
                drain()  # a worker that exited sent its last word first: read it before judging
            # A worker stopped by the run's own signal is not a failure: it ends as an interrupted run.
            failed = [i for i, _ in errors] + [d for d in unexplained if d not in stopped and d not in summaries
                                              and not (stop.is_set() and -procs[d].exitcode in SIGNALS)]
            if failed:
                first_failed = failed[0]
                if any(p.exitcode is None for p in procs):
                    logger.warning("worker %s failed; stopping the other workers", tags[first_failed])
                    _stop(procs)
    if first_failed is None and errors:
        first_failed = errors[0][0]
    if first_failed is not None:  # the first to fail is the cause; the others were stopped for it
        error = next((e for i, e in errors if i == first_failed), None)
        if error is not None:
            raise error
        code = procs[first_failed].exitcode  # died without a word: a signal, or os._exit in native code
        raise RuntimeError(f"worker {tags[first_failed]} {_describe_exit(code)}; committed parts are intact, rerun to resume")
    missing = [tags[d] for d in range(len(procs)) if d not in summaries]
    if missing and not stop.is_set():
        raise RuntimeError(f"worker {missing[0]} exited without a summary; committed parts are intact, rerun to resume")
    return [summaries[d] for d in sorted(summaries)]


def _stop(procs: list) -> None:
    """SIGTERM every live worker (it stops gracefully), then SIGKILL what is left after STOP_GRACE_S."""
    for p in procs:
        if p.exitcode is None and p.pid is not None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        if p.pid is None:
            continue
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exited with code {code}"


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def _worker_main(index: int, tag: str, work: Work, lock, chunks, messages, go, log_level: int, parent_pid: int, seams: Seams) -> None:
    stop = StopSignal()
    for s in SIGNALS:
        signal.signal(s, lambda signum, frame: stop.stop(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # blocked by the parent while it started us
    die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        return
    root = logging.getLogger()
    root.handlers[:] = [_ForwardLogs(messages, tag)]
    root.setLevel(log_level)
    code = 0
    try:
        # torch is imported, the tower read ahead and this worker's GPU warmed up on a thread while
        # decoding starts; local.embed makes the GPU the current one before anything is put on it.
        start_ahead(work.opts)

        def begin() -> None:
            messages.put(("ready", index))
            while not go.wait(POLL_S):
                if stop.is_set() or os.getppid() != parent_pid:
                    raise Interrupted(stop.signum or signal.SIGTERM)  # nothing written: the parent never began

        def more() -> pl.DataFrame | None:
            while True:
                try:
                    return chunks.get(timeout=POLL_S)
                except queue.Empty:
                    if stop.is_set() or os.getppid() != parent_pid:
                        return None

        progress = Progress(0, enabled=False, on_update=lambda rows, failed, audio_s: messages.put(("progress", rows, failed, audio_s)))
        control = Control(lock, stop, progress, begin, seams, more=more)
        summary = embed_here(work, control)
    except BaseException as e:
        messages.put(("error", index, _portable(e), traceback.format_exc()))
        code = 1
    else:
        messages.put(("done", index, summary))
    finally:
        lock.release()
    # Everything is committed: skip the interpreter's teardown of torch and friends (seconds per
    # worker, measured) once the messages are through to the parent.
    root.handlers[:] = []  # a daemon thread's last record must not hit the closed queue
    messages.close()
    messages.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling to the parent (its type decides the exit code), else its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error.with_traceback(None)
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class _RemoteTraceback(Exception):
    """The worker's traceback, chained under the re-raised error (as concurrent.futures does)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class _ForwardLogs(logging.handlers.QueueHandler):
    """A worker's log records, tagged with its device, onto the parent's queue."""

    def __init__(self, messages, tag: str):
        super().__init__(messages)
        self.tag = tag

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = super().prepare(record)  # message formatted, traceback folded in: picklable
        if getattr(record, "event", None) == "summary":
            # Each worker's own summary line: the parent logs one for the host; per device it is
            # detail, shown with --log-level DEBUG.
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg = f"[{self.tag}] {record.msg}"
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", record))


def _relog(record: logging.LogRecord) -> None:
    target = logging.getLogger(record.name)
    if target.isEnabledFor(record.levelno):
        target.handle(record)
