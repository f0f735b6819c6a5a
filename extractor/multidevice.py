"""Every device of one host: one worker process per device over one manifest, one output, one bar.

`--devices cuda:0,cuda:1,...` (or `all`) splits the shard an orchestrator gave this host, I of N
(default 0 of 1), into D sub-shards: worker d runs the ordinary job, `run_job`, on sub-shard
I + d·N of N·D on its own device. Sub-shards refine shards, since (h mod N·D) mod N == h mod N:
the workers together cover exactly shard I of N, each writes its own parts under its own lock,
and a later run with another number of devices, or on one device, resumes from the same parts.

The parent does what one process must do once: it validates the manifest before anything
starts, shows one progress bar fed by the workers' commits, logs their records as one stream,
and when every worker has succeeded writes shard I's own marker `_SUCCESS-I-of-N` (and
`_SUCCESS` once all N markers exist), as a one-device run of shard I would. A worker that fails
stops the others; what they committed stays valid, and rerunning the command completes the shard.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import read_config
from .manifest import read_manifest
from .output import OutputDir, Shard
from .pipeline import ConfigError, JobOptions, Summary, pending_rows, run_job
from .progress import Progress
from .runner import process_age_s
from .workers import die_with_parent

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often the parent looks at its workers between messages
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL: a worker in uninterruptible I/O (NFS, a GPU driver call) may outlast SIGTERM
MAX_DECODE_WORKERS = 16  # per device, as for one device (pipeline.default_decode_workers)


def parse_devices(spec: str) -> list[str]:
    """`cuda:0,cuda:1`, `all` (every visible CUDA device) or, to test on CPU, `cpu,cpu`."""
    if spec.strip() == "all":
        n = torch.cuda.device_count()
        if n == 0:
            raise ConfigError("--devices all: no CUDA device is visible on this machine")
        return [f"cuda:{i}" for i in range(n)]
    devices = []
    for name in (d.strip() for d in spec.split(",")):
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise ConfigError(f"--devices: {name!r} is not a device (expected cuda:N, all, or cpu)") from e
        if dev.type == "cuda":
            if dev.index is None:
                raise ConfigError(f"--devices: name GPUs by index ({spec!r}: cuda:0,cuda:1,...) or use all")
            if dev.index >= torch.cuda.device_count():
                raise ConfigError(f"--devices: {name} is not visible here ({torch.cuda.device_count()} CUDA device(s))")
        elif dev.type != "cpu":
            raise ConfigError(f"--devices: {name!r} is neither a CUDA device nor cpu")
        devices.append(str(dev))
    twice = sorted(d for d, n in Counter(devices).items() if n > 1 and d.startswith("cuda"))
    if twice:
        raise ConfigError(f"--devices names {', '.join(twice)} more than once; one worker per GPU")
    return devices


def decode_workers_per_device(num_devices: int) -> int:
    # The host's cores are shared: each worker's device loop keeps one, its decoders split the
    # rest with the other workers' (cores - 1 each would oversubscribe the host D times).
    cores = os.cpu_count() or 2
    return max(1, min(MAX_DECODE_WORKERS, (cores - num_devices) // num_devices))


def worker_options(opts: JobOptions, devices: list[str]) -> list[JobOptions]:
    """One run_job per device: sub-shard I + d·N of N·D, no progress display of its own."""
    i, n, d_count = opts.shard.index, opts.shard.count, len(devices)
    decode = opts.decode_workers if opts.decode_workers is not None else decode_workers_per_device(d_count)
    return [
        replace(opts, device=dev, shard=Shard(i + d * n, n * d_count), progress=False, decode_workers=decode, on_progress=None)
        for d, dev in enumerate(devices)
    ]


def run_on_devices(opts: JobOptions, devices: str | list[str]) -> Summary:
    """Run the job with one worker process per device; the same contract as run_job.

    Returns the host's Summary (workers' counts summed, wall time of this process). Raises what the
    first failing worker raised (a ManifestError, LockHeld, ... for exit 2; anything else for
    exit 1), after stopping the others.
    """
    t0 = time.monotonic() - process_age_s()  # as run_job: wall time includes start-up
    if isinstance(devices, str):
        devices = parse_devices(devices)
    shard = opts.shard
    # What a worker would refuse at once is refused here, before D workers start and load models.
    source = read_manifest(opts.manifest, opts.storage_options)
    read_config(Path(opts.model))
    rows = source.shard_rows(shard.index, shard.count)
    out = OutputDir(opts.output, shard, opts.storage_options)
    pending, n_done, n_failed = pending_rows(rows, out, include_failed=opts.retry_failed)
    jobs = worker_options(opts, devices)
    if len(pending):
        # New rows (a grown manifest, --retry-failed): shard I is not complete any more. Its
        # markers, and those its workers left last time, go now rather than when each worker
        # gets going: a worker with no new rows, or another host, finishing meanwhile would see
        # a full set of stale markers and write _SUCCESS over rows still pending.
        for o in (out, *(OutputDir(opts.output, job.shard, opts.storage_options) for job in jobs)):
            o.clear_markers()
    logger.info("%d rows to embed on %d devices (%s), %d already embedded, %d failed earlier → %s",
                len(pending), len(devices), ", ".join(devices), n_done, n_failed, out.root)

    tags = [dev if devices.count(dev) == 1 else f"{dev}#{d}" for d, dev in enumerate(devices)]
    # spawn, never fork: this process may already hold CUDA state, which a forked child inherits broken.
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    level = logging.getLogger().getEffectiveLevel()
    procs = [
        ctx.Process(target=_worker_main, args=(d, tags[d], job, messages, level, os.getpid()), name=f"embed-{tags[d]}")
        for d, job in enumerate(jobs)
    ]
    progress = Progress(len(pending), enabled=opts.progress, on_update=opts.on_progress)
    try:
        for p in procs:
            p.start()
        summaries = _supervise(procs, tags, messages, progress)
    finally:
        progress.close()
        _stop(procs)

    if not (out.shard_done() and out.is_complete()):  # a no-op rerun rewrites nothing
        out.write_markers()
    summary = merge_summaries(summaries, str(out.root), time.monotonic() - t0, out.is_complete())
    logger.info(summary.line())
    return summary


def _supervise(procs: list, tags: list[str], messages, progress: Progress) -> list[Summary]:
    """Relay the workers' messages until all have exited; stop them all at the first failure."""
    summaries: dict[int, Summary] = {}
    errors: list[tuple[int, BaseException]] = []
    first_failed: int | None = None
    while True:
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
    if errors:
        raise errors[0][1]  # the first to fail is the cause; the others were stopped for it
    if first_failed is not None:  # died without a word: a signal, or os._exit in native code
        code = procs[first_failed].exitcode
        raise RuntimeError(f"worker {tags[first_failed]} {_describe_exit(code)}; committed parts are intact, rerun to resume")
    missing = [tags[d] for d in range(len(procs)) if d not in summaries]
    if missing:
        raise RuntimeError(f"worker {missing[0]} exited without a summary; committed parts are intact, rerun to resume")
    return [summaries[d] for d in range(len(procs))]


