"""Read and validate the manifest before anything is written.

A bad manifest is refused whole (exit 2): a job that half-runs on a manifest with duplicate ids
or null paths produces an output nobody can trust. The same checks hold for every format
(manifest.formats, manifest.lhotse) and for audio stored in the manifest (manifest.embedded):
missing columns, null or empty paths (or rows with no audio), null and duplicate ids, segment
bounds that are not numbers.

Every column the job uses is cast to its canonical type here (manifest.types), once: the rows
the run sees, and every part it writes, have one schema whichever tool wrote the manifest.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ..options import Shard
from . import lhotse
from .embedded import STRUCT, EmbeddedAudio, audio_kind, rows_without_bytes
from .errors import ManifestError
from .formats import FORMATS, Format, file_name, format_of, open_parquet
from ..options import ManifestSpec
from .types import canonical_type, to_canonical

__all__ = ["ROW", "Manifest", "ManifestError", "canonical_type", "fingerprint", "read_manifest", "shard_of"]

logger = logging.getLogger(__name__)

ROW = "__row"  # manifest position, kept through filtering so outputs can be traced back
OUTPUT_COLUMNS = ("id", "embedding", "duration_s", "frames", "frame_rate_hz")  # what the writer adds to a part
# A Rust library's panic (polars' PanicException, from pyo3) is a BaseException: it escapes
# `except Exception`. A reader that panics on a file is refusing that file, like any error of its.
READER_ERRORS = (Exception, pl.exceptions.PanicException)


def _preview(values: list) -> str:
    return ", ".join(repr(v) for v in values[:5]) + (" …" if len(values) > 5 else "")


@dataclass(frozen=True)
class Manifest:
    rows: pl.DataFrame  # id, path, [start_s, end_s], kept columns, __row; every column of its canonical type
    arrow_types: dict[str, pa.DataType]  # output column → its canonical Arrow type (manifest.types)
    audio: EmbeddedAudio | None = None  # --audio-column: where the bytes are; `path` then names the row

    def shard_rows(self, shard: Shard) -> pl.DataFrame:
        """The rows of `shard` (by shard_of, a hash of the id); all of them for one shard."""
        return self.rows if shard.count == 1 else self.rows.filter(shard_of(self.rows["id"], shard.count) == shard.index)

    def to_arrow(self, column: str, values: pl.Series) -> pa.Array:
        """`values` as the column's canonical Arrow type."""
        arr = values.to_arrow()
        return to_canonical(arr, self.arrow_types[column]) if column in self.arrow_types else arr

    @property
    def id_type(self) -> pa.DataType:
        return self.arrow_types["id"]


def fingerprint(rows: pl.DataFrame) -> str:
    """SHA-256 of the rows' identities (id, path, segment), in order: what a marker was written for.

    A cache key, not a proof: polars' row hash may change with its version, which only costs one
    run that plans from the committed ids instead of trusting the marker.
    """
    cols = [c for c in ("id", "path", "start_s", "end_s") if c in rows.columns]
    h = hashlib.sha256(f"{len(rows)}|{','.join(cols)}|".encode())
    if len(rows):
        h.update(rows.select(cols).hash_rows(seed=0).to_numpy().tobytes())
    return h.hexdigest()


def read_manifest(spec: ManifestSpec, storage_options: dict | None = None) -> Manifest:
    """Validated manifest rows. Raises ManifestError."""
    fmt = format_of(spec)
    if "://" not in spec.path and not Path(spec.path).is_file():
        raise ManifestError(f"manifest {spec.path} does not exist or is not a file")
    if spec.audio_column and fmt.name != "parquet":
        raise ManifestError(f"--audio-column {spec.audio_column!r}: audio stored in the manifest is read from Parquet only, and "
                            f"{spec.path} is read as {fmt.title} (CSV and JSON have no bytes type and cannot be read "
                            "a row group at a time); store the audio in a Parquet manifest or give paths")
    if fmt.name == "lhotse":
        spec = _lhotse_columns(spec)
    _check_keep_columns(spec)
    if spec.audio_column:
        table, names, audio = _read_embedded(spec, fmt, storage_options)
    else:
        table, names, audio = _read_table(spec, fmt, storage_options), None, None
    return _rows(spec, fmt.name, table, names, audio)


