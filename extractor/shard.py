"""One shard of a job: the function every engine runs (datatrove's `_run_for_rank`).

    read  →  lock  →  plan from what is committed  →  embed  →  commit  →  mark

`prepare` reads and refuses: a `--model`/`--adapter` given as a Hub repo id is first resolved to a
local snapshot (model/hub.py: only the tower's files are downloaded), then the model's and
adapter's JSON, the manifest, the output's layout and recipe, all before anything is written
(exit 2). When the shard's marker names this manifest and these inputs and `_SUCCESS` stands,
there is nothing to do: no lock, no torch, about a second.

`run_shard` takes the shard's lock (exit 75 if a live run holds it), and only then plans: the
pending rows are the shard's rows minus the ids in committed parts (and failure records), read
under the lock, never a plan made before it. Decoding starts while the model loads; the first
write is `_run.json` (created, or compared), after the model is loaded and checked. Parts are
committed by a writer that is closed before the lock is let go, on every path. The shard's marker
is written last, and `_SUCCESS` once every shard's marker names the same manifest.

`embed_locked` is the part that runs under a held lock; `--devices` runs it in each of its
worker processes, on a sub-shard, under the lock its parent holds (engines/devices.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import polars as pl
import pyarrow as pa

from . import __version__, hooks
from .errors import ConfigError
from .manifest.read import Manifest, read_manifest, shard_of
from .manifest.read import fingerprint as rows_fingerprint
from .model.config import (EncoderConfig, adapter_weights_file, cached_fingerprint, read_adapter_config, read_config,
                           stat_signature, tower_files)
from .model.hub import readable_source, resolve_adapter, resolve_model
from .options import DTYPES, OUTPUT_DTYPES, POOLINGS, JobOptions, Shard
from .output.layout import OutputDir, RecipeMismatch, RunInfo, layout_differences
from .output.locks import process_start
from .recipe import Recipe
from .signals import StopSignal  # noqa: F401 (engines import it from here)
from .summary import Summary

logger = logging.getLogger(__name__)


def process_age_s() -> float:
    """Seconds since this process was launched (Linux /proc), imports included."""
    try:
        start_ticks = int(process_start(os.getpid()))
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, TypeError):  # TypeError: no /proc (process_start is None)
        return 0.0


def launch_clock() -> float:
    """The process's launch on the monotonic clock: wall times and time to first batch count imports."""
    return time.monotonic() - process_age_s()


@dataclass
class ShardPlan:
    """What a shard run knows before it takes its lock; nothing here was written."""

    opts: JobOptions
    shard: Shard
    cfg: EncoderConfig
    manifest: Manifest
    rows: pl.DataFrame  # this shard's rows of the manifest
    out: OutputDir
    existing: RunInfo | None  # what _run.json holds, if anything
    marker: dict  # what this shard's marker will say when it is done
    t0: float = field(default_factory=launch_clock)

    def summary(self) -> Summary:
        return Summary(output=str(self.out.root), shard=str(self.shard), rows_total=len(self.rows))


def _check_flags(opts: JobOptions) -> None:
    if opts.pooling not in POOLINGS:
        raise ConfigError(f"--pooling {opts.pooling!r}: expected one of {POOLINGS}")
    if opts.output_dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"--output-dtype {opts.output_dtype!r}: expected one of {OUTPUT_DTYPES}")
    if opts.dtype not in DTYPES:
        raise ConfigError(f"--dtype {opts.dtype!r}: expected one of {DTYPES}")
    if not opts.max_duration_s > 0 or not opts.decode_timeout_s > 0:
        raise ConfigError("--max-duration-s and --decode-timeout-s must be positive")


def _files_signature(folder: str, files: list[Path]) -> str:
    """A Hub snapshot's commit (its files never change; the same on every host, each of which may
    hold its own copy, as a Ray task's node does), else the files' stat signature."""
    repo, commit = readable_source(folder)
    if commit:
        return f"{repo}@{commit}"
    # Racy files are fine here: a marker only spares a rerun the planning, never decides what is done.
    return stat_signature(files, racy_ok=True) or f"missing-{time.time_ns()}"


