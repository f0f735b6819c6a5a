"""Where a file's bytes come from: a local path, a URL (s3://, gs://, https://, file://), or bytes
stored in the manifest itself. Every problem is an AudioError that names the source.

A source is opened in the decode worker, never in the job's process.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO, Mapping

from .errors import AudioError, DecodeError, TooLongError

# Bytes per second of the widest audio expected (48 kHz, 8 channels, 32-bit PCM): a remote file
# bigger than max_duration_s of it is refused before it is downloaded into a worker's memory.
REMOTE_MAX_BYTES_PER_S = 48_000 * 8 * 4


@dataclass
class Source:
    """An opened source: `path` for a local file (decoders read it themselves), else `data`."""

    name: str  # what messages name: the path or URL, or the manifest row of embedded bytes
    path: str | None = None
    data: bytes | None = None

    def fileobj(self) -> str | BinaryIO:
        """What a decoder opens: the local path, or a file object over the bytes."""
        return self.path if self.path is not None else io.BytesIO(self.data)

    def close(self) -> None:
        self.data = None


def open_source(name: str, *, data: bytes | None = None, max_duration_s: float, storage_options: Mapping | None = None) -> Source:
    """Check and open a source; AudioError if it cannot be read."""
    if data is not None:
        if not data:
            raise DecodeError(f"cannot decode {name}: empty audio (0 bytes)")
        return Source(name, data=bytes(data))
    if "://" in name and not name.startswith("file://"):
        return Source(name, data=_fetch(name, max_duration_s, storage_options))
    path = name.removeprefix("file://")
    _check_file(path, name)
    return Source(name, path=path)


def _check_file(path: str, name: str) -> None:
    """Reject what is not a non-empty regular file before any decoder sees it (a FIFO would hang)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise AudioError(f"cannot open {name}: no such file") from e
    except OSError as e:
        raise AudioError(f"cannot open {name}: {e.strerror or e}") from e
    if stat.S_ISDIR(st.st_mode):
        raise AudioError(f"cannot decode {name}: is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise AudioError(f"cannot decode {name}: not a regular file")
    if st.st_size == 0:
        raise DecodeError(f"cannot decode {name}: empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise AudioError(f"cannot open {name}: permission denied")


def _fetch(path: str, max_duration_s: float, storage_options: Mapping | None) -> bytes:
    """The whole content of a remote file; AudioError if it cannot be read or is too big."""
    import fsspec

    try:
        fs, key = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
        size = fs.size(key)
        limit = max_duration_s * REMOTE_MAX_BYTES_PER_S
        if size is not None and size > limit:
            raise TooLongError(
                f"{path} is {size:,} bytes, more than max_duration_s={max_duration_s:g} of audio can take "
                f"({limit:,.0f} bytes at {REMOTE_MAX_BYTES_PER_S:,} bytes/s)"
            )
        data = fs.cat_file(key)
    except AudioError:
        raise
    except FileNotFoundError as e:
        raise AudioError(f"cannot read {path}: no such file") from e
    except Exception as e:
        if isinstance(e, MemoryError):
            raise
        # Credentials, endpoints, timeouts, HTTP errors: all mean "this file cannot be read now".
        raise AudioError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not data:
        raise DecodeError(f"cannot decode {path}: empty file (0 bytes)")
    return data
