"""What the command line says about the manifest: where it is and which columns mean what."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ManifestSpec:
    path: str
    path_column: str = "path"
    id_column: str | None = None  # None: the path is the id
    keep_columns: tuple[str, ...] = ()
    start_column: str | None = None
    end_column: str | None = None
