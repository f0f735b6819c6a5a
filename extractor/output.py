"""The output directory: committed parts, failure records, the recipe, the lock and the markers.

The data is the journal. A row is done when it sits in a committed part (`part-*.parquet`) or in
a committed failure file (`_failures/part-*.parquet`); nothing else records progress. A part is
written under `_tmp/`, flushed and fsynced, then renamed into place, so a reader or a resume only
ever sees complete files. `_SUCCESS` is written last, when every manifest row is in one of the two.

Names starting with `_` are skipped by pyarrow.dataset and by a `*.parquet` glob, so the
directory reads directly as a dataset.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .recipe import Recipe

logger = logging.getLogger(__name__)

RUN_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS"
FAILURES_DIR = "_failures"
TMP_DIR = "_tmp"
ROW_GROUP_BYTES = 32 << 20  # readers fetch row groups: tens of MB, not one 5 GB group
_PART_RE = re.compile(r"^part-(\d{5})-(\d{6})\.parquet$")


class OutputError(Exception):
    """The output directory cannot be used for this run (exit 2)."""


class LockHeld(OutputError):
    pass


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: the file is either absent or complete."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _process_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot, to tell a live owner from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class RunLock:
    """One run per (output, shard) at a time.

    An exclusive flock on `_lock-<shard>`: the kernel drops it when the holder dies, however it
    dies, so a lock left by a killed run is always taken over, and a live holder always refuses
    the next run. The file's content says who holds it, for the error message and the log.
    """

    def __init__(self, root: Path, shard: Shard):
        self.path = root / f"_lock-{shard.tag}"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(f"another run holds {self.path} ({holder}); refusing to run concurrently") from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            logger.warning("taking over stale lock %s left by a dead run (%s)", self.path, previous)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # Empty the file before unlocking: an empty lock file means a clean exit.
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class OutputDir:
    def __init__(self, root: str | Path, shard: Shard = Shard()):
        self.root = Path(root)
        self.shard = shard

    # -- reading what is done ------------------------------------------------------------
    def part_files(self) -> list[Path]:
        return sorted(p for p in self.root.glob("part-*.parquet") if _PART_RE.match(p.name))

    def failure_files(self) -> list[Path]:
        return sorted(p for p in (self.root / FAILURES_DIR).glob("part-*.parquet") if _PART_RE.match(p.name))

    def read_ids(self, files: list[Path]) -> pa.ChunkedArray | None:
        tables = [pq.read_table(f, columns=["id"]) for f in files]
        return pa.concat_tables(tables).column("id") if tables else None

    def existing_recipe(self) -> Recipe | None:
        path = self.root / RUN_FILE
        if not path.exists():
            return None
        try:
            return Recipe.from_dict(json.loads(path.read_text())["recipe"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OutputError(f"cannot read {path}: {e}; move it away if the output is not ours") from e

    def is_complete(self) -> bool:
        return (self.root / SUCCESS_FILE).exists()

    # -- taking ownership -----------------------------------------------------------------
    def open_for_writing(self, recipe: Recipe) -> RunLock:
        """Create the directory, take the lock, check or write the recipe, clean our temporaries."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.root, self.shard)
        lock.acquire()
        try:
            (self.root / FAILURES_DIR).mkdir(exist_ok=True)
            (self.root / TMP_DIR).mkdir(exist_ok=True)
            self.check_recipe(recipe)
            for tmp in (self.root / TMP_DIR).glob(f"part-{self.shard.tag}-*"):
                logger.info("removing %s left by an interrupted run", tmp)
                tmp.unlink(missing_ok=True)
        except BaseException:
            lock.release()
            raise
        return lock

    def check_recipe(self, recipe: Recipe) -> None:
        existing = self.existing_recipe()
        if existing is None:
            if self.part_files() or self.failure_files():
                raise RecipeMismatch(f"{self.root} holds parts but no {RUN_FILE}: not an output of this job, refusing to mix")
            payload = {"recipe": json.loads(recipe.to_json()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_atomic(self.root / RUN_FILE, json.dumps(payload, indent=2, sort_keys=True).encode())
            return
        diff = recipe.differences(existing)
        if diff:
            raise RecipeMismatch(f"{self.root} was written with another recipe; refusing to mix: " + "; ".join(diff))

    def next_seq(self) -> int:
        seqs = [int(m.group(2)) for p in self.part_files() + self.failure_files() if (m := _PART_RE.match(p.name)) and m.group(1) == self.shard.tag]
        return max(seqs, default=-1) + 1

    # -- committing -------------------------------------------------------------------------
    def commit_table(self, table: pa.Table, name: str, *, failures: bool) -> Path:
        """Write `table` as `name` under the root (or _failures/) via _tmp/ and an atomic rename."""
        final = (self.root / FAILURES_DIR if failures else self.root) / name
        tmp = self.root / TMP_DIR / f"{name}.{os.getpid()}.tmp"
        bytes_per_row = max(1, table.nbytes // max(1, table.num_rows))
        with open(tmp, "wb") as f:
            pq.write_table(table, f, row_group_size=max(1, ROW_GROUP_BYTES // bytes_per_row), compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        return final

    def write_markers(self) -> bool:
        """Mark this shard done; write `_SUCCESS` once every shard's marker is there."""
        write_atomic(self.root / self.shard.marker, b"")
        markers = [self.root / Shard(i, self.shard.count).marker for i in range(self.shard.count)]
        if all(m.exists() for m in markers):
            write_atomic(self.root / SUCCESS_FILE, b"")
            return True
        return False

    def clear_markers(self) -> None:
        """New work for this shard: the output is no longer complete until it is done."""
        for name in (SUCCESS_FILE, self.shard.marker):
            (self.root / name).unlink(missing_ok=True)

    def drop_failures(self) -> int:
        """--retry-failed: this shard's failure records go, so their rows are pending again."""
        n = 0
        for f in self.failure_files():
            if f.name.startswith(f"part-{self.shard.tag}-"):
                n += pq.read_metadata(f).num_rows
                f.unlink()
        return n
