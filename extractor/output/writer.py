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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..errors import Interrupted
from ..ledger import FailedRows, Failure, Rows
from ..manifest.types import to_canonical
from ..options import Shard
from ..pending import Pending
from ..recipe import METADATA_KEY, Recipe
from .layout import OutputDir, failure_table, part_name

logger = logging.getLogger(__name__)

TICK_S = 0.5  # the writer looks at its commit timer this often when nothing arrives


@dataclass(frozen=True)
class _Close:
    """The run is over: commit what is finished (keep), or drop it (the run failed)."""

    keep: bool


def nonfinite(rows: Rows) -> np.ndarray:
    """Mask of rows whose embedding (or any per-row float column, frames included) is not finite.

    Finite samples can still overflow float32 inside the encoder (a float WAV holding 1e20 gives
    an infinite STFT power, found by tests/test_fuzz.py): such a row becomes a failure record,
    never a NaN in the dataset. Weights are checked at load, so this is the audio's doing.
    """
    bad = ~np.isfinite(rows.embeddings).all(axis=1)
    for col in rows.columns.values():
        if isinstance(col, list):
            bad |= np.array([not np.isfinite(v).all() for v in col], dtype=bool)
    return bad


class PartWriter:
    """Collects finished rows and failures; commits a part when it is big or old enough.

    `rows`: the run's pending rows, looked up by item for each row's id, path and kept columns;
    `types`: each output column's canonical Arrow type (manifest.types)."""

    def __init__(self, out: OutputDir, lock, shard: Shard, rows: Pending, types: dict[str, pa.DataType], recipe: Recipe, *,
                 first_seq: int, seq_step: int = 1, keep_columns: tuple[str, ...] = (), part_rows: int, part_bytes: int,
                 commit_seconds: float, metadata: dict[bytes, bytes] | None = None, path_column: bool = True,
                 on_event: Callable[..., None] | None = None):
        """`path_column`: whether parts carry the manifest's `path`, as the output's `_run.json`
        says (`OutputDir.create_run(...).path_column`)."""
        self.out, self.lock, self.shard, self.rows, self.types, self.recipe = out, lock, shard, rows, types, recipe
        self.path_column = path_column
        self.part_rows, self.part_bytes, self.commit_seconds = part_rows, part_bytes, commit_seconds
        self.seq, self.seq_step = first_seq, seq_step
        self.d_model = recipe.d_model
        self.np_dtype = np.float16 if recipe.output_dtype == "float16" else np.float32
        self.pa_dtype = pa.float16() if recipe.output_dtype == "float16" else pa.float32()
        self._kept = list(keep_columns)
        self._meta = {METADATA_KEY: recipe.to_json().encode(), **(metadata or {})}
        self._on_event = on_event or (lambda name, **info: None)
        self._rows: list[Rows] = []
        self._failures: list[FailedRows] = []
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
        self._q.put(_Close(keep))
        self._thread.join()
        if exc_type is None:
            self.check()

    def put_rows(self, rows: Rows) -> None:
        self.check()
        self._q.put(rows)

    def put_failures(self, items: np.ndarray, failures: list[Failure]) -> None:
        self.check()
        if len(items):
            self._q.put(FailedRows(np.asarray(items, dtype=np.int64), list(failures)))

    def check(self) -> None:
        if self.error is not None:
            if hasattr(self.error, "exit_code"):  # a known outcome (the lock lost, a part's name taken): its own exit code
                raise self.error
            raise RuntimeError(f"writing the output failed: {self.error}") from self.error

    # -- the writer thread ------------------------------------------------------------------
    def _loop(self) -> None:
        message = None
        try:
            while True:
                try:
                    message = self._q.get(timeout=TICK_S)
                except queue.Empty:
                    message = None
                if isinstance(message, Rows):
                    self._add_rows(message)
                elif isinstance(message, FailedRows):
                    self._add_failures(message)
                elif isinstance(message, _Close):
                    if message.keep:
                        self._commit()
                    elif self._n:
                        logger.info("dropping %d finished rows not yet committed (the run failed; a rerun redoes them)", self._n)
                    return
                if self._n and (self._n >= self.part_rows or self._bytes >= self.part_bytes
                                or time.monotonic() - self._first_at >= self.commit_seconds):
                    self._commit()
        except BaseException as e:  # surfaced to the run through check() and __exit__
            logger.error("writer failed: %s", e)
            self.error = e
            if isinstance(message, _Close):
                return  # the last commit failed: the run waits in __exit__, and nothing more comes
            # Keep draining so the run never blocks on a dead writer; stop at the close.
            while True:
                try:
                    if isinstance(self._q.get(timeout=0.1), _Close):
                        return
                except queue.Empty:
                    continue

    def _add_rows(self, rows: Rows) -> None:
        bad = nonfinite(rows)
        if bad.any():
            paths = self.rows.gather(rows.items[bad])["path"].to_list()
            self._add_failures(FailedRows(rows.items[bad], [Failure("NonFiniteEmbedding", f"the encoder gave NaN/Inf for {p} "
                                                                    "(samples too large for float32?)") for p in paths]))
            rows = rows.select(~bad)
        if len(rows):
            self._rows.append(rows)
            self._n += len(rows)
            self._bytes += rows.embeddings.nbytes + sum(sum(v.nbytes for v in c) if isinstance(c, list) else c.nbytes for c in rows.columns.values())
            self._first_at = self._first_at or time.monotonic()

    def _add_failures(self, failed: FailedRows) -> None:
        self._failures.append(failed)
        self._n += len(failed)
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
        self._on_event("committed", seq=self.seq - self.seq_step, rows=0 if rows is None else rows.num_rows,
                       failures=0 if failures is None else failures.num_rows)

    def _column(self, name: str, values) -> pa.Array:
        return to_canonical(values.to_arrow(), self.types[name]) if name in self.types else values.to_arrow()

    def _vectors(self, flat: np.ndarray) -> pa.Array:
        """(n, D) → fixed_size_list<output dtype>[D]."""
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(self.np_dtype, copy=False).reshape(-1), type=self.pa_dtype), self.d_model)

    def _rows_table(self) -> pa.Table:
        items = np.concatenate([r.items for r in self._rows])
        base = self.rows.gather(items)
        cols = {
            "id": self._column("id", base["id"]),
            **({"path": self._column("path", base["path"])} if self.path_column else {}),
            "embedding": self._vectors(np.concatenate([r.embeddings for r in self._rows])),
            "duration_s": pa.array(np.concatenate([r.durations for r in self._rows]), type=pa.float64()),
        }
        for name in self._rows[0].columns:  # what the pooling adds: per-row vectors (frames) or numbers
            parts = [r.columns[name] for r in self._rows]
            if isinstance(parts[0], list):  # a (k, D) array per row → list<fixed_size_list<float>[D]>
                values = [v for p in parts for v in p]
                offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
                cols[name] = pa.ListArray.from_arrays(pa.array(offsets), self._vectors(np.concatenate(values)))
            else:
                cols[name] = pa.array(np.concatenate(parts))
        for c in self._kept:
            cols[c] = self._column(c, base[c])
        return pa.table(cols).replace_schema_metadata(self._meta)

    def _failures_table(self) -> pa.Table:
        base = self.rows.gather(np.concatenate([f.items for f in self._failures]))
        return failure_table(self.types, base["id"], base["path"], [e for f in self._failures for e in f.failures], self._meta)
