"""Audio stored in the manifest (`--audio-column`), as Hugging Face audio datasets ship it.

The column is either a struct `{bytes: binary, path: string}` (the `datasets.Audio` feature) or
plain binary. A row whose struct has no bytes but a path is read from that path, as `datasets`
does. The bytes go to the decode workers inside the requests (FileJob.data); nothing is written
to a temporary file.

Memory: the manifest's other columns are read whole, the audio column never is. The producer
asks for the rows it is about to send, in manifest order, and they are read one row group at a
time (`EmbeddedAudio.blobs`), so the job holds one row group's audio plus the requests in flight.
pyarrow reads a row group's column chunk at once (about twice its size in memory, measured with
pyarrow 26, whatever the batch size), so the row group is the unit of memory: `datasets` writes
100 rows per row group for audio; a manifest with far larger ones is warned about.

Parquet only: CSV and JSON have no bytes type (base64 would inflate the audio by a third and be
decoded in the job's process), and neither can be read one slice at a time without parsing
everything before it, so neither keeps memory bounded the way Parquet's row groups do.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import ManifestError
from .formats import open_parquet

logger = logging.getLogger(__name__)

BATCH_ROWS = 16  # rows of the audio column turned into Python bytes at a time
ROW_GROUP_WARN_BYTES = 512 << 20  # a row group's audio above this is read into memory at once: say so
STRUCT, BINARY = "struct", "binary"


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


@dataclass(frozen=True)
class EmbeddedAudio:
    """Where a manifest's audio bytes are; picklable (--devices and Ray open it again)."""

    manifest: str  # the Parquet file: a path or fsspec URL
    column: str
    kind: str  # STRUCT or BINARY
    storage_options: dict | None = None

    @property
    def leaf(self) -> str:
        """The Parquet column of the bytes."""
        return f"{self.column}.bytes" if self.kind == STRUCT else self.column

    def blobs(self, rows: Sequence[int]) -> Iterator[bytes | None]:
        """The audio of manifest rows `rows` (ascending), one at a time; None where a row has no
        bytes (its struct's path is read instead). Reads one row group's audio at a time."""
        if any(b < a for a, b in zip(rows, rows[1:])):
            raise ValueError("EmbeddedAudio.blobs: rows must be in manifest order")
        with open_parquet(self.manifest, self.storage_options, buffered=True) as pf:
            starts = _row_group_starts(pf)
            i, n = 0, len(rows)
            while i < n:
                group = bisect.bisect_right(starts, rows[i]) - 1
                if group >= len(starts) - 1:
                    raise IndexError(f"{self.manifest} has {starts[-1]} rows, no row {rows[i]}")
                j = bisect.bisect_left(rows, starts[group + 1], i)
                yield from self._group(pf, group, starts[group], rows[i:j])
                i = j

    def _group(self, pf: pq.ParquetFile, group: int, first: int, wanted: Sequence[int]) -> Iterator[bytes | None]:
        k, offset = 0, first
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=[self.leaf], use_threads=False):
            values = _bytes_of(batch.column(0), self.kind)
            end = offset + batch.num_rows
            while k < len(wanted) and wanted[k] < end:
                yield values[wanted[k] - offset].as_py()
                k += 1
            offset = end
            if k == len(wanted):
                return


def _bytes_of(col: pa.Array, kind: str) -> pa.Array:
    """The bytes of an audio column's values, null where the row (or its struct) has none."""
    # The leaf is read as struct<bytes>; struct_field (not .field) makes a null struct's child null.
    return pc.struct_field(col, "bytes") if kind == STRUCT else col


def _row_group_starts(pf: pq.ParquetFile) -> list[int]:
    md = pf.metadata
    starts = [0]
    for g in range(md.num_row_groups):
        starts.append(starts[-1] + md.row_group(g).num_rows)
    return starts


def audio_kind(schema: pa.Schema, column: str, where: str) -> str:
    """STRUCT or BINARY for the audio column's type; ManifestError for anything else."""
    if column not in schema.names:
        raise ManifestError(f"manifest {where} lacks the --audio-column {column!r}; it has {schema.names}")
    t = schema.field(column).type
    if _is_binary(t):
        return BINARY
    if pa.types.is_struct(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        if "bytes" in names and _is_binary(t.field("bytes").type) and ("path" not in names or _is_string(t.field("path").type)):
            return STRUCT
    raise ManifestError(f"--audio-column {column!r} of {where} is {t}: expected binary audio, or a struct of "
                        "`bytes` (binary) and optionally `path` (string), as Hugging Face's Audio feature stores it")


def rows_without_bytes(pf: pq.ParquetFile, audio: EmbeddedAudio) -> list[int]:
    """Manifest rows whose audio bytes are null. From the column statistics where they say there
    are none (the common case: nothing is read); a row group whose statistics do not tell is
    read, its audio column only, one group at a time."""
    md = pf.metadata
    leaf = next((j for j in range(md.num_columns) if md.row_group(0).column(j).path_in_schema == audio.leaf), None) if md.num_row_groups else None
    starts = _row_group_starts(pf)
    missing: list[int] = []
    biggest = (0, 0)
    for g in range(md.num_row_groups):
        chunk = md.row_group(g).column(leaf)
        biggest = max(biggest, (chunk.total_uncompressed_size, g))
        stats = chunk.statistics
        if stats is not None and stats.has_null_count and stats.null_count == 0:
            continue
        offset = starts[g]
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=[audio.leaf], use_threads=False):
            values = _bytes_of(batch.column(0), audio.kind)
            missing += [offset + int(i) for i in pc.indices_nonzero(values.is_null()).to_pylist()]
            offset += batch.num_rows
    if biggest[0] > ROW_GROUP_WARN_BYTES:
        logger.warning("%s: row group %d holds %.0f MB of audio in %r, and a row group's audio is read into memory at once; "
                       "rewrite the manifest with smaller row groups (pyarrow.parquet.write_table(..., row_group_size=100)) "
                       "to bound the job's memory", audio.manifest, biggest[1], biggest[0] / 1e6, audio.column)
    return missing
