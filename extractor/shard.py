"""One shard of a job, from its checks to its marker: the sequence every engine runs.

    check  →  nothing to do?  →  lock  →  plan from what is committed  →  embed  →  mark

`ShardRun` owns the sequence (datatrove's `_run_for_rank`). Engines supply the middle step only:
an `Embed`, a function that embeds given pending rows under the lock the run holds, in this
process (engines/local.py) or in worker processes on the devices of a host (engines/devices.py);
Ray launches ShardRuns on its nodes (engines/ray.py). A new engine is one such function.

Checking reads and refuses (exit 2) before anything is written: a `--model`/`--adapter` given as
a Hub repo id is resolved to a local snapshot (only the tower's files are downloaded), then the
model's and adapter's JSON, the manifest, the output's layout and recipe. When the shard's marker
names this manifest and these inputs and `_SUCCESS` stands, there is nothing to do: no lock, no
torch, about a second.

Under the lock, and only then, the run plans: the pending rows are the shard's rows minus the
ids in committed parts (and failure records), read once. Nothing is written until the engine has
loaded its model and checked the recipe (`_run.json`, created or compared); then `begin` clears
the shard's markers before the first part. The shard's marker is written last, and `_SUCCESS`
once every shard's marker names the same manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import polars as pl
import pyarrow as pa

from .version import __version__
from .manifest.embedded import EmbeddedAudio
from .manifest.read import Manifest, read_manifest
from .manifest.read import fingerprint as rows_fingerprint
from .model.config import EncoderConfig, adapter_weights_file, check_tower, read_adapter_config, read_config
from .model.hub import resolve_adapter, resolve_model
from .model.identity import Identity
from .options import JobOptions, Shard
from .output.committed import read_committed
from .output.layout import OutputDir, RecipeMismatch, RunInfo, changed_paths, layout_differences
from .output.locks import process_start
from .progress import Progress
from .seams import NONE, Seams
from .signals import StopSignal
from .summary import Summary

logger = logging.getLogger(__name__)

__all__ = ["Control", "Embed", "Plan", "ShardRun", "StopSignal", "Work", "launch_clock", "prepare", "run_shard"]


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


# ---------------------------------------------------------------------------------------------
# Checking: what a run knows before its lock; nothing here writes
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a shard run knows before it takes its lock; nothing here was written."""

    opts: JobOptions  # with --model/--adapter resolved to local directories
    shard: Shard
    cfg: EncoderConfig
    manifest: Manifest
    rows: pl.DataFrame  # this shard's rows of the manifest
    out: OutputDir
    existing: RunInfo | None  # what _run.json holds, if anything
    identity: Identity
    marker: dict  # what this shard's marker will say when it is done
    t0: float = field(default_factory=launch_clock)

    def summary(self) -> Summary:
        return Summary(output=str(self.out.root), shard=str(self.shard), rows_total=len(self.rows))


def _inputs(opts: JobOptions, identity: Identity) -> str:
    """What the recipe is computed from, as far as a run can tell without loading the model: the
    flags and the identity of the checkpoint and adapter files. A marker records it, so a rerun
    with another model or adapter does not take an old marker for "nothing to do"."""
    flags = dict(padding_mask=opts.padding_mask, pooling=opts.pooling, output_dtype=opts.output_dtype, dtype=opts.dtype,
                 device=opts.device.split(":")[0], version=__version__)
    return hashlib.sha256(f"{identity.signature()}|{json.dumps(flags, sort_keys=True)}".encode()).hexdigest()


def _early_recipe_check(plan: Plan) -> None:
    """Refuse, before any model load, what the existing recipe rules out without one."""
    opts, old = plan.opts, plan.existing.recipe
    known = {"padding_mask": opts.padding_mask, "pooling": opts.pooling, "output_dtype": opts.output_dtype, "d_model": plan.cfg.d_model}
    if opts.dtype != "auto":
        known["dtype"] = opts.dtype
    if (opts.adapter is None) != (old.adapter_fingerprint is None):
        known["adapter_fingerprint"] = "(an adapter)" if opts.adapter else None
    known.update(plan.identity.known_fingerprints())
    diff = old.mismatches(known) + layout_differences(plan.existing.num_shards, plan.shard.count)
    if diff:
        raise RecipeMismatch.naming(plan.out.root, diff)


