"""`--engine ray`: the same job with the embedding spread over a Ray cluster, through Ray Data.

What runs where:
  driver        validates the manifest, takes the output's lock, checks or writes the recipe,
                computes the pending rows, and writes every file through the local engine's
                PartWriter: parts, failure records, commit cadence, markers and `_SUCCESS` are
                the local engine's, and nothing else ever writes to the output
  Ray Data      streams the pending rows (row index, path, segment) in blocks to an actor pool
  EmbedActor    one per GPU (or per CPU slot): loads the model once, then embeds each block with
                the local engine's own stages (Stream: isolated decode workers, windows, batches;
                DeviceLoop: the device), and returns an embedding or a failure message per row

Because the actors run the local engine's code on the same rows, they give the same rows: on CPU
one window per batch, so the numbers are bit-identical whichever actor embedded a row.

The manifest is read on the driver, not with `ray.data.read_parquet`: it must be validated whole
(null paths, duplicate ids) before anything runs, and resuming needs the ids already written, so
the driver reads it anyway. Shipping only the pending rows' (index, path, segment) is what
read_parquet plus a filter on the done ids would compute, without reading the manifest twice or
sending the done-id set to every read task.

The audio, the model and the output must be reachable at the same paths from the driver and every
worker node (shared storage), and this package installed on each node, as for any Ray job.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from .manifest import read_manifest
from .model import LoadedModel, load_model, resolve_device, resolve_dtype
from .output import OutputDir, RecipeMismatch
from .pipeline import (
    ConfigError,
    JobOptions,
    Stream,
    Summary,
    build_recipe,
    failed_rows,
    finish_summary,
    pending_rows,
    run_locked,
)
from .progress import Progress
from .recipe import Recipe
from .runner import DeviceLoop
from .writer import PartWriter

try:
    import ray
except ImportError:  # the optional extra: pip install '.[ray]'
    ray = None

logger = logging.getLogger(__name__)

# Rows handed to an actor per call. Each call starts its decode workers, fills the pipeline and
# drains it, so a call holds many GPU batches' worth of audio to amortise that (a 32k-token batch
# is ~22 windows of 30 s, ~1 s of work for an H100); memory stays bounded inside the call by
# Stream's own queues, and a lost actor costs at most this many rows, redone elsewhere.
BATCH_ROWS = 1024
MAX_DECODE_WORKERS = 16  # per actor, as the local engine's default
CPU_DECODE_WORKERS = 1  # a CPU actor: one isolated decoder beside the encoder's threads


@dataclass(frozen=True)
class ActorPlan:
    """How many embedder actors, and what each one reserves on its node."""

    actors: int
    num_gpus: int  # 0 or 1: an actor drives one device
    decode_workers: int  # decode processes per actor (0: in the actor's process, no isolation)

    @property
    def num_cpus(self) -> int:
        return 1 + self.decode_workers  # the device loop's thread, plus one per decoder

    def describe(self, device_name: str) -> str:
        return f"ray: {self.actors} actor(s) on {device_name}, {self.decode_workers} decode worker(s) each"


def _gpu_node_cpus_per_gpu() -> int:
    """CPUs per GPU on the least CPU-rich GPU node: what every GPU actor can reserve there."""
    ratios = [
        int(n["Resources"].get("CPU", 0) // n["Resources"]["GPU"])
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1
    ]
    return min(ratios, default=1)


def plan_actors(device: str, actors: int | None, decode_workers: int | None) -> ActorPlan:
    """GPU actors when the cluster has GPUs (or --device cuda), one per GPU by default; else CPU."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise ConfigError("--device cuda: the Ray cluster has no GPU")
    if use_gpu:
        # Leave a CPU per GPU for the device loop; the rest decode, so a node's CPUs are shared
        # evenly among its GPUs' actors and every actor stays schedulable.
        workers = decode_workers if decode_workers is not None else max(0, min(MAX_DECODE_WORKERS, _gpu_node_cpus_per_gpu() - 1))
        return ActorPlan(actors or gpus, 1, workers)
    return ActorPlan(actors or 1, 0, decode_workers if decode_workers is not None else CPU_DECODE_WORKERS)


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