def _lhotse_columns(spec: ManifestSpec) -> ManifestSpec:
    given = [flag for flag, v in (("--id-column", spec.id_column), ("--start-column", spec.start_column),
                                  ("--end-column", spec.end_column)) if v is not None]
    if spec.path_column != "path":
        given.append("--path-column")
    if given:
        raise ManifestError(f"{spec.path} is read as lhotse cuts, which give the id, path, start and end themselves: drop {', '.join(given)}")
    return replace(spec, **{f"{k}_column": v for k, v in lhotse.COLUMNS.items()})


def _check_keep_columns(spec: ManifestSpec) -> None:
    reserved = [c for c in spec.keep_columns if c in OUTPUT_COLUMNS]
    if reserved:
        raise ManifestError(f"--keep-columns {reserved} would overwrite output columns of the same name")
    # The rows frame's own columns: a kept column of the same name, or one kept twice, made the
    # select below raise polars' DuplicateError (exit 1 instead of 2; found by tests/test_fuzz.py).
    clashing = [c for c in spec.keep_columns if c in ("path", "start_s", "end_s", ROW)] + [c for c, n in Counter(spec.keep_columns).items() if n > 1]
    if clashing:
        raise ManifestError(f"--keep-columns {sorted(set(clashing))}: kept twice, or named like a column the job adds (path, start_s, end_s, {ROW})")
    if spec.audio_column and spec.audio_column in (*spec.keep_columns, spec.id_column, spec.start_column, spec.end_column):
        raise ManifestError(f"--audio-column {spec.audio_column!r} holds the audio; it cannot also be kept, be the id or a segment bound")


def _wanted(spec: ManifestSpec) -> list[str]:
    """The manifest's columns the run uses, in the order a missing one is reported."""
    cols = [] if spec.audio_column else [spec.path_column]
    cols += [spec.id_column] if spec.id_column else []
    cols += list(spec.keep_columns) + [c for c in (spec.start_column, spec.end_column) if c]
    return list(dict.fromkeys(cols))


def _check_columns(spec: ManifestSpec, fmt: str, names: list[str]) -> None:
    missing = [c for c in _wanted(spec) if c not in names]
    if not missing:
        return
    hint = ""
    if fmt == "jsonl" and {"recording", "start", "duration"} <= set(names):
        hint = " (it looks like lhotse cuts: give --manifest-format lhotse)"
    elif fmt == "lhotse":
        hint = f" (a lhotse row has {', '.join([*lhotse.COLUMNS, *lhotse.KEEPABLE])})"
    raise ManifestError(f"manifest {spec.path} lacks column(s) {missing}; it has {names}{hint}")


def _read_table(spec: ManifestSpec, fmt: Format, storage_options: dict | None) -> pa.Table:
    """The manifest's rows, by its format's reader; the columns the run uses checked."""
    try:
        table = fmt.read(spec.path, storage_options, _wanted(spec))
    except ManifestError:
        raise
    except READER_ERRORS as e:  # each reader raises several types for a file that is not its format
        raise _unreadable(spec, fmt, e) from e
    _check_columns(spec, fmt.name, table.column_names)
    return table


def _read_embedded(spec: ManifestSpec, fmt: Format, storage_options: dict | None) -> tuple[pa.Table, pa.Array | None, EmbeddedAudio]:
    """(the used columns, the audio struct's paths or None, where the audio is) of a Parquet
    manifest whose audio is in --audio-column; the audio itself is read later (EmbeddedAudio)."""
    try:
        with open_parquet(spec.path, storage_options) as pf:
            schema = pf.schema_arrow
            _check_columns(spec, fmt.name, schema.names)
            columns = _wanted(spec)
            names = None
            audio = EmbeddedAudio(spec.path, spec.audio_column, audio_kind(schema, spec.audio_column, spec.path), storage_options)
            struct = schema.field(spec.audio_column).type
            has_path = audio.kind == STRUCT and struct.get_field_index("path") >= 0
            if has_path:
                columns.append(f"{spec.audio_column}.path")
            table = pf.read(columns=columns, use_threads=True)
            if has_path:
                names = pc.struct_field(table.column(spec.audio_column), "path")
                table = table.drop_columns([spec.audio_column])
            no_bytes = rows_without_bytes(pf, audio)
            if no_bytes:
                _check_unreadable(spec, no_bytes, names)
    except ManifestError:
        raise
    except READER_ERRORS as e:
        raise _unreadable(spec, fmt, e) from e
    return table, names, audio