def _inputs_fingerprint(opts: JobOptions) -> str:
    """What the recipe is computed from, as far as a run can tell without loading the model: the
    flags and the identities of the checkpoint and adapter files (_files_signature). A marker records it, so
    a rerun with another model or adapter does not take an old marker for "nothing to do"."""
    signature = _files_signature(opts.model, [Path(opts.model) / "config.json", *tower_files(Path(opts.model))])
    if opts.adapter:
        adapter = Path(opts.adapter)
        signature += "|" + _files_signature(opts.adapter, [adapter / "adapter_config.json", adapter_weights_file(adapter)])
    flags = dict(padding_mask=opts.padding_mask, pooling=opts.pooling, output_dtype=opts.output_dtype, dtype=opts.dtype,
                 device=opts.device.split(":")[0], version=__version__)
    return hashlib.sha256(f"{signature}|{json.dumps(flags, sort_keys=True)}".encode()).hexdigest()


def _early_recipe_check(opts: JobOptions, cfg: EncoderConfig, existing: RunInfo, shard: Shard, out: OutputDir) -> None:
    """Refuse, before any model load, what the existing recipe rules out without one."""
    old = existing.recipe
    known = {"padding_mask": opts.padding_mask, "pooling": opts.pooling, "output_dtype": opts.output_dtype, "d_model": cfg.d_model}
    if opts.dtype != "auto":
        known["dtype"] = opts.dtype
    if (opts.adapter is None) != (old.adapter_fingerprint is None):
        known["adapter_fingerprint"] = "(an adapter)" if opts.adapter else None
    fp = cached_fingerprint(tower_files(Path(opts.model)))
    if fp is not None:
        known["model_fingerprint"] = fp
    diff = old.mismatches(known) + layout_differences(existing.num_shards, shard.count)
    if diff:
        raise RecipeMismatch.naming(out.root, diff)


def prepare(opts: JobOptions, shard: Shard | None = None) -> ShardPlan:
    """Read and check everything a run needs before it may write; ConfigError (exit 2) if not."""
    t0 = launch_clock()
    shard = shard or opts.shard
    _check_flags(opts)
    # Repo ids become snapshot directories before anything reads them; the plan carries the paths.
    opts = replace(opts, model=resolve_model(opts.model), adapter=resolve_adapter(opts.adapter) if opts.adapter else None)
    cfg = read_config(Path(opts.model))
    if opts.adapter:
        read_adapter_config(Path(opts.adapter))
        adapter_weights_file(Path(opts.adapter))
    manifest = read_manifest(opts.manifest, opts.storage_options)
    rows = manifest.shard_rows(shard)
    out = OutputDir(opts.output, opts.storage_options)
    existing = out.check()
    if existing is not None:
        _early_recipe_check(opts, cfg, existing, shard, out)
    marker = {"manifest": rows_fingerprint(rows), "whole_manifest": rows_fingerprint(manifest.rows),
              "inputs": _inputs_fingerprint(opts), "rows": len(rows), "num_shards": shard.count}
    return ShardPlan(opts, shard, cfg, manifest, rows, out, existing, marker, t0)


def is_noop(plan: ShardPlan) -> bool:
    """The shard's marker names this manifest and these inputs, and _SUCCESS stands for the manifest
    (other shards' inputs may differ: they may have run on other hosts, with their own copies)."""
    if plan.opts.retry_failed:
        return False
    mine = plan.out.marker(plan.shard) or {}
    done = plan.out.success() or {}
    keys = ("manifest", "whole_manifest", "inputs")
    return all(mine.get(k) == plan.marker[k] for k in keys) and done.get("whole_manifest") == plan.marker["whole_manifest"]


def pending_rows(plan: ShardPlan, rows: pl.DataFrame) -> tuple[pl.DataFrame, int, int]:
    """(rows still to do, rows already embedded, rows already failed): from the committed ids."""
    out, id_type = plan.out, plan.manifest.id_type
    done = _id_series(out.read_ids(out.part_files(), id_type), rows)
    failed = _id_series(out.read_ids(out.failure_files(), id_type), rows)
    is_done, is_failed = pl.col("id").is_in(done.implode()), pl.col("id").is_in(failed.implode())
    n_done = rows.filter(is_done).height
    n_failed = rows.filter(is_failed & ~is_done).height
    keep = ~is_done if plan.opts.retry_failed else ~(is_done | is_failed)
    return rows.filter(keep), n_done, n_failed


def _id_series(ids: pa.Array, rows: pl.DataFrame) -> pl.Series:
    return pl.Series("id", ids).cast(rows.schema["id"])


def standing_failures(plan: ShardPlan) -> int:
    """This shard's rows with a failure record (only failure files are read)."""
    failed = _id_series(plan.out.read_ids(plan.out.failure_files(), plan.manifest.id_type), plan.rows)
    return plan.rows.filter(pl.col("id").is_in(failed.implode())).height if len(failed) else 0