def prepare(opts: JobOptions, shard: Shard | None = None, seams: Seams = NONE) -> Plan:
    """Read and check everything a run needs before it may write; ConfigError (exit 2) if not."""
    t0 = launch_clock()
    seams.event("checking")
    shard = shard or opts.shard
    # Repo ids become snapshot directories before anything reads them; the plan carries the paths.
    opts = replace(opts, model=resolve_model(opts.model), adapter=resolve_adapter(opts.adapter) if opts.adapter else None)
    cfg = read_config(opts.model)
    check_tower(opts.model, cfg)
    if opts.adapter:
        read_adapter_config(opts.adapter)
        adapter_weights_file(opts.adapter)
    manifest = read_manifest(opts.manifest, opts.storage_options)
    rows = manifest.shard_rows(shard)
    out = OutputDir(opts.output, opts.storage_options)
    identity = Identity(opts.model, opts.adapter)
    marker = {"manifest": rows_fingerprint(rows), "whole_manifest": rows_fingerprint(manifest.rows),
              "inputs": _inputs(opts, identity), "rows": len(rows), "num_shards": shard.count}
    plan = Plan(opts, shard, cfg, manifest, rows, out, out.check(), identity, marker, t0)
    if plan.existing is not None:
        _early_recipe_check(plan)
    _check_id_type(plan)
    return plan


def _id_kind(t: str) -> str:
    """The logical kind of a canonical type's name: what must not change within one output
    (widths may: manifest.types already made string/large_string and int32/int64 one type)."""
    if t in ("large_string", "string"):
        return "string"
    if t in ("int64", "uint64"):
        return "integer"
    if t in ("double", "float"):
        return "floating point"
    return t


def _check_id_type(plan: Plan) -> None:
    """An output's ids keep their logical type: a manifest whose id column changed between string,
    integer and floating point would have its old ids matched to new ones by a cast ("001" and 1
    become one id) and write parts of a second schema that readers refuse. Refused (exit 2)."""
    theirs = plan.out.id_type(plan.existing)
    mine = str(plan.manifest.id_type)
    if theirs is None or _id_kind(theirs) == _id_kind(mine):
        return
    column = plan.opts.manifest.id_column or plan.opts.manifest.path_column
    raise RecipeMismatch(f"{plan.out.root}: its ids are {_id_kind(theirs)} ({theirs}), and the id column {column!r} of "
                         f"{plan.opts.manifest.path} is {_id_kind(mine)} ({mine}); an output keeps one id type (old ids would be "
                         "matched to new ones by a cast, and parts of a second schema written): keep the column's type, or "
                         "write to a new output")


def is_noop(plan: Plan) -> bool:
    """The shard's marker names this manifest and these inputs, _SUCCESS stands for the manifest
    (other shards' inputs may differ: they may have run on other hosts, with their own copies),
    and a listing of the shard's committed files agrees with the files the marker vouches for:
    a part deleted, truncated or planted since is planned from, not trusted."""
    if plan.opts.retry_failed:
        return False
    mine = plan.out.marker(plan.shard) or {}
    done = plan.out.success() or {}
    keys = ("manifest", "whole_manifest", "inputs")
    if not (all(mine.get(k) == plan.marker[k] for k in keys) and done.get("whole_manifest") == plan.marker["whole_manifest"]):
        return False
    return mine.get("files") == plan.out.shard_files(plan.shard)


def _id_series(ids: pa.Array, rows: pl.DataFrame) -> pl.Series:
    return pl.Series("id", ids).cast(rows.schema["id"])


def committed(plan: Plan, *, repair: bool = True) -> tuple[pl.Series, pl.Series, pl.DataFrame]:
    """The ids of this output's committed parts and failure records, and their recorded paths
    (read once per run, every file checked: output.committed). `repair`: move unreadable files
    aside (under the lock only)."""
    found = read_committed(plan.out, plan.manifest.id_type, plan.existing.recipe if plan.existing else None, repair=repair)
    return _id_series(found.done, plan.rows), _id_series(found.failed, plan.rows), found.paths


def pending_rows(plan: Plan, done: pl.Series, failed: pl.Series) -> tuple[pl.DataFrame, int, int]:
    """(rows still to do, rows already embedded, rows already failed) of the shard."""
    rows = plan.rows
    is_done, is_failed = pl.col("id").is_in(done.implode()), pl.col("id").is_in(failed.implode())
    n_done = rows.filter(is_done).height
    n_failed = rows.filter(is_failed & ~is_done).height
    keep = ~is_done if plan.opts.retry_failed else ~(is_done | is_failed)
    return rows.filter(keep), n_done, n_failed


