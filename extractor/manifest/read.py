"""Read and validate the manifest before anything is written.

A bad manifest is refused whole (exit 2): a job that half-runs on a manifest with duplicate ids
or null paths produces an output nobody can trust.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError
from ..options import Shard
from .spec import ManifestSpec

ROW = "__row"  # manifest position, kept through filtering so outputs can be traced back


class ManifestError(ConfigError):
    """The manifest cannot be used (exit 2)."""


def canonical_type(t: pa.DataType) -> pa.DataType:
    """One Arrow type per logical type, in every part: manifests rewritten by another tool
    (pyarrow's string and int32, polars' large_string and int64) never give two schemas."""
    if pa.types.is_dictionary(t):
        return canonical_type(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.large_string()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.large_binary()
    if pa.types.is_integer(t):
        return pa.uint64() if t == pa.uint64() else pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    return t


def _preview(values: list) -> str:
    return ", ".join(repr(v) for v in values[:5]) + (" …" if len(values) > 5 else "")


@dataclass(frozen=True)
class Manifest:
    rows: pl.DataFrame  # id, path, [start_s, end_s], kept columns, __row
    arrow_types: dict[str, pa.DataType]  # output column → the manifest's own Arrow type

    def shard_rows(self, shard: Shard) -> pl.DataFrame:
        """The rows of `shard` (by shard_of, a hash of the id); all of them for one shard."""
        return self.rows if shard.count == 1 else self.rows.filter(shard_of(self.rows["id"], shard.count) == shard.index)

    def to_arrow(self, column: str, values: pl.Series) -> pa.Array:
        """`values` as the column's canonical Arrow type."""
        arr = values.to_arrow()
        return arr.cast(self.arrow_types[column]) if column in self.arrow_types else arr

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
    if "://" not in spec.path and not Path(spec.path).is_file():
        raise ManifestError(f"manifest {spec.path} does not exist or is not a file")
    try:
        if "://" in spec.path:
            import fsspec

            with fsspec.open(spec.path, "rb", **(storage_options or {})) as f:
                table = pq.read_table(f)
        else:
            table = pq.read_table(spec.path)
        df = pl.from_arrow(table)
    except Exception as e:  # a non-Parquet file raises several types
        raise ManifestError(f"cannot read manifest {spec.path} as Parquet: {e}") from e
    if not isinstance(df, pl.DataFrame):
        raise ManifestError(f"manifest {spec.path} is not a table")

    wanted = [spec.path_column, *( [spec.id_column] if spec.id_column else []), *spec.keep_columns]
    wanted += [c for c in (spec.start_column, spec.end_column) if c]
    missing = [c for c in dict.fromkeys(wanted) if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest {spec.path} lacks column(s) {missing}; it has {df.columns}")
    reserved = [c for c in spec.keep_columns if c in ("id", "embedding", "duration_s", "frames", "frame_rate_hz")]
    if reserved:
        raise ManifestError(f"--keep-columns {reserved} would overwrite output columns of the same name")
    # The rows frame's own columns: a kept column of the same name, or one kept twice, made the
    # select below raise polars' DuplicateError (exit 1 instead of 2; found by tests/test_fuzz.py).
    clashing = [c for c in spec.keep_columns if c in ("path", "start_s", "end_s", ROW)] + [c for c, n in Counter(spec.keep_columns).items() if n > 1]
    if clashing:
        raise ManifestError(f"--keep-columns {sorted(set(clashing))}: kept twice, or named like a column the job adds (path, start_s, end_s, {ROW})")
    if df.schema[spec.path_column] != pl.String:
        raise ManifestError(f"path column {spec.path_column!r} is {df.schema[spec.path_column]}, expected strings")

    nulls = df.filter(pl.col(spec.path_column).is_null() | (pl.col(spec.path_column) == ""))
    if len(nulls):
        rows = df.select(pl.int_range(pl.len(), dtype=pl.UInt32).filter(pl.col(spec.path_column).is_null() | (pl.col(spec.path_column) == "")))
        rows = rows.to_series().to_list()
        raise ManifestError(f"manifest {spec.path}: {len(nulls)} row(s) with a null or empty {spec.path_column!r}, at rows {_preview(rows)}")

    id_col = spec.id_column or spec.path_column
    # Not with_row_index: a manifest may have its own column named like ROW (found by tests/test_fuzz.py).
    out = df.select(
        pl.col(id_col).alias("id"),
        pl.col(spec.path_column).alias("path"),
        *([pl.col(spec.start_column).cast(pl.Float64, strict=False).alias("start_s")] if spec.start_column else []),
        *([pl.col(spec.end_column).cast(pl.Float64, strict=False).alias("end_s")] if spec.end_column else []),
        *[pl.col(c) for c in spec.keep_columns],
        pl.int_range(pl.len(), dtype=pl.UInt32).alias(ROW),
    )
    if out["id"].dtype.is_integer() and out["id"].dtype != pl.UInt64:
        out = out.with_columns(pl.col("id").cast(pl.Int64))  # the canonical type of every part's ids
    if out["id"].null_count():
        raise ManifestError(f"manifest {spec.path}: {out['id'].null_count()} row(s) with a null id in {id_col!r}")
    dup = out.group_by("id").len().filter(pl.col("len") > 1)
    if len(dup):
        raise ManifestError(
            f"manifest {spec.path}: {len(dup)} duplicate id(s) in {id_col!r}, e.g. {_preview(dup['id'].to_list())}"
            + ("" if spec.id_column else " (no --id-column: the path is the id; give an id column to embed a file twice)")
        )
    for c, src in (("start_s", spec.start_column), ("end_s", spec.end_column)):
        if src and not df.schema[src].is_numeric():
            raise ManifestError(f"manifest {spec.path}: {src!r} is {df.schema[src]}, expected seconds as numbers")
    schema = table.schema
    types = {"id": canonical_type(schema.field(id_col).type), "path": pa.large_string()}
    types.update({c: canonical_type(schema.field(c).type) for c in spec.keep_columns})
    return Manifest(out, types)


def shard_of(ids: pl.Series, num_shards: int) -> pl.Series:
    """Stable shard index of each id: the first 8 bytes of SHA-256 of its string form.

    Stable across runs, machines and Python versions (unlike hash()); polars' own hash is not
    guaranteed stable across versions, so it is not used.
    """
    def h(v) -> int:
        return int.from_bytes(hashlib.sha256(str(v).encode()).digest()[:8], "big") % num_shards

    return pl.Series([h(v) for v in ids.to_list()], dtype=pl.UInt32)
