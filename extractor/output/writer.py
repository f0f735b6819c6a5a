"""The write stage: finished rows and failure records → committed Parquet parts, on its own thread.

A PartWriter is a context manager, and the run opens it inside its lock: `__exit__` stops the
thread on every path (a clean end and a signal commit what is finished; an error drops it, and a
rerun redoes those rows), so nothing is committed after the run that started it has let go of
its lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..constants import OUTPUT_FRAME_RATE_HZ
from .. import hooks
from ..errors import Interrupted
from ..ledger import Failure
from ..manifest.read import Manifest
from ..options import Shard
from ..recipe import METADATA_KEY, Recipe
from .layout import OutputDir, failure_table, part_name

logger = logging.getLogger(__name__)

TICK_S = 0.5  # the writer looks at its commit timer this often when nothing arrives


@dataclass
class Rows:
    """Finished rows of a batch: item k is row k of the run's pending rows."""

    items: np.ndarray  # (n,) int64
    embeddings: np.ndarray  # (n, D) float32
    durations: np.ndarray  # (n,) float64, seconds of audio used
    frames: list[np.ndarray] | None = None  # --pooling none: (frames_k, D) float32 each


def nonfinite(rows: Rows) -> np.ndarray:
    """Mask of rows whose embedding (or frames) is not finite.

    Finite samples can still overflow float32 inside the encoder (a float WAV holding 1e20 gives
    an infinite STFT power, found by tests/test_fuzz.py): such a row becomes a failure record,
    never a NaN in the dataset. Weights are checked at load, so this is the audio's doing.
    """
    bad = ~np.isfinite(rows.embeddings).all(axis=1)
    if rows.frames is not None:
        bad |= np.array([not np.isfinite(f).all() for f in rows.frames], dtype=bool)
    return bad