def _load(opts: JobOptions) -> LoadedModel:
    device = resolve_device(opts.device)
    return load_model(Path(opts.model), Path(opts.adapter) if opts.adapter else None, device, resolve_dtype(opts.dtype, device))


def _device_name(model: LoadedModel) -> str:
    if model.device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(model.device)
    return "cpu"


def worker_recipe(opts: JobOptions) -> tuple[Recipe, str]:
    """The recipe as an actor will compute it, and its device's name.

    For GPU actors it runs as a Ray task on a GPU: the compute dtype and the GELU variant depend
    on the device, which the driver (often a head node without a GPU) may not have. Each actor
    checks that it computes the same recipe before it embeds anything.
    """
    model = _load(opts)
    return build_recipe(model, opts), _device_name(model)


class _Rows:
    """Stands in for the PartWriter inside an actor: what DeviceLoop finishes, kept for the reply."""

    def __init__(self):
        self.rows: dict[int, tuple[np.ndarray, np.ndarray | None, float]] = {}
        self.failures: dict[int, str] = {}

    def put_row(self, item: int, emb: np.ndarray, frames: np.ndarray | None, duration: float) -> None:
        self.rows[item] = (emb, frames, duration)

    def put_failure(self, item: int, error: str) -> None:
        self.failures[item] = error

    def _check(self) -> None:  # DeviceLoop asks the writer whether it failed; nothing can here
        pass


class EmbedActor:
    """One model on one device; embeds the blocks of rows Ray Data hands it.

    In: item (the row's index in the driver's pending rows), path, [start_s, end_s].
    Out, one row per row in: item, embedding (float32 bytes) or null, frames (float32 bytes,
    --pooling none) or null, duration_s or null, error or null.
    """

    def __init__(self, opts: JobOptions, recipe: Recipe):
        self.opts = opts
        self.model = _load(opts)
        # A node unlike the one the recipe was computed on (another device, another package
        # version installed) would write other numbers under the run's recipe.
        found = build_recipe(self.model, opts)
        if found != recipe:
            diff = [f"{k}: {v!r} → {getattr(found, k)!r}" for k, v in dataclasses.asdict(recipe).items() if getattr(found, k) != v]
            raise RecipeMismatch(f"an actor on {_device_name(self.model)} computes another recipe than the run's (run's → actor's): " + "; ".join(diff))

    def __call__(self, block: pa.Table) -> pa.Table:
        rows = pl.from_arrow(block)
        # Stream's manifest is only used by its own writer, which does not run here.
        stream = Stream(None, rows.drop("item"), self.opts, self.model.cfg, self.model.device)
        done = _Rows()
        try:
            DeviceLoop(self.model, stream.results, done, stream.budget, Summary(output="")).run(stream.producer.batches, time.monotonic())
        finally:
            stream.stop()
        if stream.producer.error is not None:
            raise RuntimeError(f"decoding failed: {stream.producer.error}") from stream.producer.error
        lost = [i for i in range(len(rows)) if i not in done.rows and i not in done.failures]
        if lost:
            raise RuntimeError(f"{len(lost)} row(s) came back neither embedded nor failed, e.g. {rows['path'][lost[0]]}")
        return self._reply(block.column("item"), done)

    @staticmethod
    def _reply(items: pa.ChunkedArray, done: _Rows) -> pa.Table:
        n = len(items)
        emb: list[bytes | None] = [None] * n
        frames: list[bytes | None] = [None] * n
        duration: list[float | None] = [None] * n
        for i, (e, f, d) in done.rows.items():
            emb[i], duration[i] = e.astype(np.float32).tobytes(), d
            frames[i] = None if f is None else f.astype(np.float32).tobytes()
        return pa.table({
            "item": items,
            "embedding": pa.array(emb, type=pa.binary()),
            "frames": pa.array(frames, type=pa.binary()),
            "duration_s": pa.array(duration, type=pa.float64()),
            "error": pa.array([done.failures.get(i) for i in range(n)], type=pa.string()),
        })


