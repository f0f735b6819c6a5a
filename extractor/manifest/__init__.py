"""The manifest: what to embed. Read and validated whole before anything is written.

    (its description on the command line, ManifestSpec, is one of the run's options: extractor.options)
    formats.py   the readers, one per format, registered with the names they recognise;
                 where a manifest's bytes come from (paths, http(s) URLs, fsspec URLs)
    lhotse.py    lhotse cut manifests as rows, without lhotse
    embedded.py  audio stored in a Parquet manifest, read lazily, row group by row group
    types.py     one canonical Arrow type per logical type, for every part
    read.py      validation, the rows of a run, sharding, fingerprints
"""

from __future__ import annotations

from .errors import ManifestError
from ..options import ManifestSpec

__all__ = ["Manifest", "ManifestError", "ManifestSpec", "read_manifest"]


def __getattr__(name: str):
    # read.py imports polars; `extract-embeddings --help` imports this package for ManifestSpec only.
    if name in ("Manifest", "read_manifest"):
        from . import read

        return getattr(read, name)
    raise AttributeError(name)
