"""Manifest files as Arrow tables: one reader per format, registered in FORMATS under its name with
the file names that it is recognised by. A new format is one reader and one line in FORMATS.

A reader is `read(path, storage_options, columns) -> pa.Table`: the file's rows, as a table that
holds at least `columns` (the ones the run uses) when the file has them all. Errors are the
reader's own; manifest.read names the file and refuses it (exit 2).

The format is `--manifest-format`, else the first format in FORMATS that recognises the file's
name (its extension, before any `.gz`), else Parquet (object keys often have no extension):

    .parquet .pq                          parquet
    .csv .csv.gz                          csv
    .jsonl .jsonl.gz .ndjson .ndjson.gz   lhotse when the name holds the word `cuts` (lhotse's own
                                          names: cuts.jsonl.gz, librispeech_cuts_dev-clean.jsonl.gz), else jsonl

A gzipped file is recognised by its content, whatever its name. Files are local paths, http(s)
URLs (read with the standard library, as audio URLs are: ranged GETs, so a Parquet manifest is read
a column at a time) or other fsspec URLs (s3://, gs://, ... with their filesystem installed).

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

polars and pyarrow are imported by the readers, not here: `extract-embeddings --help` lists the
formats' names without loading either.
"""

from __future__ import annotations

import gzip
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from .errors import ManifestError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..options import ManifestSpec

_GZIP_MAGIC = b"\x1f\x8b"
# Parquet read for embedded audio: pages are fetched in reads of this size instead of whole
# column chunks up front (pyarrow still holds one row group's column: see manifest.embedded).
PARQUET_BUFFER_BYTES = 1 << 20


# --- where a manifest's bytes come from -----------------------------------------------------


def is_http(path: str) -> bool:
    return path.startswith(("http://", "https://"))


@contextmanager
def open_file(path: str, storage_options: Mapping | None = None) -> Iterator[BinaryIO]:
    """The file's raw bytes: a local path, an http(s) URL or an fsspec URL."""
    if is_http(path):
        with _open_http(path) as f:
            yield f
    elif "://" in path:
        import fsspec

        with fsspec.open(path, "rb", **dict(storage_options or {})) as f:
            yield f
    else:
        with open(path, "rb") as f:
            yield f


@contextmanager
def _open_http(url: str) -> Iterator[BinaryIO]:
    """An http(s) manifest through the standard library's reader that audio URLs use (ranged GETs,
    read timeouts, errors that say what happened): fsspec's http filesystem needs aiohttp, which
    the base install does not bring. Seekable when the server serves byte ranges, or when the file
    is small enough to be held in memory (extractor.audio.sources)."""
    from ..audio.errors import AudioError
    from ..audio.sources import open_source
    from ..options import DEFAULT_READ_TIMEOUT_S

    try:
        source = open_source(url, max_duration_s=math.inf, read_timeout_s=DEFAULT_READ_TIMEOUT_S)
    except AudioError as e:
        raise ManifestError(_manifest_read_error(url, e)) from e
    try:
        yield source.fileobj()
    finally:
        # A read that failed mid-way (a reset connection, a stall) looks like the end of the file
        # to the reader, which would take a cut manifest for a whole one: the stream kept the error.
        error = source.stream.error
        source.close()
        if error is not None:
            raise ManifestError(_manifest_read_error(url, error)) from error


def _manifest_read_error(url: str, e: BaseException) -> str:
    what = str(e).removeprefix(f"cannot read {url}: ").removeprefix(f"cannot decode {url}: ")
    return f"cannot read manifest {url}: {what}"


@contextmanager
def open_binary(path: str, storage_options: Mapping | None = None) -> Iterator[BinaryIO]:
    """The file's bytes, decompressed when they are gzip (whatever the name says)."""
    with open_file(path, storage_options) as f:
        if hasattr(f, "peek"):  # a forward-only http stream cannot seek back
            head = f.peek(2)[:2]
        else:
            head = f.read(2)
            f.seek(0)
        if head == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                yield g
        else:
            yield f


