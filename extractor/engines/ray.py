"""`--engine ray`: every shard of the layout as a Ray task, on the cluster's GPU (or CPU) nodes.

What runs where:
  driver     reads and checks the configuration (flags, model, adapter, manifest, output and its
             recipe) before it even connects to Ray: a bad one is refused with exit 2 and no task
             starts. Then it submits one task per shard of `--num-shards`, shows the tasks' progress
             as one bar (or one log stream), passes a SIGTERM/SIGINT on to them, and merges their
             summaries. It writes nothing: no embedding and no file.
  shard task a ShardRun with the local engine's embed, on the node Ray places it on (one GPU each on a
             GPU cluster): its own lock, decode workers for the whole shard, parts, failure records
             and marker; the shard that finds every marker in place writes `_SUCCESS`. So the rows
             are the local engine's, bit for bit.

The layout is `--num-shards` N (an output keeps it; several shards per GPU balance the load, since a
GPU that finishes a shard takes the next). The manifest, audio, model and output must be reachable
from every node: object storage (s3://, ...), a shared file system, or the Hub for the model (a repo
id is resolved once, on the driver, and every task is given the commit it resolved to, so no node
embeds with weights pushed to the branch in the meantime). Relative local paths are made absolute
on the driver.

Failures. Ray does not retry a shard task (max_retries=0): a task whose worker or node died leaves
its committed parts and its lock, and a retry placed on another node would find that lock fresh
(it is free at once only to a run on the same host, else after output.locks.LOCK_STALE_S) and fail
with exit 75 anyway. So the other shards run to their end, the command exits 1, and the
scheduler's retry of the whole command resumes every unfinished shard from its parts.

Signals. The first SIGTERM/SIGINT stops every task the way the local engine stops (what is
embedded is committed, the lock is let go); the driver waits for them and exits 143/130. A second
one cancels the tasks and exits at once; a lock left on an object store by a task Ray then kills is
taken over at once on the same host, else after LOCK_STALE_S.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
import time
from dataclasses import replace

from ..errors import ConfigError, Interrupted
from ..model.hub import pinned_spec
from ..options import MAX_DECODE_WORKERS, JobOptions, Shard
from ..urls import is_url
from ..seams import NONE, Seams
from ..shard import Plan, StopSignal, prepare, standing_failures
from ..signals import graceful_signals
from ..summary import Summary, merge
from .local import run_shard

try:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError:  # the optional extra: pip install '.[ray]'
    ray = None

logger = logging.getLogger(__name__)

CPU_DECODE_WORKERS = 1  # a CPU task: one isolated decoder beside the encoder's threads
RELAY_EVERY_S = 1.0  # a task sends its progress and log lines to the driver, and learns of a stop, this often
PACKAGE_LOGGER = __name__.split(".")[0]  # "extractor": the records a task relays to the driver


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
    """What each shard task reserves, and its options (its decode workers).

    Ray gives a task as many CPUs as it reserves (OMP_NUM_THREADS too): one drives the device (or
    runs the encoder on CPU), one each decode worker, within the task's share of a node (a GPU
    node's CPUs are shared evenly among its GPUs), so that no GPU waits for CPUs another GPU's task
    holds, and no reservation waits forever for a node it cannot fit. The decode workers stay
    isolated processes (at least one, as in the local engine) even where the share is one CPU.
    The device is passed on as given: "auto" resolves in the task, which sees only its own GPU.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    use_gpu = opts.device == "cuda" or (opts.device == "auto" and any(n.get("GPU", 0) >= 1 for n in nodes))
    if use_gpu:
        gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= 1]
        if not gpu_nodes:
            raise ConfigError("--device cuda: the Ray cluster has no GPU node")
        share = min(int(n.get("CPU", 0) // n["GPU"]) for n in gpu_nodes)
        default = max(1, min(MAX_DECODE_WORKERS, share - 1))
    else:
        share = max((int(n.get("CPU", 0)) for n in nodes), default=0)
        if share < 1:
            raise ConfigError("--engine ray: the Ray cluster has no CPU for a task")
        default = CPU_DECODE_WORKERS
    workers = opts.decode_workers if opts.decode_workers is not None else default
    return {"num_gpus": 1 if use_gpu else 0, "num_cpus": max(1, min(1 + workers, share))}, replace(opts, decode_workers=workers)


class _DriverStop(StopSignal):
    """The driver's stop: `signum` set by the first signal, `again` by a second one."""

    again: int | None = None


def driver_signals(stop: _DriverStop):
    """extractor.signals.graceful_signals for the driver, except that a second signal does not
    raise from the handler: the driver waits inside Ray's calls, through which an exception raised
    by a handler comes out as a SystemError. It sets `stop.again`, and the driver's loop raises."""
    return graceful_signals(stop, on_second=lambda signum: setattr(stop, "again", signum), what="stopping every shard")


def portable(opts: JobOptions, plan: Plan) -> JobOptions:
    """The options as every node must read them: Hub repo ids pinned to the commit the driver
    resolved (`org/name@<sha>`), local paths absolute (a task's working directory is its node's)."""

    def local_path(path: str | None) -> str | None:
        return path if path is None or is_url(path) else os.path.abspath(path)

    def model_path(resolved: str | None) -> str | None:
        pinned = pinned_spec(resolved)
        return pinned if pinned != resolved else local_path(resolved)

    return replace(opts, manifest=replace(opts.manifest, path=local_path(opts.manifest.path)), output=local_path(opts.output),
                   model=model_path(plan.opts.model), adapter=model_path(plan.opts.adapter))


class _Hub:
    """The driver's end of the tasks' relays (a Ray actor): progress and log records in, the
    driver's stop request out, in the reply to each report."""

    def __init__(self):
        self.items: list = []
        self.signum: int | None = None

    def report(self, items: list) -> int | None:
        self.items.extend(items)
        return self.signum

    def take(self) -> list:
        items, self.items = self.items, []
        return items

    def stop(self, signum: int) -> None:
        self.signum = signum


class _Relay(logging.Handler):
    """A task's end: its progress and its package's log records, sent to the driver's hub every
    RELAY_EVERY_S by one thread, which sets the task's StopSignal when the driver asks to stop."""

    def __init__(self, hub, stop: StopSignal, where: str, level: int):
        super().__init__(level)
        self.hub, self.stop, self.where = hub, stop, where
        self.items: list = []
        self.progress = [0, 0, 0.0]
        self.guard = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ray-relay", daemon=True)

    def on_progress(self, rows: int, failed: int, audio_s: float) -> None:
        with self.guard:
            self.progress = [self.progress[0] + rows, self.progress[1] + failed, self.progress[2] + audio_s]

    def emit(self, record: logging.LogRecord) -> None:
        # Formatted here: the arguments and the traceback may not pickle, the text does.
        record = copy.copy(record)
        record.msg, record.args = f"{self.where}: {record.getMessage()}", None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if getattr(record, "event", None) == "summary":
            record.event = "shard_summary"  # the driver's merged summary is the run's one "summary" event
        with self.guard:
            self.items.append(("log", record))

    def flush(self) -> None:
        with self.guard:
            items, self.items = self.items, []
            if self.progress[0] or self.progress[1]:
                items.append(("progress", tuple(self.progress)))
                self.progress = [0, 0, 0.0]
        try:
            signum = ray.get(self.hub.report.remote(items))
        except ray.exceptions.RayError:
            return  # the driver is gone; Ray ends its job's tasks
        if signum and not self.stop.is_set():
            logging.getLogger(__name__).warning("the driver got %s: stopping; what is embedded is committed", signal.Signals(signum).name)
            self.stop.stop(signum)

    def _run(self) -> None:
        while not self.closed.wait(RELAY_EVERY_S):
            self.flush()

    def __enter__(self) -> _Relay:
        package = logging.getLogger(PACKAGE_LOGGER)
        self.saved_level = package.level
        package.setLevel(self.level)
        package.addHandler(self)
        self.flush()  # at once: a task that starts after the driver was stopped learns it before it reads anything
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        # A Ray worker runs the job's tasks one after another: leave its logging as it was.
        package = logging.getLogger(PACKAGE_LOGGER)
        package.removeHandler(self)
        package.setLevel(self.saved_level)
        self.closed.set()
        self.thread.join()
        self.flush()  # the last records, before the task's result tells the driver it is done


def shard_task(opts: JobOptions, shard: Shard, hub, log_level: int, seams: Seams = NONE) -> Summary:
    """One shard, on the node Ray chose: the local engine's embed in a ShardRun."""
    stop = StopSignal()
    where = f"shard {shard.index} of {shard.count} ({ray.util.get_node_ip_address()}, pid {os.getpid()})"
    with _Relay(hub, stop, where, log_level) as relay:
        if stop.is_set():  # stopped while this task was queued: not even the manifest is read
            return Summary(output=opts.output, shard=str(shard), interrupted=signal.Signals(stop.signum).name)
        return run_shard(replace(opts, shard=shard, progress=False), shard, stop=stop, seams=seams, on_progress=relay.on_progress)


def _nothing_to_do(plan: Plan) -> Summary | None:
    """The whole output is done for this manifest, and `_SUCCESS` was written by a task that read
    the inputs this driver reads (a Hub commit is the same on every host; a directory's stat
    signature is one host's): a rerun needs no cluster. Else the tasks find out, each from its marker."""
    done = plan.out.success() or {}
    if plan.opts.retry_failed or not _success_stands(plan) or done.get("inputs") != plan.marker["inputs"]:
        return None
    everything = replace(plan, rows=plan.manifest.rows)
    summary = Summary(output=str(plan.out.root), shard=f"all {plan.shard.count}", rows_total=len(everything.rows),
                      skipped=len(everything.rows), noop=True, complete=True, standing_failed=standing_failures(everything),
                      wall_seconds=time.monotonic() - plan.t0)
    logger.info("nothing to do: every shard of the manifest is already in %s", plan.out.root)
    return summary


def run_ray(opts: JobOptions, stop: StopSignal | None = None, *, seams: Seams = NONE) -> Summary:
    """Run every shard of opts.shard.count as Ray tasks; the same output, files and markers.

    `stop`: the command's (extractor.signals), set if a signal came while it started; the driver
    then installs its own handlers for the time it waits on Ray (driver_signals)."""
    if ray is None:
        raise ConfigError("--engine ray needs Ray: pip install 'qwen2-audio-embeddings[ray]'")
    if opts.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--engine ray: --device must be auto, cpu or cuda, not {opts.device!r}; Ray gives each task its own GPU")
    if opts.shard.index:
        raise ConfigError(f"--engine ray runs every shard of --num-shards {opts.shard.count}; --shard-index {opts.shard.index} "
                          "is for running one shard with the local engine")
    from ..progress import Progress

    n = opts.shard.count
    plan = prepare(opts, Shard(0, n))  # refuses a bad configuration before Ray is even joined
    summary = _nothing_to_do(plan)
    if summary is not None:
        logger.info(summary.line(), extra={"event": "summary", "summary": summary.to_json()})
        return summary
    if stop is not None and stop.is_set():  # a signal while the command started: no task is started
        summary = plan.summary()
        summary.interrupted = signal.Signals(stop.signum).name
        return summary
    owned = connect()
    stop = _DriverStop()
    summaries: dict[int, Summary] = {}
    errors: list[tuple[int, BaseException]] = []
    hub = None
    try:
        resources, task_opts = task_resources(opts)
        task_opts = portable(task_opts, plan)
        logger.info("ray: %d shard task(s), each with %s, on %d node(s)", n, resources, sum(1 for x in ray.nodes() if x.get("Alive")))
        # The hub takes no CPU, so it never waits for, nor holds back, a shard task; it lives on the
        # driver's node, so that a node that dies takes no more than its own tasks with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        hub = ray.remote(num_cpus=0, scheduling_strategy=here)(_Hub).remote()
        # SPREAD: a shard's decoding wants its node's CPUs and network as much as its GPU.
        remote = ray.remote(max_retries=0, scheduling_strategy="SPREAD", **resources)(shard_task)
        level = logging.getLogger(PACKAGE_LOGGER).getEffectiveLevel()
        with driver_signals(stop), Progress(len(plan.manifest.rows), enabled=opts.progress) as progress:
            refs: dict = {}
            waiting, told = [], False
            try:
                for i in range(n):
                    ref = remote.remote(task_opts, Shard(i, n), hub, level, seams)
                    refs[ref] = i
                    waiting.append(ref)
                while waiting:
                    done, waiting = ray.wait(waiting, num_returns=1, timeout=RELAY_EVERY_S)
                    _show(ray.get(hub.take.remote()), progress)
                    for ref in done:
                        i = refs[ref]
                        try:
                            summaries[i] = ray.get(ref)
                            progress.update(summaries[i].skipped, 0, 0.0)  # rows done before: the bar reaches its total
                        except ray.exceptions.RayTaskError as e:  # the task raised: its own error, its own exit code
                            errors.append((i, e.cause if isinstance(e.cause, BaseException) else e))
                        except ray.exceptions.RayError as e:  # its worker or node died
                            errors.append((i, RuntimeError(f"shard {i} of {n}: {type(e).__name__}: {e}")))
                    if stop.again:
                        raise Interrupted(stop.again)
                    if stop.is_set() and not told:
                        hub.stop.remote(stop.signum)
                        told = True
            except Interrupted:  # a second signal: stop at once
                for ref in waiting:
                    ray.cancel(ref)  # KeyboardInterrupt in the task: its writer and lock close on the way out
                raise
    finally:
        if hub is not None:
            ray.kill(hub)  # a Ray the caller owns (a notebook) outlives this run: leave no actor in it
        if owned:
            ray.shutdown()
    for i, error in errors:
        logger.error("shard %d of %d failed: %s: %s", i, n, type(error).__name__, error)
    summary = merge([summaries[i] for i in sorted(summaries)], str(plan.out.root), f"all {n}", time.monotonic() - plan.t0, False)
    if stop.signum is not None and len(summaries) < n:  # a signal that came after every shard was done stopped nothing
        summary.interrupted = signal.Signals(stop.signum).name
    summary.complete = not errors and summary.interrupted is None and _success_stands(plan)
    logger.info(summary.line(), extra={"event": "summary", "summary": summary.to_json()})
    if errors and summary.interrupted is None:
        logger.error("%d of %d shards failed; committed parts are intact, rerun the same command to resume", len(errors), n)
        raise errors[0][1]
    return summary


def _show(items: list, progress) -> None:
    for kind, item in items:
        if kind == "progress":
            progress.update(*item)
        else:
            logging.getLogger(item.name).handle(item)


def _success_stands(plan: Plan) -> bool:
    """`_SUCCESS` names this manifest: every row of it is in a part or a failure record."""
    return (plan.out.success() or {}).get("whole_manifest") == plan.marker["whole_manifest"]
