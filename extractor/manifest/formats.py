"""Manifest files as Arrow tables: Parquet, CSV and JSONL (each plain or gzipped), local or fsspec URLs.

The format is `--manifest-format`, else the file's extension:

    .parquet .pq                          parquet
    .csv .csv.gz                          csv
    .jsonl .jsonl.gz .ndjson .ndjson.gz   jsonl, or lhotse when the name says `cuts`
                                          (lhotse's own names: cuts.jsonl.gz, librispeech_cuts_dev-clean.jsonl.gz)
    anything else                         parquet, as before other formats were read (object keys often
                                          have no extension)

A gzipped file is recognised by its content, whatever its name.

How each format's values get their types, so that an id's type never flips between two nights:
  - Parquet: the file's own types (then made canonical, manifest.types).
  - CSV carries no types. Every column is read as strings, and only the segment columns
    (--start-column/--end-column) are parsed as numbers. Inferring types instead would read
    the id `007` as the integer 7 (another id), and would make the id column `int64` on a night
    whose ids all look numeric and `large_string` on the night one does not: parts with two
    schemas, the very drift canonical types exist to prevent. Convert a CSV to Parquet to keep
    typed columns.
  - JSONL: JSON's own types (numbers are int64 or float64, strings are strings). A column whose
    values change type between lines (1 on one line, "a" on another) is refused, never coerced.
    Strings stay strings even where they look like dates (pyarrow's JSON reader would make
    them timestamps, and an id `2024-01-01` a timestamp).
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import BinaryIO, Mapping

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ManifestError
from ..options import MANIFEST_FORMATS, ManifestSpec

_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_LHOTSE_NAME = re.compile(r"(^|[_.-])cuts([_.-]|$)")  # a word `cuts` in the name's stem
_GZIP_MAGIC = b"\x1f\x8b"
# Parquet read for embedded audio: pages are fetched in reads of this size instead of whole
# column chunks up front (pyarrow still holds one row group's column: see manifest.embedded).
PARQUET_BUFFER_BYTES = 1 << 20


def manifest_format(spec: ManifestSpec) -> str:
    """The format `spec` is read as: its `format`, else from the file's name."""
    if spec.format is not None:
        if spec.format not in MANIFEST_FORMATS:
            raise ManifestError(f"--manifest-format {spec.format!r}: expected one of {', '.join(MANIFEST_FORMATS)}")
        return spec.format
    name = PurePosixPath(spec.path.split("?", 1)[0]).name.lower()
    stem = name.removesuffix(".gz")
    for suffix, fmt in _SUFFIXES.items():
        if stem.endswith(suffix):
            if fmt == "jsonl" and _LHOTSE_NAME.search(stem.removesuffix(suffix)):
                return "lhotse"
            return fmt
    return "parquet"


@contextmanager
def open_binary(path: str, storage_options: Mapping | None = None) -> Iterator[BinaryIO]:
    """The file's bytes, local or fsspec URL, decompressed when they are gzip."""
    if "://" in path:
        import fsspec

        opened = fsspec.open(path, "rb", **dict(storage_options or {}))
    else:
        opened = open(path, "rb")
    with opened as f:
        head = f.read(2)
        f.seek(0)
        if head == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                yield g
        else:
            yield f


@contextmanager
def open_parquet(path: str, storage_options: Mapping | None = None, *, buffered: bool = False) -> Iterator[pq.ParquetFile]:
    """A ParquetFile over a local path or fsspec URL; `buffered` reads pages in small reads."""
    kw = {"buffer_size": PARQUET_BUFFER_BYTES, "pre_buffer": False} if buffered else {}
    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb", **dict(storage_options or {})) as f:
            with pq.ParquetFile(f, **kw) as pf:
                yield pf
    else:
        with pq.ParquetFile(path, **kw) as pf:
            yield pf


def read_csv(path: str, storage_options: Mapping | None = None) -> pa.Table:
    """Every column as strings (see the module's doc); empty fields are nulls."""
    with open_binary(path, storage_options) as f:
        try:
            df = pl.read_csv(f, infer_schema=False)
        except pl.exceptions.NoDataError:
            return pa.table({})
    return df.to_arrow()


def read_jsonl(path: str, storage_options: Mapping | None = None) -> pa.Table:
    """JSON's own types; strings that look like dates stay strings (see the module's doc)."""
    import pyarrow.json as pj

    def read(schema: pa.Schema | None) -> pa.Table:
        with open_binary(path, storage_options) as f:
            options = pj.ParseOptions(explicit_schema=schema) if schema is not None else None
            return pj.read_json(f, parse_options=options)

    with open_binary(path, storage_options) as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                break
        else:  # pyarrow refuses an empty document; it is a manifest without columns
            return pa.table({})
    table = read(None)
    plain = pa.schema([f.with_type(_no_timestamps(f.type)) for f in table.schema])
    return table if plain == table.schema else read(plain)


def _no_timestamps(t: pa.DataType) -> pa.DataType:
    """`t` with every timestamp (pyarrow's guess for a string that looks like one) as a string."""
    if pa.types.is_timestamp(t):
        return pa.string()
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_no_timestamps(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_list(t):
        return pa.list_(_no_timestamps(t.value_type))
    return t


READERS: dict[str, Callable[[str, Mapping | None], pa.Table]] = {"csv": read_csv, "jsonl": read_jsonl}
