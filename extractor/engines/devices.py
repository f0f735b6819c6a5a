"""Every device of one host: one worker process per device over one shard, under one lock.

`--devices cuda:0,cuda:1,...` (or `all`) runs the shard an orchestrator gave this host, I of N
(default 0 of 1), as D parts: worker d embeds sub-shard I + d·N of N·D (shard.sub_shard) on its
own device. The parent takes the shard's lock before any worker starts, and each worker inherits
it (output.locks.SharedLock), so the lock stays held until the parent and every worker are gone,
and a run beside a live one is refused (exit 75) with nothing written. Part numbers are dealt out
by the parent (worker d writes first_seq + d, + D, ...), so workers never collide, and a later run
with another number of devices, or on one device, resumes from the same parts.

The parent does what must be done once: it checks the configuration before any worker starts,
waits until every worker has loaded its model and checked the recipe, then clears the shard's
markers (and with --retry-failed drops its old failure records) before any worker writes. It
shows one progress bar fed by the workers, logs their records as one stream, and when every
worker has succeeded writes the shard's marker (and `_SUCCESS` once all shards are done). A worker
that fails stops the others; what they committed stays valid, and rerunning completes the shard.
SIGTERM or SIGINT is passed to the workers, which stop as one run does (engines/local.py).
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

from ..audio.pool import die_with_parent
from ..errors import ConfigError
from ..options import JobOptions, default_decode_workers
from ..shard import StopSignal, begin_writes, embed_locked, finish, is_noop, pending_rows, prepare, start_ahead
from ..summary import Summary, merge
from .local import graceful_signals

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often the parent looks at its workers between messages
STOP_GRACE_S = 20.0  # SIGTERM (a graceful stop), then SIGKILL


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


def run_on_devices(opts: JobOptions, devices: str | list[str], stop: StopSignal | None = None) -> Summary:
    """Run one shard with one worker process per device; the same contract as run_shard."""
    if isinstance(devices, str):
        devices = parse_devices(devices)
    plan = prepare(opts)
    if is_noop(plan):
        summary = plan.summary()
        summary.noop = summary.complete = True
        summary.skipped = len(plan.rows)
        return finish(plan, summary)
    stop = StopSignal() if stop is None else stop
    if stop.is_set():  # a signal while the command started
        summary = plan.summary()
        summary.interrupted = signal.Signals(stop.signum).name
        return finish(plan, summary)
    with graceful_signals(stop):
        try:
            with plan.out.lock(plan.shard) as lock:
                pending, n_done, n_failed = pending_rows(plan, plan.rows)
                if not len(pending):
                    summary = plan.summary()
                    summary.skipped = n_done + (0 if opts.retry_failed else n_failed)
                else:
                    logger.info("%d rows to embed on %d devices (%s), %d already embedded, %d failed earlier → %s",
                                len(pending), len(devices), ", ".join(devices), n_done, n_failed, plan.out.root)
                    summary = _run_workers(plan, lock, devices, stop)
                if summary.interrupted is None:
                    summary.complete = plan.out.write_markers(plan.shard, plan.marker, lock)
                    plan.out.forget_created()
        finally:
            plan.out.remove_created()
    return finish(plan, summary)


def _run_workers(plan, lock, devices: list[str], stop: StopSignal) -> Summary:
    from ..progress import Progress

    opts, n = plan.opts, len(devices)
    first_seq = plan.out.next_seq(plan.shard)
    decode = opts.decode_workers if opts.decode_workers is not None else default_decode_workers(n)
    tags = [dev if devices.count(dev) == 1 else f"{dev}#{d}" for d, dev in enumerate(devices)]
    # spawn, never fork: this process may hold CUDA state, which a forked child inherits broken.
    ctx = mp.get_context("spawn")
    messages, go = ctx.Queue(), ctx.Event()
    level = logging.getLogger().getEffectiveLevel()
    procs = []
    for d, dev in enumerate(devices):
        # plan.opts: a Hub repo id is resolved once, here, and every worker loads the same files.
        job = replace(plan.opts, device=dev, progress=False, decode_workers=decode)
        args = (d, n, tags[d], job, lock.share(), first_seq, plan.t0, messages, go, level, os.getpid())
        procs.append(ctx.Process(target=_worker_main, args=args, name=f"embed-{tags[d]}"))
    with Progress(len(pending_rows(plan, plan.rows)[0]), enabled=opts.progress) as progress:
        try:
            for p in procs:
                p.start()
            lock.add_holders([p.pid for p in procs])
            summaries = _supervise(plan, lock, procs, tags, messages, go, progress, first_seq, stop)
        finally:
            _stop(procs)
    return merge(summaries, str(plan.out.root), str(plan.shard), time.monotonic() - plan.t0, False)


def _supervise(plan, lock, procs: list, tags: list[str], messages, go, progress, first_seq: int, stop: StopSignal) -> list[Summary]:
    """Relay the workers' messages until all have exited; stop them all at the first failure."""
    summaries: dict[int, Summary] = {}
    errors: list[tuple[int, BaseException]] = []
    ready: set[int] = set()
    first_failed: int | None = None
    forwarded = False
    while True:
        if stop.is_set() and not forwarded:
            forwarded = True
            for p in procs:
                if p.exitcode is None and p.pid is not None:
                    os.kill(p.pid, stop.signum or signal.SIGTERM)
        exited = all(p.exitcode is not None for p in procs)
        try:
            # Once all have exited, whatever they sent is already in the pipe: drain without waiting.
            message = messages.get_nowait() if exited else messages.get(timeout=POLL_S)
        except queue.Empty:
            if exited:
                break
            message = None
        if message is not None:
            kind, *payload = message
            if kind == "progress":
                progress.update(*payload)
            elif kind == "log":
                _relog(*payload)
            elif kind == "ready":
                ready.add(payload[0])
                if len(ready) == len(procs) and first_failed is None and not stop.is_set():
                    # Every worker has checked the recipe; nothing is written before this.
                    begin_writes(plan, lock, first_seq)
                    go.set()
            elif kind == "done":
                summaries[payload[0]] = payload[1]
            elif kind == "error":
                index, error, remote_tb = payload
                error.__cause__ = _RemoteTraceback(remote_tb)
                errors.append((index, error))
        if first_failed is None:
            failed = [i for i, _ in errors] + [d for d, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                first_failed = failed[0]
                if any(p.exitcode is None for p in procs):
                    logger.warning("worker %s failed; stopping the other workers", tags[first_failed])
                    _stop(procs)
    if first_failed is not None:  # the first to fail is the cause; the others were stopped for it
        error = next((e for i, e in errors if i == first_failed), None)
        if error is not None:
            raise error
        code = procs[first_failed].exitcode  # died without a word: a signal, or os._exit in native code
        raise RuntimeError(f"worker {tags[first_failed]} {_describe_exit(code)}; committed parts are intact, rerun to resume")
    missing = [tags[d] for d in range(len(procs)) if d not in summaries]
    if missing:
        raise RuntimeError(f"worker {missing[0]} exited without a summary; committed parts are intact, rerun to resume")
    return [summaries[d] for d in range(len(procs))]


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


def _worker_main(index: int, parts: int, tag: str, opts: JobOptions, lock, first_seq: int, t0: float, messages, go,
                 log_level: int, parent_pid: int) -> None:
    die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        return
    root = logging.getLogger()
    root.handlers[:] = [_ForwardLogs(messages, tag)]
    root.setLevel(log_level)
    stop = StopSignal()
    signal.signal(signal.SIGTERM, lambda s, f: stop.stop(s))
    signal.signal(signal.SIGINT, lambda s, f: stop.stop(s))
    code = 0
    try:
        # torch is imported, the tower read ahead and this worker's GPU warmed up on a thread while
        # the plan is made and decoding starts; embed_locked makes the GPU the current one (else
        # pinned buffers and events would belong to cuda:0) before anything is put on it.
        start_ahead(opts)
        plan = prepare(opts)
        plan.t0 = t0  # times from the command's launch, as one device's run counts them

        def ready() -> None:
            messages.put(("ready", index))
            while not go.wait(POLL_S):
                if stop.is_set() or os.getppid() != parent_pid:
                    raise SystemExit(1)

        summary = embed_locked(plan, lock, part=(index, parts), first_seq=first_seq + index, seq_step=parts, stop=stop,
                               on_progress=lambda rows, failed, audio_s: messages.put(("progress", rows, failed, audio_s)), ready=ready)
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