@contextmanager
def open_parquet(path: str, storage_options: Mapping | None = None, *, buffered: bool = False) -> Iterator[pq.ParquetFile]:
    """A ParquetFile over a local path or URL; `buffered` reads pages in small reads."""
    import pyarrow.parquet as pq

    kw = {"buffer_size": PARQUET_BUFFER_BYTES, "pre_buffer": False} if buffered else {}
    if "://" not in path:
        with pq.ParquetFile(path, **kw) as pf:
            yield pf
        return
    with open_file(path, storage_options) as f:
        if not f.seekable():
            raise ManifestError(f"cannot read manifest {path} as Parquet: the server serves no byte ranges, and Parquet is "
                                "read from its end (its footer) and by columns; serve it from a server that honours Range "
                                "requests, or as CSV or JSONL, which are read from the start")
        with pq.ParquetFile(f, **kw) as pf:
            yield pf


# --- the readers ----------------------------------------------------------------------------


def read_parquet(path: str, storage_options: Mapping | None, columns: Sequence[str]) -> pa.Table:
    """Only the columns the run uses: a manifest may also hold audio or other large columns. A
    file that lacks some gives no rows and every column name it has, for the refusal to list."""
    with open_parquet(path, storage_options) as pf:
        schema = pf.schema_arrow
        if not set(columns) <= set(schema.names):
            return schema.empty_table()
        return pf.read(columns=list(columns), use_threads=True)


def read_csv(path: str, storage_options: Mapping | None, columns: Sequence[str]) -> pa.Table:
    """Every column as strings (see the module's doc); empty fields are nulls."""
    import polars as pl
    import pyarrow as pa

    # The bytes are read here, not by polars from the file object: polars reads a file object
    # whole anyway, and an error while reading it (a truncated gzip) would reach polars as a
    # Rust panic with a backtrace instead of a Python error naming the problem.
    with open_binary(path, storage_options) as f:
        data = f.read()
    try:
        df = pl.read_csv(data, infer_schema=False)
    except pl.exceptions.NoDataError:
        return pa.table({})
    return df.to_arrow()


def read_jsonl(path: str, storage_options: Mapping | None, columns: Sequence[str]) -> pa.Table:
    """JSON's own types; strings that look like dates stay strings (see the module's doc)."""
    import pyarrow as pa
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
    import pyarrow as pa

    if pa.types.is_timestamp(t):
        return pa.string()
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_no_timestamps(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_list(t):
        return pa.list_(_no_timestamps(t.value_type))
    return t


def read_lhotse(path: str, storage_options: Mapping | None, columns: Sequence[str]) -> pa.Table:
    """lhotse cuts as rows (manifest.lhotse, which reads files through this module)."""
    from .lhotse import read_cuts

    return read_cuts(path, storage_options)


# --- the registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    name: str  # --manifest-format
    title: str  # what messages call it
    read: Callable[[str, Mapping | None, Sequence[str]], pa.Table]
    suffixes: tuple[str, ...]  # the name's extension, before any .gz
    word: re.Pattern | None = None  # a word the rest of the name must hold as well

    def recognises(self, name: str) -> bool:
        """Whether a file of this name (lower case, no folder) is of this format."""
        stem = name.removesuffix(".gz")
        suffix = next((s for s in self.suffixes if stem.endswith(s)), None)
        return suffix is not None and (self.word is None or bool(self.word.search(stem.removesuffix(suffix))))


_CUTS = re.compile(r"(^|[_.-])cuts([_.-]|$)")  # a word `cuts` in the name's stem

# In the order names are tried: lhotse before jsonl, whose names it refines.
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("parquet", "Parquet", read_parquet, (".parquet", ".pq")),
    Format("csv", "CSV", read_csv, (".csv",)),
    Format("lhotse", "lhotse cuts (JSONL)", read_lhotse, (".jsonl", ".ndjson"), _CUTS),
    Format("jsonl", "JSONL", read_jsonl, (".jsonl", ".ndjson")),
)}
UNRECOGNISED = "parquet"  # the format of a name no format recognises


def file_name(path: str) -> str:
    """The name a format is recognised by: lower case, without folder or URL query."""
    return PurePosixPath(path.split("?", 1)[0]).name.lower()


def format_of(spec: ManifestSpec) -> Format:
    """The format `spec` is read as: its `format`, else the first that recognises the file's name."""
    if spec.format is not None:
        return FORMATS[spec.format]  # ManifestSpec checked the name
    name = file_name(spec.path)
    return next((f for f in FORMATS.values() if f.recognises(name)), FORMATS[UNRECOGNISED])


def manifest_format(spec: ManifestSpec) -> str:
    """The name of the format `spec` is read as."""
    return format_of(spec).name
