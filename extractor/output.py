"""The output directory: committed parts, failure records, the recipe, the lock and the markers.

The data is the journal. A row is done when it sits in a committed part (`part-*.parquet`) or in
a committed failure file (`_failures/part-*.parquet`); nothing else records progress. In a local
directory a part is written under `_tmp/`, flushed and fsynced, then renamed into place; in an
object store (an fsspec URL) it is uploaded to its final key in one piece, which appears whole or
not at all (extractor.storage tells how and why). Either way a reader or a resume only ever sees
complete files. `_SUCCESS` is written last, when every manifest row is in one of the two.

Names starting with `_` are skipped by pyarrow.dataset and by a `*.parquet` glob, so the
directory reads directly as a dataset.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from .recipe import Recipe
from .storage import LOCK_STALE_S, TMP_DIR, Location, LockHeld, LockLost, OutputError, RunLock, basename, open_storage

logger = logging.getLogger(__name__)

RUN_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS"
FAILURES_DIR = "_failures"
ROW_GROUP_BYTES = 32 << 20  # readers fetch row groups: tens of MB, not one 5 GB group
_PART_RE = re.compile(r"^part-(\d{5})-(\d{6})\.parquet$")


__all__ = ["LockHeld", "LockLost", "OutputDir", "OutputError", "RecipeMismatch", "RunLock", "Shard", "TMP_DIR"]


class RecipeMismatch(OutputError):
    pass


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    @property
    def tag(self) -> str:
        return f"{self.index:05d}"

    @property
    def marker(self) -> str:
        return f"_SUCCESS-{self.index:05d}-of-{self.count:05d}"


class OutputDir:
    """An output: a local directory (a path or file:// URL) or an object-store prefix (s3://, gs://, ...)."""

    def __init__(self, root: str | Path, shard: Shard = Shard(), storage_options: Mapping | None = None, *, lock_stale_s: float = LOCK_STALE_S):
        self.storage = open_storage(root, storage_options)
        self.root = self.storage.root  # a Path for a directory, a URL for an object store
        self.shard = shard
        self.lock_stale_s = lock_stale_s
        self._lock = None

    # -- reading what is done ------------------------------------------------------------
    def part_files(self) -> list[Location]:
        return [p for p in self.storage.glob("part-*.parquet") if _PART_RE.match(basename(p))]

    def failure_files(self) -> list[Location]:
        return [p for p in self.storage.glob(f"{FAILURES_DIR}/part-*.parquet") if _PART_RE.match(basename(p))]

    def read_ids(self, files: list[Location]) -> pa.ChunkedArray | None:
        tables = self.storage.read_tables(files, columns=["id"])
        return pa.concat_tables(tables).column("id") if tables else None

    def existing_recipe(self) -> Recipe | None:
        if not self.storage.exists(RUN_FILE):
            return None
        try:
            return Recipe.from_dict(json.loads(self.storage.read_text(RUN_FILE))["recipe"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OutputError(f"cannot read {self.storage.location(RUN_FILE)}: {e}; move it away if the output is not ours") from e

    def is_complete(self) -> bool:
        return self.storage.exists(SUCCESS_FILE)

    def shard_done(self) -> bool:
        return self.storage.exists(self.shard.marker)

    # -- taking ownership -----------------------------------------------------------------
    def open_for_writing(self, recipe: Recipe):
        """Create the directory, take the lock, check or write the recipe, clean our temporaries."""
        self.storage.makedirs()
        lock = self.storage.lock(f"_lock-{self.shard.tag}", stale_after_s=self.lock_stale_s)
        lock.acquire()
        try:
            self.storage.makedirs(FAILURES_DIR, TMP_DIR)
            self.check_recipe(recipe)
            self.storage.discard_uncommitted([f"part-{self.shard.tag}-", f"{FAILURES_DIR}/part-{self.shard.tag}-"])
            self._discard_small_file_temporaries()
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        return lock

    def _discard_small_file_temporaries(self) -> None:
        """A kill while `_run.json`, a marker or `_SUCCESS` was written leaves its hidden sibling
        `.NAME.PID.tmp` (readers skip it, but they pile up; found by tests/test_reliability.py).
        Only this shard writes its marker; `_run.json` and `_SUCCESS` may be written by any shard,
        so theirs go only when there is one shard, whose lock we hold."""
        names = [self.shard.marker] + ([RUN_FILE, SUCCESS_FILE] if self.shard.count == 1 else [])
        for name in names:
            for tmp in self.storage.glob(f".{name}.*.tmp"):
                logger.info("removing %s left by an interrupted run", tmp)
                self.storage.delete(basename(tmp))

    def _check_lock(self) -> None:
        """Before each write: a run that may have lost its object-store lock stops (LockLost)."""
        if self._lock is not None:
            self._lock.check()

    def check_recipe(self, recipe: Recipe) -> None:
        existing = self.existing_recipe()
        if existing is None:
            if self.part_files() or self.failure_files():
                raise RecipeMismatch(f"{self.root} holds parts but no {RUN_FILE}: not an output of this job, refusing to mix")
            payload = {"recipe": json.loads(recipe.to_json()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self.storage.write(RUN_FILE, json.dumps(payload, indent=2, sort_keys=True).encode())
            return
        diff = recipe.differences(existing)
        if diff:
            raise RecipeMismatch(f"{self.root} was written with another recipe; refusing to mix: " + "; ".join(diff))

    def next_seq(self) -> int:
        seqs = [int(m.group(2)) for p in self.part_files() + self.failure_files() if (m := _PART_RE.match(basename(p))) and m.group(1) == self.shard.tag]
        return max(seqs, default=-1) + 1

    # -- committing -------------------------------------------------------------------------
    def commit_table(self, table: pa.Table, name: str, *, failures: bool) -> Location:
        """Write `table` as `name` under the root (or _failures/), complete or not at all."""
        self._check_lock()
        bytes_per_row = max(1, table.nbytes // max(1, table.num_rows))

        def fill(f) -> None:
            pq.write_table(table, f, row_group_size=max(1, ROW_GROUP_BYTES // bytes_per_row), compression="zstd")

        return self.storage.commit(f"{FAILURES_DIR}/{name}" if failures else name, fill)

    def write_markers(self) -> bool:
        """Mark this shard done; write `_SUCCESS` once every shard's marker is there."""
        self._check_lock()
        self.storage.write(self.shard.marker, b"")
        markers = [Shard(i, self.shard.count).marker for i in range(self.shard.count)]
        if all(self.storage.exists(m) for m in markers):
            self.storage.write(SUCCESS_FILE, b"")
            return True
        return False

    def clear_markers(self) -> None:
        """New work for this shard: the output is no longer complete until it is done."""
        for name in (SUCCESS_FILE, self.shard.marker):
            self.storage.delete(name)

    def drop_failures(self) -> int:
        """--retry-failed: this shard's failure records go, so their rows are pending again."""
        self._check_lock()
        n = 0
        for f in self.failure_files():
            if basename(f).startswith(f"part-{self.shard.tag}-"):
                n += self.storage.num_rows(f)
                self.storage.delete(f"{FAILURES_DIR}/{basename(f)}")
        return n