class PartWriter:
    """Collects finished rows and failures; commits a part when it is big or old enough."""

    def __init__(self, out: OutputDir, lock, shard: Shard, manifest: Manifest, pending, recipe: Recipe, *,
                 first_seq: int, seq_step: int = 1, keep_columns: tuple[str, ...] = (), part_rows: int, part_bytes: int,
                 commit_seconds: float, metadata: dict[bytes, bytes] | None = None, path_column: bool | None = None):
        """`path_column`: whether parts carry the manifest's `path`, as the output's `_run.json`
        says (`OutputDir.create_run(...).path_column`); None reads it from there."""
        self.out, self.lock, self.shard, self.manifest, self.pending, self.recipe = out, lock, shard, manifest, pending, recipe
        self.path_column = out.read_run().path_column if path_column is None else path_column
        self.part_rows, self.part_bytes, self.commit_seconds = part_rows, part_bytes, commit_seconds
        self.seq, self.seq_step = first_seq, seq_step
        self.d_model, self.pooling = recipe.d_model, recipe.pooling
        self.np_dtype = np.float16 if recipe.output_dtype == "float16" else np.float32
        self.pa_dtype = pa.float16() if recipe.output_dtype == "float16" else pa.float32()
        self._kept = list(keep_columns)
        self._meta = {METADATA_KEY: recipe.to_json().encode(), **(metadata or {})}
        self._rows: list[Rows] = []
        self._failures: list[tuple[np.ndarray, list[Failure]]] = []
        self._n = self._bytes = 0
        self._first_at: float | None = None
        self.embedded = self.failed = self.parts = 0
        self.audio_s = 0.0
        self._q: queue.Queue = queue.Queue(maxsize=256)  # blocks of rows, not rows: a few batches' worth
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="writer", daemon=True)

    # -- the run's side ---------------------------------------------------------------------
    def __enter__(self) -> PartWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        keep = exc_type is None or issubclass(exc_type, Interrupted)
        self._q.put(("close" if keep else "abort", None))
        self._thread.join()
        if exc_type is None:
            self.check()

    def put_rows(self, rows: Rows) -> None:
        self.check()
        self._q.put(("rows", rows))

    def put_failures(self, items: np.ndarray, errors: list[Failure]) -> None:
        self.check()
        if len(items):
            self._q.put(("fail", (np.asarray(items, dtype=np.int64), list(errors))))

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing the output failed: {self.error}") from self.error

    # -- the writer thread ------------------------------------------------------------------
    def _loop(self) -> None:
        kind = None
        try:
            while True:
                try:
                    kind, payload = self._q.get(timeout=TICK_S)
                except queue.Empty:
                    kind, payload = "tick", None
                if kind == "rows":
                    self._add_rows(payload)
                elif kind == "fail":
                    self._add_failures(*payload)
                elif kind == "close":
                    self._commit()
                    return
                elif kind == "abort":
                    if self._n:
                        logger.info("dropping %d finished rows not yet committed (the run failed; a rerun redoes them)", self._n)
                    return
                if self._n and (self._n >= self.part_rows or self._bytes >= self.part_bytes
                                or time.monotonic() - self._first_at >= self.commit_seconds):
                    self._commit()
        except BaseException as e:  # surfaced to the run through check() and __exit__
            logger.error("writer failed: %s", e)
            self.error = e
            if kind in ("close", "abort"):
                return  # the last commit failed: the run waits in __exit__, and nothing more comes
            # Keep draining so the run never blocks on a dead writer; stop at close or abort.
            while True:
                try:
                    if self._q.get(timeout=0.1)[0] in ("close", "abort"):
                        return
                except queue.Empty:
                    continue

    def _add_rows(self, rows: Rows) -> None:
        bad = nonfinite(rows)
        if bad.any():
            paths = self.pending["path"].gather(rows.items[bad]).to_list()
            self._add_failures(rows.items[bad], [Failure("NonFiniteEmbedding", f"the encoder gave NaN/Inf for {p} (samples too large for float32?)")
                                                 for p in paths])
            keep = ~bad
            rows = Rows(rows.items[keep], rows.embeddings[keep], rows.durations[keep],
                        None if rows.frames is None else [f for f, k in zip(rows.frames, keep) if k])
        if len(rows.items):
            self._rows.append(rows)
            self._n += len(rows.items)
            self._bytes += rows.embeddings.nbytes + (sum(f.nbytes for f in rows.frames) if rows.frames is not None else 0)
            self._first_at = self._first_at or time.monotonic()

    def _add_failures(self, items: np.ndarray, errors: list[Failure]) -> None:
        self._failures.append((items, errors))
        self._n += len(items)
        self._first_at = self._first_at or time.monotonic()

    def _commit(self) -> None:
        if not self._n:
            return
        name = part_name(self.shard, self.seq)
        rows = self._rows_table() if self._rows else None
        failures = self._failures_table() if self._failures else None
        if rows is not None:
            self.out.commit_table(rows, name, failures=False, lock=self.lock)
        if failures is not None:
            self.out.commit_table(failures, name, failures=True, lock=self.lock)
        self.seq += self.seq_step
        self.parts += 1
        self.embedded += 0 if rows is None else rows.num_rows
        self.failed += 0 if failures is None else failures.num_rows
        self.audio_s += float(sum(r.durations.sum() for r in self._rows))
        self._rows, self._failures, self._n, self._bytes, self._first_at = [], [], 0, 0, None
        hooks.point("committed", seq=self.seq - self.seq_step, rows=0 if rows is None else rows.num_rows,
                    failures=0 if failures is None else failures.num_rows)

    def _rows_table(self) -> pa.Table:
        items = np.concatenate([r.items for r in self._rows])
        base = self.pending[items]
        emb = np.concatenate([r.embeddings for r in self._rows]).astype(self.np_dtype, copy=False)
        cols = {
            "id": self.manifest.to_arrow("id", base["id"]),
            **({"path": self.manifest.to_arrow("path", base["path"])} if self.path_column else {}),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=self.pa_dtype), self.d_model),
            "duration_s": pa.array(np.concatenate([r.durations for r in self._rows]), type=pa.float64()),
        }
        if self.pooling == "none":
            frames = [f for r in self._rows for f in r.frames]
            counts = np.array([len(f) for f in frames], dtype=np.int64)
            flat = np.concatenate(frames).astype(self.np_dtype, copy=False)
            inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=self.pa_dtype), self.d_model)
            offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
            cols["frames"] = pa.ListArray.from_arrays(offsets, inner)
            cols["frame_rate_hz"] = pa.array(np.full(len(items), OUTPUT_FRAME_RATE_HZ), type=pa.float64())
        for c in self._kept:
            cols[c] = self.manifest.to_arrow(c, base[c])
        return pa.table(cols).replace_schema_metadata(self._meta)

    def _failures_table(self) -> pa.Table:
        items = np.concatenate([f[0] for f in self._failures])
        return failure_table(self.manifest, self.pending[items], [e for f in self._failures for e in f[1]], self._meta)
