"""What the command line says about the manifest: where it is, its format, and which columns mean what."""

from __future__ import annotations

from dataclasses import dataclass

MANIFEST_FORMATS = ("parquet", "csv", "jsonl", "lhotse")  # --manifest-format; None: by extension (manifest.formats)


@dataclass(frozen=True)
class ManifestSpec:
    path: str
    path_column: str = "path"
    id_column: str | None = None  # None: the path is the id (embedded audio: the struct's path)
    keep_columns: tuple[str, ...] = ()
    start_column: str | None = None
    end_column: str | None = None
    format: str | None = None  # one of MANIFEST_FORMATS; None: from the file's extension
    audio_column: str | None = None  # audio stored in the manifest (Parquet only); path_column is then unused