def _warn_changed_paths(plan: Plan, committed_paths: pl.DataFrame) -> None:
    """Committed rows whose manifest path changed since they were embedded keep their embedding:
    say how many, with a few of them, so that an operator can rerun those into a new output."""
    changes = changed_paths(committed_paths, plan.rows.select("id", "path"))
    if changes.count:
        shown = "; ".join(f"{i!r}: {old} → {new}" for i, old, new in changes.examples)
        logger.warning("%d committed row(s) of this shard now have another path in the manifest (e.g. %s): their embeddings "
                       "are of the old audio and are kept; remove those rows' parts, or write to a new output, to embed the "
                       "new audio", changes.count, shown, extra={"event": "changed_paths", "count": changes.count})


def verify_identity(plan: Plan) -> None:
    """Nothing to embed, but the inputs changed since the shard's marker (another model or adapter
    file): the recipe's fingerprints must still match the output's, or the run is refused as one
    with work would be. Reads the tensors (the tower's fingerprint is cached), loads no model."""
    existing, mine = plan.existing, plan.out.marker(plan.shard) or {}
    if existing is None or mine.get("inputs") == plan.marker["inputs"]:
        return
    diff = existing.recipe.mismatches(plan.identity.fingerprints())
    if diff:
        raise RecipeMismatch.naming(plan.out.root, diff)


def start_ahead(opts: JobOptions) -> None:
    """Import torch and the model's stages, read the tower ahead and warm the GPU up, on two threads,
    while the lock is taken, the committed ids are read and decoding starts (model/ahead.py):
    torch's import is the longest step of start-up (bench/startup.py). Nothing waits for it."""
    from .model import ahead

    ahead.start(opts.model, opts.device)


# ---------------------------------------------------------------------------------------------
# The seam: what an engine is handed
# ---------------------------------------------------------------------------------------------


@dataclass
class Work:
    """What an engine embeds: pending rows of one shard, under a lock that the run holds.
    Plain data: a worker process can be handed it (with `rows` a slice of the pending rows)."""

    opts: JobOptions
    shard: Shard
    cfg: EncoderConfig
    out: OutputDir
    rows: pl.DataFrame  # pending rows (the first chunk of them, where more come by Control.more)
    types: dict[str, pa.DataType]  # each output column's canonical Arrow type
    audio: EmbeddedAudio | None  # audio stored in the manifest, or None
    sources: dict  # the model's and adapter's readable names (_run.json, the parts' metadata)
    first_seq: int  # the first part number to write
    seq_step: int = 1  # part numbers go first_seq, + seq_step, ...
    opus_decoder: str | None = None  # the output's recipe's (an older output's decoder); None: today's
    t0: float = field(default_factory=launch_clock)


@dataclass
class Control:
    """How the run steers its engine; each process makes its own (it holds callables)."""

    lock: object  # held by the run; checked before every write (output.locks)
    stop: threading.Event
    progress: Progress
    begin: Callable[[], None]  # once the recipe is checked, before the first write; idempotent
    seams: Seams = NONE
    model: object | None = None  # an already loaded model (the notebook API, tests)
    more: Callable[[], pl.DataFrame | None] | None = None  # the next chunk of pending rows, None when there is none


Embed = Callable[[Work, Control], Summary]


def signal_name(stop: threading.Event) -> str:
    signum = getattr(stop, "signum", None)
    return signal.Signals(signum).name if signum else "stopped"


