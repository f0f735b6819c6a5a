"""The output: what lives where, what is done, and the checks that refuse an output before a write.

    OUTPUT/
      embeddings/part-SSSSS-NNNNNN.parquet   one row per embedded manifest row: point readers here
      _failures/part-SSSSS-NNNNNN.parquet    id, path, error, error_kind: one row per row that could not be embedded
      _run.json                              the recipe, the shard layout and the parts' columns, written once
      _SUCCESS                               written last: every shard done for one manifest (JSON)
      _shards/SSSSS.done                     shard SSSSS done for a manifest (JSON), SSSSS.lock while it runs
      _tmp/                                  parts being written (a directory only)

`embeddings/` holds nothing but parts, so every reader reads it as the embeddings with its usual
call (polars and duckdb list it recursively and refuse mixed files; HF datasets reads every file
it finds). Everything else starts with `_`, which pyarrow and pandas skip: read at the top, the
output gives them the embeddings alone, and the other readers a clear error, never failure
records posing as rows with a null embedding. A shard that completes without failures commits an
empty failure part (ensure_failures_readable), so `_failures/` reads as zero rows.

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
from typing import TYPE_CHECKING, Mapping

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ..manifest.types import canonical_type, to_canonical
from ..options import Shard
from ..recipe import METADATA_KEY, Recipe
from .locks import LOCK_STALE_S, LockUnusable
from .storage import TMP_DIR, Location, OutputError, basename, is_url, open_storage

if TYPE_CHECKING:
    from ..ledger import Failure

logger = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
FAILURES_DIR = "_failures"  # `_`: pyarrow and pandas reading the output's top folder skip it
RUN_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS"
SHARDS_DIR = "_shards"
# 1 (0.1.x): parts at the top, failures in _failures/, no shard layout in _run.json.
# 2 (0.2.x): embeddings/ and failures/ side by side: readers of the top folder took failures for rows.
# 3: embeddings/ and _failures/, and _run.json says whether parts carry `path`. tools/migrate.py moves 1 and 2.
LAYOUT_VERSION = 3
V2_FAILURES_DIR = "failures"
ROW_GROUP_BYTES = 32 << 20  # readers fetch row groups: tens of MB, not one 5 GB group
PART_RE = re.compile(r"^part-(\d{5})-(\d{6})\.parquet$")
MIGRATE = "python -m extractor.tools.migrate"
SOURCES_KEY = b"qwen2_audio_embeddings.sources"  # Parquet metadata: the model and adapter, readable
PATH_EXAMPLES = 5  # ids named in a changed-path warning

__all__ = ["EMBEDDINGS_DIR", "FAILURES_DIR", "LAYOUT_VERSION", "OutputDir", "OutputError", "PathChanges", "RecipeMismatch",
           "RunInfo", "SUCCESS_FILE", "failure_table"]


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


def failure_table(types: dict[str, pa.DataType], ids: pl.Series, paths: pl.Series, failures: list[Failure],
                  metadata: dict[bytes, bytes]) -> pa.Table:
    """Failure records, one per Failure, of the rows of `ids` and `paths`, cast to the output's
    column `types`: `error` is "Kind: message", `error_kind` the kind alone. The one definition of
    the failure schema, so an empty failure part has exactly the schema of a full one."""
    return pa.table({
        "id": to_canonical(ids.to_arrow(), types["id"]),
        "path": to_canonical(paths.to_arrow(), types["path"]),
        "error": pa.array([str(f) for f in failures], type=pa.large_string()),
        "error_kind": pa.array([f.kind for f in failures], type=pa.large_string()),
    }).replace_schema_metadata(metadata)


@dataclass(frozen=True)
class RunInfo:
    """What `_run.json` holds: the recipe every part was computed with, the shard layout, and
    whether embedding parts carry the manifest's `path` (every part of one output has one schema:
    outputs moved from version 2 keep writing parts without it)."""

    recipe: Recipe
    num_shards: int
    sources: dict  # readable: which model and adapter (repo id and commit, or path); not compared
    path_column: bool = True  # the output's, not the run's: a run writes what _run.json says
    id_type: str | None = None  # the ids' canonical Arrow type (manifest.types); None in outputs made before it was kept

    def to_bytes(self) -> bytes:
        payload = {"layout_version": LAYOUT_VERSION, "num_shards": self.num_shards, "recipe": json.loads(self.recipe.to_json()),
                   "sources": self.sources, "path_column": self.path_column, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self.id_type is not None:
            payload["id_type"] = self.id_type
        return json.dumps(payload, indent=2, sort_keys=True).encode()

    def differences(self, other: RunInfo) -> list[str]:
        """'field: old → new' for each difference from `other` (what the output holds)."""
        return self.recipe.differences(other.recipe) + layout_differences(other.num_shards, self.num_shards)

    def metadata(self) -> dict[bytes, bytes]:
        """The Parquet key-value metadata of a part of this output: the recipe and the sources."""
        return {METADATA_KEY: self.recipe.to_json().encode(), SOURCES_KEY: json.dumps(self.sources).encode()}


@dataclass(frozen=True)
class PathChanges:
    """Committed ids whose recorded path is not the manifest's: a file replaced or moved under
    the same id keeps its old embedding (or failure record) until the row is redone."""

    count: int
    examples: tuple[tuple[object, str, str], ...] = ()  # (id, committed path, manifest path), the first few by id


def changed_paths(committed: pl.DataFrame, rows: pl.DataFrame, *, examples: int = PATH_EXAMPLES) -> PathChanges:
    """The ids of `committed` (id, path as recorded) whose path differs from the one `rows` (the
    manifest's id and path) gives them; ids absent from `rows` are not compared."""
    committed = committed.select(pl.col("id").cast(rows.schema["id"]), pl.col("path").cast(pl.String).alias("committed_path"))
    changed = (rows.select("id", "path").join(committed, on="id", how="inner")
               .filter(pl.col("path") != pl.col("committed_path")).unique("id").sort("id"))
    shown = tuple((r["id"], r["committed_path"], r["path"]) for r in changed.head(examples).iter_rows(named=True))
    return PathChanges(changed.height, shown)


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
        """Refuse an output that is not ours, is in an older layout or has things in the readers'
        way; return what `_run.json` holds (None for a new output). Reads only."""
        st = self.storage
        for name in (EMBEDDINGS_DIR, FAILURES_DIR, SHARDS_DIR, TMP_DIR):
            if st.is_file(name):
                raise OutputError(f"{st.location(name)} is a file where the output keeps a directory: move it away")
        if self._parts_at_top():
            raise OutputError(self.layout_refusal(1))
        info = self.read_run()  # refuses another layout, naming the migration
        strays = [basename(p) for p in st.glob("*.parquet")] + [f"{V2_FAILURES_DIR}/{basename(p)}" for p in st.glob(f"{V2_FAILURES_DIR}/*.parquet")]
        if strays:
            raise OutputError(f"{st.location(strays[0])} is not a file of this job: readers of {self.root} would take it for "
                              "embeddings; move it out of the output directory")
        for folder in (EMBEDDINGS_DIR, FAILURES_DIR):
            foreign = [p for p in st.glob(f"{folder}/*") if not PART_RE.match(basename(p))]
            if foreign:
                raise OutputError(f"{foreign[0]} is not a part of this job: readers of {folder}/ would read it; move it away")
        if info is None and (self.part_files() or self.failure_files()):
            raise OutputError(f"{self.root} holds parts but no {RUN_FILE}: not an output of this job, refusing to mix")
        return info

    def layout_version(self) -> int | None:
        """The layout the output is in (LAYOUT_VERSION's comment), from `_run.json`; 1 also when
        parts lie at the top. None without `_run.json` (a new output, or not ours). Reads only.

        Not from the folders: version 1 had `_failures/` too, and a migration interrupted halfway
        has both kinds; `_run.json` is rewritten last, so it says what the output still is."""
        if self._parts_at_top():
            return 1
        d = self._read_run_json()
        return None if d is None else self._version_of(d)

    def _parts_at_top(self) -> bool:
        return any(PART_RE.match(basename(p)) for p in self.storage.glob("part-*.parquet"))

    def _version_of(self, run: dict) -> int:
        if "num_shards" not in run:
            return 1
        version = run.get("layout_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 2:
            raise OutputError(f"{self.storage.location(RUN_FILE)}: layout_version is {version!r}, not a layout of this job; "
                              "move it away if the output is not ours")
        return version

    def layout_refusal(self, version: int) -> str:
        """Why an output in another layout than LAYOUT_VERSION is refused, and what to do."""
        if version > LAYOUT_VERSION:
            return (f"{self.root} is in layout {version}, written by a newer version of this job (this one writes layout "
                    f"{LAYOUT_VERSION}): run that version, or write to another output")
        was = {1: f"version 0.1's (parts and {FAILURES_DIR}/ at the top)",
               2: f"version 0.2's ({V2_FAILURES_DIR}/ beside {EMBEDDINGS_DIR}/, which readers of the top folder took for embeddings)"}[version]
        return (f"{self.root} is in {was} layout: parts now live under {EMBEDDINGS_DIR}/ and failure records under "
                f"{FAILURES_DIR}/. Move it with: {MIGRATE} {self.root}")

    def _read_run_json(self) -> dict | None:
        if not self.storage.exists(RUN_FILE):
            return None
        try:
            d = json.loads(self.storage.read_text(RUN_FILE))
            if not isinstance(d, dict) or not isinstance(d.get("recipe"), dict):
                raise ValueError("no recipe object in it")
            return d
        except (OSError, ValueError) as e:
            raise OutputError(f"{self.storage.location(RUN_FILE)} is not a recipe this job can read ({e}); "
                              "move it away if the output is not ours") from e

    def read_run(self) -> RunInfo | None:
        """What `_run.json` holds, for an output of today's layout (OutputError naming the
        migration for an older one); None if there is none."""
        d = self._read_run_json()
        if d is None:
            return None
        version = self._version_of(d)
        if version != LAYOUT_VERSION:
            raise OutputError(self.layout_refusal(version))
        where = self.storage.location(RUN_FILE)
        try:
            num_shards, path_column = d["num_shards"], d["path_column"]
            if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
                raise ValueError(f"num_shards is {num_shards!r}")
            if not isinstance(path_column, bool):
                raise ValueError(f"path_column is {path_column!r}")
            id_type = d.get("id_type")
            return RunInfo(Recipe.from_dict(d["recipe"]), num_shards, d.get("sources") or {}, path_column,
                           id_type if isinstance(id_type, str) else None)
        except (ValueError, KeyError, TypeError) as e:
            raise OutputError(f"{where} is not a recipe this job can read ({e!r}); move it away if the output is not ours") from e

    def create_run(self, info: RunInfo) -> RunInfo:
        """Write `_run.json` if absent (atomically: of two runs exactly one creates it), else
        compare with it; RecipeMismatch names what differs. The first write of a run. Returns
        what the output holds: its `path_column` is what the run's parts must follow."""
        if self.storage.create(RUN_FILE, info.to_bytes()):
            return info
        existing = self.read_run()
        self.check_run(info, existing)
        return existing

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

    def changed_paths(self, info: RunInfo | None, rows: pl.DataFrame, id_type: pa.DataType, *,
                      examples: int = PATH_EXAMPLES) -> PathChanges:
        """The committed ids (parts and failure records) whose recorded path differs from the
        path `rows` (the manifest's `id` and `path`) gives them. Reads only the id and path
        columns: the failure files always, the parts when the output's parts carry `path`
        (`info.path_column`). Ids absent from `rows` are not compared.

        For audio stored in the manifest the path is the struct's own, else `manifest#row=N`:
        a manifest whose rows were reordered reports those rows as changed."""
        if info is None:
            return PathChanges(0)
        files = self.failure_files() + (self.part_files() if info.path_column else [])
        tables = self.storage.read_tables(files, columns=["id", "path"])
        if not tables:
            return PathChanges(0)
        schema = pa.schema([("id", id_type), ("path", pa.large_string())])
        try:
            committed = pa.concat_tables([t.select(["id", "path"]).cast(schema) for t in tables])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise OutputError(f"{self.root}: committed ids do not convert to the manifest's id type {id_type}: {e}") from e
        return changed_paths(pl.from_arrow(committed), rows, examples=examples)

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
        """Write `table` as `name` under embeddings/ (or _failures/), complete or not at all."""
        lock.check()
        bytes_per_row = max(1, table.nbytes // max(1, table.num_rows))

        def fill(f) -> None:
            if not table.num_rows:
                # No row group at all: HF datasets sizes its batches by the first row group's
                # rows and fails on a group of 0 ("BatchSize must be greater than 0"), even when
                # other files of the folder hold rows; a file without one it skips.
                pq.ParquetWriter(f, table.schema, compression="zstd").close()
                return
            pq.write_table(table, f, row_group_size=max(1, ROW_GROUP_BYTES // bytes_per_row), compression="zstd")

        return self.storage.commit(f"{FAILURES_DIR if failures else EMBEDDINGS_DIR}/{name}", fill)

    def ensure_failures_readable(self, shard: Shard, lock, types: dict[str, pa.DataType]) -> int | None:
        """Commit an empty failure part for the shard if it has no failure file, so that
        `_failures/` reads as zero rows rather than an error (polars, duckdb and datasets refuse an
        empty folder). The part number it committed, or None.

        Call it under the shard's lock, once the shard is complete (every writer closed), before
        its markers; on every such path, with rows embedded or nothing pending. The part is an
        ordinary committed part (next sequence number, the failure schema of the output's column `types`,
        the recipe and sources of `_run.json` as metadata, no row group), so a resume, a
        --retry-failed or a marker check treats it as any other. Without `_run.json` (a shard whose
        run never had a row to embed) there is no recipe to record, and nothing is written.
        """
        mine = [f for f in self.failure_files() if (m := PART_RE.match(basename(f))) and m.group(1) == shard.tag]
        if mine:
            return None
        info = self.read_run()
        if info is None:
            return None
        nothing = pl.Series([], dtype=pl.String)
        empty = failure_table(types, nothing, nothing, [], info.metadata())
        self.storage.makedirs(FAILURES_DIR, TMP_DIR)  # a run with nothing pending never made them
        seq = self.next_seq(shard)
        self.commit_table(empty, part_name(shard, seq), failures=True, lock=lock)
        return seq

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
