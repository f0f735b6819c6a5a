"""`--engine ray`: every shard of the layout as a Ray task, on the cluster's GPU (or CPU) nodes.

What runs where:
  driver     checks the configuration (manifest, model, adapter, output) before anything runs,
             submits one task per shard, relays their progress to one bar, and merges their
             summaries. It writes nothing.
  shard task run_shard on the node Ray places it on (one GPU each): its own lock, decode workers
             for the whole shard, parts, failure records and marker; the last shard to finish
             writes `_SUCCESS`. Exactly the local engine's code, so the rows are the same.

The layout is `--num-shards` N (keep it for an output; several per GPU balance the load, since a
GPU that finishes a shard takes the next). The manifest, audio, model and output must be
reachable from every node: object storage (s3://, ...) or a shared file system. A task whose
node dies leaves its committed parts and a lock that the rerun takes over (at once on the same
host, after output.locks.LOCK_STALE_S elsewhere); tasks are not retried by Ray, so the command
exits 1 and the scheduler's retry resumes the shard from its parts.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from ..errors import ConfigError
from ..options import MAX_DECODE_WORKERS, JobOptions, Shard
from ..shard import StopSignal, prepare, run_shard
from ..summary import Summary, merge
from .local import graceful_signals

try:
    import ray
except ImportError:  # the optional extra: pip install '.[ray]'
    ray = None

logger = logging.getLogger(__name__)

CPU_DECODE_WORKERS = 1  # a CPU task: one isolated decoder beside the encoder's threads
PROGRESS_EVERY_S = 1.0  # a task sends its progress to the driver at most this often


def connect() -> bool:
    """Join the cluster at RAY_ADDRESS, or start a local Ray. True when this call did either.

    A Ray already initialised by the caller (a notebook, a test) is used as it is and left alone.
    Shutting down after joining a cluster only disconnects this driver; the cluster stays up.
    """
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # reads RAY_ADDRESS
    else:
        # "local": a fresh instance, never silently one that someone else started on this host.
        ray.init(address="local", include_dashboard=False)
    return True


def task_resources(opts: JobOptions) -> tuple[dict, JobOptions]:
    """What each shard task reserves, and its options (decode workers that fit its CPUs)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = opts.device.startswith("cuda") or (opts.device == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise ConfigError("--device cuda: the Ray cluster has no GPU")
    if use_gpu:
        # A GPU node's CPUs are shared evenly among its GPUs' tasks; one of each share drives the device.
        per_gpu = min((int(n["Resources"].get("CPU", 0) // n["Resources"]["GPU"]) for n in ray.nodes()
                       if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1), default=1)
        workers = opts.decode_workers if opts.decode_workers is not None else max(0, min(MAX_DECODE_WORKERS, per_gpu - 1))
        return {"num_gpus": 1, "num_cpus": 1 + workers}, replace(opts, device="cuda", decode_workers=workers)
    workers = opts.decode_workers if opts.decode_workers is not None else CPU_DECODE_WORKERS
    return {"num_gpus": 0, "num_cpus": 1 + workers}, replace(opts, device="cpu", decode_workers=workers)


class _Relay:
    """A task's progress, sent to the driver's queue at most every PROGRESS_EVERY_S."""

    def __init__(self, queue):
        self.queue, self.pending, self.last = queue, [0, 0, 0.0], time.monotonic()

    def __call__(self, rows: int, failed: int, audio_s: float) -> None:
        self.pending = [self.pending[0] + rows, self.pending[1] + failed, self.pending[2] + audio_s]
        if time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.pending[0]:
            self.queue.put(tuple(self.pending))
            self.pending, self.last = [0, 0, 0.0], time.monotonic()


def shard_task(opts: JobOptions, shard: Shard, queue) -> Summary:
    """One shard, on the node Ray chose: the local engine's run_shard."""
    relay = _Relay(queue)
    try:
        return run_shard(replace(opts, shard=shard, progress=False), shard, on_progress=relay)
    finally:
        relay.flush()


def run_ray(opts: JobOptions) -> Summary:
    """Run every shard of opts.shard.count as Ray tasks; the same output, files and markers."""
    if ray is None:
        raise ConfigError("--engine ray needs Ray: pip install 'qwen2-audio-embeddings[ray]'")
    if opts.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--engine ray: --device must be auto, cpu or cuda, not {opts.device!r}; Ray gives each task its own GPU")
    from ray.util.queue import Queue

    from ..progress import Progress

    n = opts.shard.count
    plan = prepare(opts, Shard(0, n))  # refuses a bad configuration before any task starts
    t0 = plan.t0
    owned = connect()
    stop = StopSignal()
    try:
        resources, task_opts = task_resources(opts)
        logger.info("ray: %d shard task(s), each with %s", n, resources)
        queue = Queue()
        remote = ray.remote(max_retries=0, **resources)(shard_task)
        refs = {remote.remote(task_opts, Shard(i, n), queue): i for i in range(n)}
        summaries: dict[int, Summary] = {}
        errors: list[tuple[int, BaseException]] = []
        interrupted = None
        with graceful_signals(stop), Progress(len(plan.manifest.rows), enabled=opts.progress) as progress:
            waiting = list(refs)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1, timeout=0.5)
                while not queue.empty():
                    progress.update(*queue.get_nowait())
                for ref in done:
                    try:
                        summaries[refs[ref]] = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        errors.append((refs[ref], e.cause if isinstance(e.cause, BaseException) else e))
                    except ray.exceptions.RayError as e:  # the worker or its node died
                        errors.append((refs[ref], RuntimeError(f"shard {refs[ref]} of {n}: {type(e).__name__}: {e}")))
                if stop.is_set() and interrupted is None:
                    interrupted = stop.signum
                    for ref in waiting:
                        ray.cancel(ref)  # KeyboardInterrupt in the task: its writer and lock close, as on any error
            while not queue.empty():
                progress.update(*queue.get_nowait())
    finally:
        if owned:
            ray.shutdown()
    if interrupted is not None:
        import signal

        summary = merge(list(summaries.values()), str(plan.out.root), f"all {n}", time.monotonic() - t0, False)
        summary.interrupted = signal.Signals(interrupted).name
        return summary
    if errors:
        shard, error = errors[0]
        logger.error("shard %d of %d failed (%d of %d failed); committed parts are intact, rerun to resume", shard, n, len(errors), n)
        raise error
    summary = merge([summaries[i] for i in sorted(summaries)], str(plan.out.root), f"all {n}", time.monotonic() - t0,
                    (plan.out.success() or {}).get("whole_manifest") == plan.marker["whole_manifest"])
    logger.info(summary.line(), extra={"event": "summary", "summary": summary.to_json()})
    return summary