def _stop(procs: list) -> None:
    """SIGTERM every live worker, then SIGKILL what is left after STOP_GRACE_S.

    A worker dies at once on SIGTERM (no handler is installed); its decode processes follow it
    through PR_SET_PDEATHSIG and the kernel drops its lock, as after any kill.
    """
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


def merge_summaries(parts: list[Summary], output: str, wall_seconds: float, complete: bool) -> Summary:
    """The host's Summary: counts and work summed over devices, times of the slowest device."""
    s = Summary(output=output, wall_seconds=wall_seconds, complete=complete)
    for p in parts:
        s.rows_total += p.rows_total
        s.skipped += p.skipped
        s.embedded += p.embedded
        s.failed += p.failed
        s.audio_seconds += p.audio_seconds
        s.steady_audio_seconds += p.steady_audio_seconds
        s.useful_flops += p.useful_flops
        s.steady_useful_flops += p.steady_useful_flops
        s.batches += p.batches
        s.oom_retries += p.oom_retries
    # failure_rate is failed rows (this run's and earlier ones') over rows, per worker.
    failed_total = sum(round(p.failure_rate * p.rows_total) for p in parts)
    s.failure_rate = failed_total / s.rows_total if s.rows_total else 0.0
    # The devices run side by side: the host is at full speed once its slowest device is.
    s.time_to_first_batch_s = _max(p.time_to_first_batch_s for p in parts)
    s.steady_wall_seconds = max((p.steady_wall_seconds for p in parts), default=0.0)
    s.gpu_peak_mem_gb = _max(p.gpu_peak_mem_gb for p in parts)  # per device
    idle = [p.device_idle_fraction for p in parts if p.device_idle_fraction is not None]
    s.device_idle_fraction = sum(idle) / len(idle) if idle else None
    rss_first = [p.host_rss_gb_first_batch for p in parts if p.host_rss_gb_first_batch is not None]
    rss_end = [p.host_rss_gb_end for p in parts if p.host_rss_gb_end is not None]
    s.host_rss_gb_first_batch = sum(rss_first) if rss_first else None  # the host's, all workers
    s.host_rss_gb_end = sum(rss_end) if rss_end else None
    s.device = ", ".join(f"{n} × {name}" for name, n in Counter(p.device for p in parts).items())
    return s


def _max(values):
    present = [v for v in values if v is not None]
    return max(present) if present else None


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def _worker_main(index: int, tag: str, opts: JobOptions, messages, log_level: int, parent_pid: int) -> None:
    die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        return
    root = logging.getLogger()
    root.handlers[:] = [_ForwardLogs(messages, tag)]
    root.setLevel(log_level)
    try:
        device = torch.device(opts.device)
        if device.type == "cuda":
            # Make the worker's GPU the current one: pinned buffers and events made without an
            # explicit device (runner.DeviceLoop) would otherwise belong to cuda:0, and every
            # worker would open a context there.
            torch.cuda.set_device(device)
        summary = run_job(replace(opts, on_progress=lambda rows, failed, audio_s: messages.put(("progress", rows, failed, audio_s))))
    except BaseException as e:
        messages.put(("error", index, _portable(e), traceback.format_exc()))
        code = 1
    else:
        messages.put(("done", index, summary))
        code = 0
    # Everything is committed and the lock released: skip the interpreter's teardown of torch and
    # friends (seconds per worker, measured) once the messages are through to the parent.
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
        if record.name == run_job.__module__ and record.msg.startswith("done: "):
            # Each worker's own summary line (Summary.line, from pipeline.finish_summary): the
            # parent logs one for the host; per device it is detail, shown with --log-level DEBUG.
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg = f"[{self.tag}] {record.msg}"
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", record))


def _relog(record: logging.LogRecord) -> None:
    target = logging.getLogger(record.name)
    if target.isEnabledFor(record.levelno):
        target.handle(record)