def _unreadable(spec: ManifestSpec, fmt: Format, e: BaseException) -> ManifestError:
    """One line naming the file, the format it was read as, and the reader's reason."""
    guessed = spec.format is None and not fmt.recognises(file_name(spec.path))
    others = [name for name in FORMATS if name != fmt.name]
    hint = (f" (read as {fmt.title} for want of a known extension: give --manifest-format "
            f"{', '.join(others[:-1])} or {others[-1]})") if guessed else ""
    return ManifestError(f"cannot read manifest {spec.path} as {fmt.title}: {_reason(e)}{hint}")


def _reason(e: BaseException) -> str:
    """The reader's own reason on one line, without polars' advice on schema inference (it infers
    none here), and a panic's first line only (the rest is the Rust and Python state it dumps)."""
    text = str(e).strip()
    if isinstance(e, pl.exceptions.PanicException):
        text = f"the reader panicked: {text.splitlines()[0] if text else type(e).__name__}"
    if "Original error:" in text:
        text = text.rsplit("Original error:", 1)[1].strip().strip("`").strip()
    return " ".join(text.split())


def _check_unreadable(spec: ManifestSpec, no_bytes: list[int], names: pa.Array | None) -> None:
    """Rows without bytes are read from their struct's path; without either they have no audio."""
    if names is None:
        bad = no_bytes
    else:
        paths = names.take(pa.array(no_bytes, type=pa.int64())).to_pylist()
        bad = [r for r, p in zip(no_bytes, paths) if not p]
    if bad:
        raise ManifestError(f"manifest {spec.path}: {len(bad)} row(s) with no audio in {spec.audio_column!r} "
                            f"(null bytes{'' if names is None else ' and no path'}), at rows {_preview(bad)}")


def _canonical(spec: ManifestSpec, table: pa.Table, column: str) -> pa.ChunkedArray:
    values = table.column(column)
    t = canonical_type(values.type)
    if pa.types.is_null(values.type) and column in spec.keep_columns and len(values):
        logger.warning("manifest %s: kept column %r has no value yet (type null); its parts take it as strings, "
                       "and a later manifest whose values are not strings gives them another type", spec.path, column)
    try:
        return to_canonical(values, t)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ManifestError(f"manifest {spec.path}: column {column!r} ({values.type}) does not convert to {t}, "
                            f"the type every part gives it, without loss: {e}") from e


def _seconds_from_text(spec: ManifestSpec, df: pl.DataFrame, column: str) -> pl.DataFrame:
    """A CSV's segment bound, parsed; ManifestError naming the rows that are not numbers."""
    parsed = df[column].str.strip_chars().cast(pl.Float64, strict=False)
    bad = df.select(pl.int_range(pl.len()).filter(parsed.is_null() & df[column].is_not_null())).to_series().to_list()
    if bad:
        values = df[column].gather(bad).to_list()
        raise ManifestError(f"manifest {spec.path}: {column!r} holds {_preview(values)} at rows {_preview(bad)}, expected seconds as numbers")
    return df.with_columns(parsed.alias(column))