class ShardRun:
    """One shard, checked at construction (ConfigError, exit 2, before anything is written);
    `run(embed)` takes the lock (OutputBusy, exit 75, if a live run holds it), plans, embeds and
    marks. A Summary with `interrupted` set when `stop` ended it early."""

    def __init__(self, opts: JobOptions, shard: Shard | None = None, *, seams: Seams = NONE, stop: threading.Event | None = None,
                 on_progress: Callable[[int, int, float], None] | None = None):
        self.plan = prepare(opts, shard, seams)
        self.seams, self.stop, self.on_progress = seams, stop or StopSignal(), on_progress
        self._begun = False
        logger.debug("configuration, manifest and output checked %.2f s after launch", process_age_s())
        seams.event("prepared", shard=self.plan.shard.index)

    def run(self, embed: Embed, *, model=None) -> Summary:
        plan, out, shard = self.plan, self.plan.out, self.plan.shard
        summary = plan.summary()
        if self.stop.is_set():  # a signal while the command started
            summary.interrupted = signal_name(self.stop)
            return self._finish(summary)
        if is_noop(plan):
            out.clear_stale_lock(shard)
            summary.noop = summary.complete = True
            summary.skipped = len(plan.rows)
            return self._finish(summary)
        start_ahead(plan.opts)
        try:
            with out.lock(shard) as lock:
                self.seams.event("locked", shard=shard.index)
                done, failed, paths = committed(plan)
                pending, n_done, n_failed = pending_rows(plan, done, failed)
                _warn_changed_paths(plan, paths)
                self.seams.event("planned", shard=shard.index, pending=len(pending))
                summary.skipped = n_done + (0 if plan.opts.retry_failed else n_failed)
                self._failed_before = n_failed
                if len(pending):
                    logger.info("%d rows to embed (%d already embedded, %d failed earlier) → %s", len(pending), n_done, n_failed, out.root)
                    logger.debug("planned %.2f s after launch", process_age_s())
                    work = Work(plan.opts, shard, plan.cfg, out, pending, plan.manifest.arrow_types, plan.manifest.audio,
                                plan.identity.sources(), out.next_seq(shard), t0=plan.t0,
                                opus_decoder=plan.existing.recipe.opus_decoder if plan.existing else None)
                    with Progress(len(pending), enabled=plan.opts.progress, on_update=self.on_progress) as progress:
                        control = Control(lock, self.stop, progress, lambda: self._begin(lock, work.first_seq), self.seams, model)
                        ran = embed(work, control)
                    summary.embedded, summary.failed, summary.audio_seconds = ran.embedded, ran.failed, ran.audio_seconds
                    summary.stats, summary.interrupted = ran.stats, ran.interrupted
                else:
                    verify_identity(plan)
                if summary.interrupted is None:
                    seq = out.ensure_failures_readable(shard, lock, plan.manifest.arrow_types)
                    if seq is not None:
                        self.seams.event("committed", seq=seq, rows=0, failures=0)
                    summary.complete = out.write_markers(shard, plan.marker, lock)
                    out.forget_created()
                    self.seams.event("marked", shard=shard.index)
        finally:
            out.remove_created()
        return self._finish(summary)

    def _begin(self, lock, first_seq: int) -> None:
        """Under the lock, with the recipe checked, before the first part: the shard is not done any
        more; --retry-failed drops its old failure records; temporaries of a killed run go."""
        if self._begun:
            return
        self._begun = True
        plan = self.plan
        plan.out.clear_markers(plan.shard, lock)
        if plan.opts.retry_failed:
            dropped = plan.out.drop_failures(plan.shard, lock, below_seq=first_seq)
            if dropped:
                logger.info("--retry-failed: %d failed rows are pending again", dropped)
        plan.out.prepare_writes(plan.shard)

    def _finish(self, summary: Summary) -> Summary:
        """Wall time, standing failures, and the one line every run ends with."""
        plan = self.plan
        if summary.noop or not hasattr(self, "_failed_before"):
            summary.standing_failed = standing_failures(plan)
        else:  # known without reading the failure records again
            dropped = plan.opts.retry_failed and self._begun
            summary.standing_failed = (0 if dropped else self._failed_before) + summary.failed
        summary.wall_seconds = time.monotonic() - plan.t0
        if summary.stats.last_batch_at is not None:
            summary.tail_s = time.monotonic() - summary.stats.last_batch_at
        if summary.noop:
            logger.info("nothing to do: shard %s of the manifest is already in %s", plan.shard, plan.out.root)
        logger.info(summary.line(), extra={"event": "summary", "summary": summary.to_json()})
        return summary


def run_shard(opts: JobOptions, embed: Embed, shard: Shard | None = None, *, model=None, stop: threading.Event | None = None,
              seams: Seams = NONE, on_progress: Callable[[int, int, float], None] | None = None) -> Summary:
    """One shard (opts.shard unless given), its pending rows embedded by `embed`: ShardRun's contract."""
    return ShardRun(opts, shard, seams=seams, stop=stop, on_progress=on_progress).run(embed, model=model)


def standing_failures(plan: Plan) -> int:
    """This shard's rows with a failure record (only failure files are read)."""
    failed = _id_series(plan.out.read_ids(plan.out.failure_files(), plan.manifest.id_type), plan.rows)
    return plan.rows.filter(pl.col("id").is_in(failed.implode())).height if len(failed) else 0
