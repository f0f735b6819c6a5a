"""The output: what lives where, what is done, and the checks that refuse an output before a write.

    OUTPUT/
      embeddings/part-SSSSS-NNNNNN.parquet   one row per embedded manifest row: point readers here
      failures/part-SSSSS-NNNNNN.parquet     id, path, error: one row per row that could not be embedded
      _run.json                              the recipe and the shard layout, written once
      _SUCCESS                               written last: every shard done for one manifest (JSON)
      _shards/SSSSS.done                     shard SSSSS done for a manifest (JSON), SSSSS.lock while it runs
      _tmp/                                  parts being written (a directory only)

`embeddings/` holds nothing but parts, so every reader reads it as the embeddings with its usual
call (polars and duckdb list it recursively and refuse mixed files; HF datasets reads every file
it finds; issue 12). `failures/` reads the same way.

The data is the journal. A row is done when it sits in a committed part or failure file; nothing
else records progress. A part is written whole or not at all (output.storage), so a reader or a
resume only ever sees complete files. Markers are a cache of "nothing to do": they name the
manifest they were written for (a fingerprint of its rows) and the inputs of the recipe, so a
rerun over a finished shard exits at once without loading the model, and last night's marker
never stands for tonight's manifest. Nothing trusts a marker for what is done.
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

from ..manifest.types import canonical_type
from ..options import Shard
from ..recipe import Recipe
from .locks import LOCK_STALE_S, LockUnusable
from .storage import TMP_DIR, Location, OutputError, basename, is_url, open_storage

logger = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
FAILURES_DIR = "failures"
RUN_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS"
SHARDS_DIR = "_shards"
LAYOUT_VERSION = 2  # 1: parts and _failures/ at the top (0.1.x); see tools/migrate.py
ROW_GROUP_BYTES = 32 << 20  # readers fetch row groups: tens of MB, not one 5 GB group
PART_RE = re.compile(r"^part-(\d{5})-(\d{6})\.parquet$")
MIGRATE = "python -m extractor.tools.migrate"

__all__ = ["EMBEDDINGS_DIR", "FAILURES_DIR", "OutputDir", "OutputError", "RecipeMismatch", "RunInfo", "SUCCESS_FILE"]


class RecipeMismatch(OutputError):
    """The output was written with another recipe or shard layout (exit 2)."""

    @classmethod
    def naming(cls, root, differences: list[str]) -> "RecipeMismatch":
        return cls(f"{root} was written with another recipe or layout; refusing to mix: " + "; ".join(differences))


def layout_differences(existing: int, this: int) -> list[str]:
    """'num_shards: old → new' if the shard layouts differ."""
    if existing == this:
        return []
    return [f"num_shards: {existing} (existing output) → {this} (this run); an output keeps the shard layout it was started with"]


def part_name(shard: Shard, seq: int) -> str:
    return f"part-{shard.tag}-{seq:06d}.parquet"


@dataclass(frozen=True)
class RunInfo:
    """What `_run.json` holds: the recipe every part was computed with, and the shard layout."""

    recipe: Recipe
    num_shards: int
    sources: dict  # readable: which model and adapter (repo id and commit, or path); not compared
    id_type: str | None = None  # the ids' canonical Arrow type (manifest.types); None in outputs made before it was kept

    def to_bytes(self) -> bytes:
        payload = {"layout_version": LAYOUT_VERSION, "num_shards": self.num_shards, "recipe": json.loads(self.recipe.to_json()),
                   "sources": self.sources, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self.id_type is not None:
            payload["id_type"] = self.id_type
        return json.dumps(payload, indent=2, sort_keys=True).encode()

    def differences(self, other: RunInfo) -> list[str]:
        """'field: old → new' for each difference from `other` (what the output holds)."""
        return self.recipe.differences(other.recipe) + layout_differences(other.num_shards, self.num_shards)


class OutputDir:
    """An output: a local directory (a path or file:// URL) or an object-store prefix (s3://, gs://, ...)."""

    def __init__(self, root: str | Path, storage_options: Mapping | None = None, *, lock_stale_s: float = LOCK_STALE_S):
        local = not is_url(str(root)) or str(root).startswith("file://")
        if local:
            path = Path(str(root).removeprefix("file://"))
            if path.exists() and not path.is_dir():
                raise OutputError(f"--output {root} is a file, not a directory; name a directory (it is created if missing)")
        self.storage = open_storage(root, storage_options)
        self.root = self.storage.root  # a Path for a directory, a URL for an object store
        self.lock_stale_s = lock_stale_s
        self._created: list[Path] = []  # directories this run made, removed again if it writes nothing

    def __str__(self) -> str:
        return str(self.root)

    # -- the checks before anything is written --------------------------------------------
    def check(self) -> RunInfo | None:
        """Refuse an output that is not ours, is in the old layout or has things in the readers'
        way; return what `_run.json` holds (None for a new output). Reads only."""
        st = self.storage
        for name in (EMBEDDINGS_DIR, FAILURES_DIR, SHARDS_DIR, TMP_DIR):
            if st.is_file(name):
                raise OutputError(f"{st.location(name)} is a file where the output keeps a directory: move it away")
        old = [basename(p) for p in st.glob("part-*.parquet")] + (["_failures/"] if st.exists("_failures") else [])
        if old:
            raise OutputError(
                f"{self.root} is in the layout of version 0.1 ({old[0]} at its top): parts now live under "
                f"{EMBEDDINGS_DIR}/ and failure records under {FAILURES_DIR}/. Move it with: {MIGRATE} {self.root}"
            )
        strays = [basename(p) for p in st.glob("*.parquet")]
        if strays:
            raise OutputError(f"{st.location(strays[0])} is not a file of this job; move it out of the output directory")
        for folder in (EMBEDDINGS_DIR, FAILURES_DIR):
            foreign = [p for p in st.glob(f"{folder}/*") if not PART_RE.match(basename(p))]
            if foreign:
                raise OutputError(f"{foreign[0]} is not a part of this job: readers of {folder}/ would read it; move it away")
        info = self.read_run()
        if info is None and (self.part_files() or self.failure_files()):
            raise OutputError(f"{self.root} holds parts but no {RUN_FILE}: not an output of this job, refusing to mix")
        return info

    def read_run(self) -> RunInfo | None:
        if not self.storage.exists(RUN_FILE):
            return None
        where = self.storage.location(RUN_FILE)
        try:
            d = json.loads(self.storage.read_text(RUN_FILE))
            if not isinstance(d, dict) or not isinstance(d.get("recipe"), dict):
                raise ValueError("no recipe object in it")
            if "num_shards" not in d:
                raise OutputError(f"{where} is from version 0.1 (no shard layout): move the output with {MIGRATE} {self.root}")
            num_shards = d["num_shards"]
            if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
                raise ValueError(f"num_shards is {num_shards!r}")
            id_type = d.get("id_type")
            return RunInfo(Recipe.from_dict(d["recipe"]), num_shards, d.get("sources") or {}, id_type if isinstance(id_type, str) else None)
        except OutputError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OutputError(f"{where} is not a recipe this job can read ({e}); move it away if the output is not ours") from e

    def create_run(self, info: RunInfo) -> None:
        """Write `_run.json` if absent (atomically: of two runs exactly one creates it), else
        compare with it; RecipeMismatch names what differs. The first write of a run."""
        if not self.storage.create(RUN_FILE, info.to_bytes()):
            self.check_run(info, self.read_run())

    def check_run(self, info: RunInfo, existing: RunInfo | None) -> None:
        if existing is None:
            return
        diff = info.differences(existing)
        if diff:
            raise RecipeMismatch.naming(self.root, diff)

    # -- what is done ---------------------------------------------------------------------
    def part_files(self) -> list[Location]:
        return [p for p in self.storage.glob(f"{EMBEDDINGS_DIR}/part-*.parquet") if PART_RE.match(basename(p))]

    def failure_files(self) -> list[Location]:
        return [p for p in self.storage.glob(f"{FAILURES_DIR}/part-*.parquet") if PART_RE.match(basename(p))]

    def read_ids(self, files: list[Location], id_type: pa.DataType) -> pa.Array:
        """The ids of `files`, cast to `id_type`: parts written before ids had one canonical type
        (string beside large_string, int32 beside int64) read as one column."""
        tables = self.storage.read_tables(files, columns=["id"])
        if not tables:
            return pa.array([], type=id_type)
        try:
            return pa.concat_arrays([c.cast(id_type) for t in tables for c in t.column("id").chunks])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise OutputError(f"{self.root}: committed ids do not convert to the manifest's id type {id_type}: {e}") from e

    def id_type(self, existing: RunInfo | None) -> str | None:
        """The canonical type of this output's ids: as `_run.json` records it, else as the first
        committed file's footer says (outputs made before it was recorded); None for a new output."""
        if existing is not None and existing.id_type is not None:
            return existing.id_type
        for files in (self.part_files(), self.failure_files()):
            for f in files:
                try:
                    schema = self.storage.read_parts([f], [])[0].schema
                except Exception:  # a damaged file is the plan's to deal with
                    schema = None
                if schema is not None and "id" in schema.names:
                    return str(canonical_type(schema.field("id").type))
        return None

    def shard_files(self, shard: Shard) -> dict[str, int]:
        """{`folder/name`: bytes} of the shard's committed parts and failure records: one listing of
        each folder, what its marker vouches for (no file is read)."""
        found = {}
        for folder in (EMBEDDINGS_DIR, FAILURES_DIR):
            found.update(self.storage.sizes(f"{folder}/part-{shard.tag}-*.parquet"))
        return dict(sorted(found.items()))

    def move_aside(self, name: str, folder: str) -> str:
        """Move the committed file `name` (relative) under `folder`/ keeping its path, to a name not
        taken; returns where it went. Nothing damaged is deleted: an operator may want it."""
        to, n = f"{folder}/{name}", 1
        while self.storage.exists(to):
            to, n = f"{folder}/{name}.{n}", n + 1
        self.storage.move_aside(name, to)
        return str(self.storage.location(to))

    def next_seq(self, shard: Shard) -> int:
        seqs = [int(m.group(2)) for p in self.part_files() + self.failure_files()
                if (m := PART_RE.match(basename(p))) and m.group(1) == shard.tag]
        return max(seqs, default=-1) + 1

    # -- markers --------------------------------------------------------------------------
    def _marker_name(self, shard: Shard) -> str:
        return f"{SHARDS_DIR}/{shard.tag}.done"

    def _read_json(self, name: str) -> dict | None:
        try:
            d = json.loads(self.storage.read_text(name))
        except (OSError, ValueError):  # absent (FileNotFoundError is an OSError) or unreadable: not done
            return None
        return d if isinstance(d, dict) else None

    def marker(self, shard: Shard) -> dict | None:
        return self._read_json(self._marker_name(shard))

    def success(self) -> dict | None:
        return self._read_json(SUCCESS_FILE)

    def write_markers(self, shard: Shard, marker: dict, lock) -> bool:
        """Mark the shard done for this manifest; write `_SUCCESS` once every shard's marker names
        the same manifest. True when `_SUCCESS` is there for it."""
        # A run killed while writing these left a temporary that a rerun with nothing to embed
        # (it never calls prepare_writes) would otherwise leave for good (tests/test_reliability.py).
        self._discard_small_temporaries(shard)
        # The marker vouches for these files: a rerun trusts it only while a listing agrees.
        marker = {**marker, "files": self.shard_files(shard)}
        if self.marker(shard) != marker:  # a rerun that changed nothing writes nothing
            lock.check()
            self.storage.makedirs(SHARDS_DIR)
            self.storage.write(self._marker_name(shard), json.dumps(marker, sort_keys=True).encode())
        whole = marker["whole_manifest"]
        # Not the markers' inputs: they are stat signatures of the model's files, which differ
        # between hosts that hold copies of one checkpoint (shards on several machines, Ray nodes),
        # and `_SUCCESS` was never written. That every part has one recipe, _run.json sees to.
        for i in range(shard.count):
            other = marker if i == shard.index else self.marker(Shard(i, shard.count))
            if other is None or other.get("whole_manifest") != whole:
                return False
        if (self.success() or {}).get("whole_manifest") != whole:
            lock.check()
            self.storage.write(SUCCESS_FILE, json.dumps({"whole_manifest": whole, "inputs": marker["inputs"], "num_shards": shard.count,
                                                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, sort_keys=True).encode())
        return True

    def clear_markers(self, shard: Shard, lock) -> None:
        """New work for this shard: the output is no longer complete until it is done."""
        lock.check()
        for name in (SUCCESS_FILE, self._marker_name(shard)):
            self.storage.delete(name)

    # -- taking ownership -----------------------------------------------------------------
    def lock(self, shard: Shard):
        """The shard's lock (a context manager; output.locks). Creates the directory if needed."""
        if isinstance(self.root, Path):
            for d in (self.root, self.root / SHARDS_DIR):
                if not d.exists():
                    try:
                        d.mkdir()
                    except FileNotFoundError:  # a missing parent: make it, and say so when it is not ours
                        d.mkdir(parents=True)
                    except OSError as e:
                        raise LockUnusable(f"cannot create {d}: {e.strerror} (is the output read-only?)") from e
                    self._created.append(d)
        return self.storage.lock(f"{SHARDS_DIR}/{shard.tag}.lock", stale_after_s=self.lock_stale_s)

    def clear_stale_lock(self, shard: Shard) -> None:
        """Remove the shard's lock if no live run holds it (a run with nothing to do, after one was
        killed between its markers and its release); never waits, never creates it."""
        self.storage.lock(f"{SHARDS_DIR}/{shard.tag}.lock", stale_after_s=self.lock_stale_s).clear_stale()

    def prepare_writes(self, shard: Shard) -> None:
        """Under the lock, before the first commit: the folders, and no leftovers of a killed run."""
        self.storage.makedirs(EMBEDDINGS_DIR, FAILURES_DIR, TMP_DIR)
        self.storage.discard_uncommitted([f"{EMBEDDINGS_DIR}/part-{shard.tag}-", f"{FAILURES_DIR}/part-{shard.tag}-"])
        self._discard_small_temporaries(shard)

    def _discard_small_temporaries(self, shard: Shard) -> None:
        names = [self._marker_name(shard)] + ([RUN_FILE, SUCCESS_FILE] if shard.count == 1 else [])
        for name in names:  # hidden siblings of small files whose write a kill interrupted
            folder, _, base = name.rpartition("/")
            for tmp in self.storage.glob(f"{folder + '/' if folder else ''}.{base}.*.tmp"):
                logger.info("removing %s left by an interrupted run", tmp)
                self.storage.delete(f"{folder + '/' if folder else ''}{basename(tmp)}")

    def forget_created(self) -> None:
        """The run wrote something: the directories it made are the output's now."""
        self._created.clear()

    def remove_created(self) -> None:
        """The run was refused or wrote nothing: remove the (empty) directories it made."""
        for d in reversed(self._created):
            try:
                d.rmdir()
            except OSError:
                pass
        self._created.clear()

    # -- committing -----------------------------------------------------------------------
    def commit_table(self, table: pa.Table, name: str, *, failures: bool, lock) -> Location:
        """Write `table` as `name` under embeddings/ (or failures/), complete or not at all."""
        lock.check()
        bytes_per_row = max(1, table.nbytes // max(1, table.num_rows))

        def fill(f) -> None:
            pq.write_table(table, f, row_group_size=max(1, ROW_GROUP_BYTES // bytes_per_row), compression="zstd")

        return self.storage.commit(f"{FAILURES_DIR if failures else EMBEDDINGS_DIR}/{name}", fill)

    def drop_failures(self, shard: Shard, lock, *, below_seq: int) -> int:
        """--retry-failed: this shard's failure records from before this run (part numbers below
        `below_seq`) go, so their rows are pending again."""
        n = 0
        for f in self.failure_files():
            m = PART_RE.match(basename(f))
            if m and m.group(1) == shard.tag and int(m.group(2)) < below_seq:
                lock.check()
                n += self.storage.num_rows(f)
                self.storage.delete(f"{FAILURES_DIR}/{basename(f)}")
        return n