def _rows(spec: ManifestSpec, fmt: str, table: pa.Table, names: pa.Array | None, audio: EmbeddedAudio | None) -> Manifest:
    used = _wanted(spec)
    df = pl.from_arrow(pa.table({c: _canonical(spec, table, c) for c in used}), rechunk=False) if used else pl.DataFrame()
    if not isinstance(df, pl.DataFrame):
        raise ManifestError(f"manifest {spec.path} is not a table")
    n = table.num_rows
    if fmt == "csv":
        for c in dict.fromkeys(c for c in (spec.start_column, spec.end_column) if c):
            df = _seconds_from_text(spec, df, c)

    if audio is None:
        path = pl.col(spec.path_column)
        if df.schema[spec.path_column] != pl.String:
            raise ManifestError(f"path column {spec.path_column!r} is {table.schema.field(spec.path_column).type}, expected strings")
        empty = df.select(pl.int_range(pl.len(), dtype=pl.UInt32).filter(path.is_null() | (path == ""))).to_series().to_list()
        if empty:
            raise ManifestError(f"manifest {spec.path}: {len(empty)} row(s) with a null or empty {spec.path_column!r}, at rows {_preview(empty)}")
        paths = df[spec.path_column]
        id_col = spec.id_column or spec.path_column
        ids = df[id_col]
    else:
        # What messages and failure records call a row: the struct's path, else manifest#row=N.
        own = pl.Series(names).cast(pl.String) if names is not None else pl.Series([None] * n, dtype=pl.String)
        own = own.replace("", None)
        paths = pl.select(pl.coalesce(pl.lit(own), pl.format("{}#row={}", pl.lit(spec.path), pl.int_range(n)))).to_series()
        id_col = spec.id_column
        if id_col is None:
            _check_struct_paths_as_ids(spec, audio, own)
            ids = own
        else:
            ids = df[id_col]

    # Not with_row_index: a manifest may have its own column named like ROW (found by tests/test_fuzz.py).
    out = pl.DataFrame({"id": ids, "path": paths}).with_columns(
        *([df[spec.start_column].cast(pl.Float64, strict=False).alias("start_s")] if spec.start_column else []),
        *([df[spec.end_column].cast(pl.Float64, strict=False).alias("end_s")] if spec.end_column else []),
        *[df[c] for c in spec.keep_columns],
        pl.int_range(n, dtype=pl.UInt32).alias(ROW),
    )
    if out["id"].null_count():
        raise ManifestError(f"manifest {spec.path}: {out['id'].null_count()} row(s) with a null id in {id_col!r}")
    dup = out.group_by("id").len().filter(pl.col("len") > 1)
    if len(dup):
        raise ManifestError(
            f"manifest {spec.path}: {len(dup)} duplicate id(s) in {id_col!r}, e.g. {_preview(dup['id'].to_list())}"
            + ("" if spec.id_column else " (no --id-column: the path is the id; give an id column to embed a file twice)")
        )
    for c in (spec.start_column, spec.end_column):
        if c and not df.schema[c].is_numeric():
            raise ManifestError(f"manifest {spec.path}: {c!r} is {table.schema.field(c).type}, expected seconds as numbers")
    types = {"id": pa.large_string() if id_col is None else canonical_type(table.schema.field(id_col).type), "path": pa.large_string()}
    types.update({c: canonical_type(table.schema.field(c).type) for c in spec.keep_columns})
    return Manifest(out, types, audio)


def _check_struct_paths_as_ids(spec: ManifestSpec, audio: EmbeddedAudio, paths: pl.Series) -> None:
    """Without --id-column the struct's paths are the ids: every row needs one, each unique."""
    if audio.kind != STRUCT or len(paths) and paths.null_count() == len(paths):
        what = "holds bytes only" if audio.kind != STRUCT else "has no paths"
        raise ManifestError(f"--audio-column {spec.audio_column!r} {what}: give --id-column, a column of unique row ids")
    if paths.null_count():
        rows = paths.is_null().arg_true().to_list()
        raise ManifestError(f"--audio-column {spec.audio_column!r} has no path at {len(rows)} row(s) (rows {_preview(rows)}), "
                            "so its paths cannot be the ids: give --id-column")
    dup = paths.filter(paths.is_duplicated()).unique(maintain_order=True).to_list()
    if dup:
        raise ManifestError(f"--audio-column {spec.audio_column!r}: its paths repeat ({_preview(dup)}), so they cannot be the ids: "
                            "give --id-column")


def shard_of(ids: pl.Series, num_shards: int) -> pl.Series:
    """Stable shard index of each id: the first 8 bytes of SHA-256 of its string form.

    Stable across runs, machines and Python versions (unlike hash()); polars' own hash is not
    guaranteed stable across versions, so it is not used.
    """
    def h(v) -> int:
        return int.from_bytes(hashlib.sha256(str(v).encode()).digest()[:8], "big") % num_shards

    return pl.Series([h(v) for v in ids.to_list()], dtype=pl.UInt32)