def sub_shard(rows: pl.DataFrame, shard: Shard, part: int, parts: int) -> pl.DataFrame:
    """Rows of part `part` of `parts` of a shard: sub-shard I + part·N of N·parts, a refinement of
    the shard (h mod N·P mod N == h mod N), so any number of parts covers the shard exactly."""
    if parts == 1:
        return rows
    return rows.filter(shard_of(rows["id"], shard.count * parts) == shard.index + part * shard.count)


def build_recipe(model, opts: JobOptions) -> Recipe:
    return Recipe(
        model_fingerprint=model.model_fingerprint,
        adapter_fingerprint=model.adapter.fingerprint if model.adapter else None,
        d_model=model.cfg.d_model,
        padding_mask=opts.padding_mask,
        dtype=str(model.dtype).removeprefix("torch."),
        pooling=opts.pooling,
        output_dtype=opts.output_dtype,
        gelu="tanh-epilogue" if model.encoder.fused_gelu else "erf",
        package_version=__version__,
    )


def sources(opts: JobOptions) -> dict:
    """Readable names of the model and adapter: repo id and commit for a Hub snapshot, else the
    path (not compared on resume: the same weights may move)."""
    model, model_revision = readable_source(opts.model)
    adapter, adapter_revision = readable_source(opts.adapter)
    return {"model": model, "model_revision": model_revision, "adapter": adapter, "adapter_revision": adapter_revision}


def embed_locked(plan: ShardPlan, lock, *, part: tuple[int, int] = (0, 1), first_seq: int | None = None, seq_step: int = 1,
                 model=None, stop: threading.Event | None = None, on_progress: Callable[[int, int, float], None] | None = None,
                 ready: Callable[[], None] | None = None) -> Summary:
    """Embed what is pending for the shard (or one part of it), with `lock` held by the caller.

    `ready`, when given (a --devices worker), is called once the recipe is checked, instead of
    clearing markers and dropping failures here: the lock's owner does that once for all parts.
    """
    opts, out, shard = plan.opts, plan.out, plan.shard
    stop = stop or threading.Event()
    rows = sub_shard(plan.rows, shard, *part)
    summary = plan.summary()
    summary.rows_total = len(rows)
    hooks.point("locked", shard=shard.index, part=part[0])
    pending, n_done, n_failed = pending_rows(plan, rows)
    summary.skipped = n_done + (0 if opts.retry_failed else n_failed)
    hooks.point("planned", shard=shard.index, part=part[0], pending=len(pending))
    if not len(pending):
        verify_identity(plan)
        if ready is not None:
            ready()
        return summary
    logger.info("%d rows to embed (%d already embedded, %d failed earlier) → %s", len(pending), n_done, n_failed, out.root)
    logger.debug("planned %.2f s after launch", process_age_s())

    from .output.writer import PartWriter
    from .pipeline import Pipeline
    from .progress import Progress

    # Decoding starts now, while torch is imported and the model loads; nothing is written until
    # the model is loaded and the recipe checked.
    with Pipeline(pending, opts, plan.cfg, stop, plan.manifest.audio) as pipe:
        from .model.load import load_model, resolve_device, resolve_dtype  # torch: only when there is work

        logger.debug("torch imported %.2f s after launch", process_age_s())
        device = resolve_device(opts.device)
        if device.type == "cuda" and device.index is not None:
            import torch

            torch.cuda.set_device(device)  # else cuda:0 gets a context and the default streams
        pipe.attach(device)
        if model is None:
            t = time.monotonic()
            model = load_model(Path(opts.model), Path(opts.adapter) if opts.adapter else None, device, resolve_dtype(opts.dtype, device))
            logger.info("model loaded in %.1f s (%.2f s after launch)", time.monotonic() - t, process_age_s())
        if stop.is_set():
            summary.interrupted = _signal_name(stop)
            return summary
        recipe, names = build_recipe(model, opts), sources(opts)
        out.create_run(RunInfo(recipe, shard.count, names))  # the first write
        out.forget_created()
        if first_seq is None:
            first_seq = out.next_seq(shard)
        if ready is not None:
            ready()
        else:
            begin_writes(plan, lock, first_seq)
        metadata = {b"qwen2_audio_embeddings.sources": json.dumps(names).encode()}
        with Progress(len(pending), enabled=opts.progress, on_update=on_progress) as progress:
            with PartWriter(out, lock, shard, plan.manifest, pending, recipe, first_seq=first_seq, seq_step=seq_step,
                            keep_columns=opts.manifest.keep_columns, part_rows=opts.part_rows, part_bytes=opts.part_bytes,
                            commit_seconds=opts.commit_seconds, metadata=metadata) as writer:
                pipe.run(model, writer, progress, summary.stats, plan.t0)
            summary.embedded, summary.failed, summary.audio_seconds = writer.embedded, writer.failed, writer.audio_s
    if stop.is_set():
        summary.interrupted = _signal_name(stop)
    return summary