def _ray_get(ref):
    """ray.get, re-raising a task's own exception (a config error stays one: exit 2, its message)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception):
            raise e.cause from None
        raise


def run_job_ray(opts: JobOptions, *, actors: int | None = None, batch_rows: int = BATCH_ROWS) -> Summary:
    """run_job with the embedding done by a pool of Ray actors; the same output, files and markers."""
    if ray is None:
        raise ConfigError("--engine ray needs Ray: pip install 'qwen2-audio-embeddings[ray]'")
    if opts.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--engine ray: --device must be auto, cpu or cuda, not {opts.device!r}; Ray gives each actor its own GPU")
    t0 = time.monotonic()
    source = read_manifest(opts.manifest, opts.storage_options)
    manifest = source.shard_rows(opts.shard.index, opts.shard.count)
    out = OutputDir(opts.output, opts.shard, opts.storage_options)
    summary = Summary(output=str(out.root), rows_total=len(manifest))
    pending, n_done, n_failed = pending_rows(manifest, out, include_failed=opts.retry_failed)

    owned = connect()
    try:
        plan = plan_actors(opts.device, actors, opts.decode_workers)
        if plan.num_gpus:
            # Ray does not reuse a GPU task's worker: its CUDA context is gone before the actors start.
            recipe, device_name = _ray_get(ray.remote(num_cpus=1, num_gpus=1)(worker_recipe).remote(opts))
        else:
            recipe, device_name = worker_recipe(opts)  # a CPU recipe is the same on every node
        summary.device = plan.describe(device_name)
        if out.existing_recipe() is not None:
            out.check_recipe(recipe)
        summary.skipped = n_done + (0 if opts.retry_failed else n_failed)
        if not len(pending) and out.existing_recipe() is not None and out.shard_done() and out.is_complete():
            return finish_summary(summary, t0, n_failed, noop=True)

        run_locked(out, recipe, manifest, opts, summary,
                   lambda rows: _embed(rows, source, out, recipe, opts, plan, batch_rows, summary, t0))
    finally:
        if owned:
            ray.shutdown()
    return finish_summary(summary, t0, failed_rows(manifest, out))


def _embed(pending: pl.DataFrame, source, out: OutputDir, recipe: Recipe, opts: JobOptions, plan: ActorPlan,
           batch_rows: int, summary: Summary, t0: float) -> None:
    """Stream the pending rows through the actor pool; commit what comes back, as run_job does."""
    work = pending.select([c for c in ("path", "start_s", "end_s") if c in pending.columns]).with_row_index("item")
    table = work.with_columns(pl.col("item").cast(pl.Int64)).to_arrow()
    # One block per actor call, so small runs still spread over every actor.
    blocks = [table.slice(i, batch_rows) for i in range(0, table.num_rows, batch_rows)]
    actor_opts = dataclasses.replace(opts, decode_workers=plan.decode_workers, progress=False, on_progress=None)
    ds = ray.data.from_arrow(blocks).map_batches(
        EmbedActor,
        fn_constructor_kwargs={"opts": actor_opts, "recipe": recipe},
        batch_size=batch_rows,
        batch_format="pyarrow",
        # No more actors than blocks: a small nightly increment should not load the model N times.
        compute=ray.data.ActorPoolStrategy(size=min(plan.actors, len(blocks))),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
    )
    ds.context.enable_progress_bars = False  # ours below counts committed rows; two bars would fight

    progress = Progress(len(pending), enabled=opts.progress, on_update=opts.on_progress)
    writer = PartWriter(
        out, source, pending, recipe, progress,
        keep_columns=opts.manifest.keep_columns, part_rows=opts.part_rows, part_bytes=opts.part_bytes, commit_seconds=opts.commit_seconds,
    )
    writer.start()
    try:
        for reply in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if summary.time_to_first_batch_s is None:
                summary.time_to_first_batch_s = time.monotonic() - t0
                logger.info("first rows back from the actors %.1f s after start", summary.time_to_first_batch_s)
            for item, emb, frames, duration, error in zip(*(reply.column(c).to_pylist() for c in ("item", "embedding", "frames", "duration_s", "error"))):
                if error is not None:
                    writer.put_failure(item, error)
                else:
                    f = None if frames is None else np.frombuffer(frames, dtype=np.float32).reshape(-1, recipe.d_model)
                    writer.put_row(item, np.frombuffer(emb, dtype=np.float32), f, duration)
    finally:
        progress.close()
    writer.close()
    summary.embedded, summary.failed, summary.audio_seconds = writer.embedded, writer.failed, writer.audio_s