def verify_identity(plan: ShardPlan) -> None:
    """Nothing to embed, but the inputs changed since the shard's marker (another model or adapter
    file): the recipe's fingerprints must still match the output's, or the run is refused as one
    with work would be. Reads the tensors (the tower's fingerprint is cached), loads no model."""
    existing, mine = plan.existing, plan.out.marker(plan.shard) or {}
    if existing is None or mine.get("inputs") == plan.marker["inputs"]:
        return
    from .model.checkpoint import model_fingerprint
    from .model.lora import adapter_fingerprint

    found = {"model_fingerprint": model_fingerprint(Path(plan.opts.model)),
             "adapter_fingerprint": adapter_fingerprint(Path(plan.opts.adapter)) if plan.opts.adapter else None}
    diff = existing.recipe.mismatches(found)
    if diff:
        raise RecipeMismatch.naming(plan.out.root, diff)


def begin_writes(plan: ShardPlan, lock, first_seq: int) -> None:
    """Under the lock, with the recipe checked, before the first part: the shard is not done any
    more; --retry-failed drops its old failure records; temporaries of a killed run go."""
    plan.out.clear_markers(plan.shard, lock)
    if plan.opts.retry_failed:
        dropped = plan.out.drop_failures(plan.shard, lock, below_seq=first_seq)
        if dropped:
            logger.info("--retry-failed: %d failed rows are pending again", dropped)
    plan.out.prepare_writes(plan.shard)


def _signal_name(stop: threading.Event) -> str:
    import signal

    signum = getattr(stop, "signum", None)
    return signal.Signals(signum).name if signum else "stopped"


def finish(plan: ShardPlan, summary: Summary) -> Summary:
    """Wall time, standing failures, and the one line every run ends with."""
    summary.standing_failed = standing_failures(plan)
    summary.wall_seconds = time.monotonic() - plan.t0
    if summary.stats.last_batch_at is not None:
        summary.tail_s = time.monotonic() - summary.stats.last_batch_at
    if summary.noop:
        logger.info("nothing to do: shard %s of the manifest is already in %s", plan.shard, plan.out.root)
    logger.info(summary.line(), extra={"event": "summary", "summary": summary.to_json()})
    return summary


def start_ahead(opts: JobOptions) -> None:
    """Import torch and the model's stages, read the tower ahead and warm the GPU up, on two threads,
    while the lock is taken, the committed ids are read and decoding starts (model/ahead.py):
    torch's import is the longest step of start-up (bench/startup.py). Nothing waits for it."""
    from .model import ahead

    ahead.start(opts.model, opts.device)


def run_shard(opts: JobOptions, shard: Shard | None = None, *, model=None, stop: threading.Event | None = None,
              on_progress: Callable[[int, int, float], None] | None = None) -> Summary:
    """Run one shard of the job (opts.shard unless given) and return its Summary.

    Raises ConfigError (exit 2) before anything is written, OutputBusy (exit 75) when a live run
    holds the shard; a Summary with `interrupted` set when `stop` ended it early.
    """
    plan = prepare(opts, shard)
    shard = plan.shard
    logger.debug("configuration, manifest and output checked %.2f s after launch", process_age_s())
    hooks.point("prepared", shard=shard.index)
    if stop is not None and stop.is_set():
        summary = plan.summary()
        summary.interrupted = _signal_name(stop)
        return finish(plan, summary)
    if is_noop(plan):
        summary = plan.summary()
        summary.noop = summary.complete = True
        summary.skipped = len(plan.rows)
        return finish(plan, summary)
    start_ahead(plan.opts)
    try:
        with plan.out.lock(shard) as lock:
            summary = embed_locked(plan, lock, model=model, stop=stop, on_progress=on_progress)
            if summary.interrupted is None:
                summary.complete = plan.out.write_markers(shard, plan.marker, lock)
                plan.out.forget_created()
                hooks.point("marked", shard=shard.index)
    finally:
        plan.out.remove_created()
    return finish(plan, summary)
