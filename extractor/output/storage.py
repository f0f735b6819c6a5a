"""Where the output lives, and how a run writes there so that readers only see complete files.

Two kinds of storage, one contract: a reader or a resume sees only complete files, nothing a run
publishes ever replaces a file already there, and one run per shard writes at a time.

Local directories (a path, or a file:// URL): a part is written under `_tmp/`, fsynced, and
published under its name with a hard link (or renameat2 RENAME_NOREPLACE), which fails if the name
is taken, then the directory is fsynced; small files (`_run.json`, markers) go through a hidden
sibling and a rename. The lock is an flock on `_shards/NNNNN.lock` (output.locks).

Object stores (s3://, gs://, az://; fsspec URLs, credentials and endpoints from the environment or
`--storage-options`): an object written by one PUT, or by a multipart upload, becomes visible only
once complete, so a part is serialised in memory and uploaded straight to its final key: the upload
in flight is the temporary file, its completion the rename. On S3 a part is written with
`If-None-Match: *` (never over another) and the lock with conditional PUTs. Protocols whose uploads
are not known to be atomic (sftp, hdfs, webdav, ...) are refused.

What a kill leaves: the parts committed before it (each complete); maybe a temporary in `_tmp/`
or an incomplete multipart upload (invisible to readers; the shard's next run removes or aborts
those of its own part names); the lock; no marker of that shard and no `_SUCCESS` (a run with work
to do deletes them before it writes). The rerun takes the lock, lists the committed parts and
failure records, embeds only the ids in neither, and numbers its parts after the highest listed.
The races that remain on stores without conditional writes are in the README (Architecture).
"""

from __future__ import annotations

import ctypes
import errno
import io
import logging
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError
from ..urls import is_local, is_url, local_path  # noqa: F401 (is_url: the output stage's users take it from here)
from .locks import LOCK_STALE_S, LockLost, ObjectLock, RunLock, _Conflict

logger = logging.getLogger(__name__)

TMP_DIR = "_tmp"
LOCK_SETTLE_S = 2.0  # stores without conditional writes: wait this long before reading a lock back
READ_THREADS = 8  # parts whose ids are read at once at startup: each read is 2-3 round trips
# fsspec protocols whose upload becomes visible only once complete (one PUT, a completed multipart
# or resumable upload, a committed block list). "memory" is in-process, for tests.
ATOMIC_UPLOAD_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})


class OutputError(ConfigError):
    """The output cannot be used for this run as it is (exit 2)."""


class PartExists(LockLost):
    """A part's name is taken: another run wrote it, or is writing this shard (exit 75)."""


Location = Path | str  # a listed file: a Path in a directory, a URL in an object store


@dataclass(frozen=True)
class PartRead:
    """A committed file as read: its schema (with its metadata) and the wanted columns, or why not."""

    file: Location
    schema: pa.Schema | None = None
    table: pa.Table | None = None
    error: str | None = None  # why it is not whole Parquet
    gone: bool = False


def _read_part(file: Location, open_file: Callable[[], BinaryIO], columns: list[str]) -> PartRead:
    """The footer's schema and `columns`; a file that is not whole Parquet gives its error instead."""
    try:
        with open_file() as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            present = [c for c in columns if c in schema.names]
            return PartRead(file, schema, pf.read(columns=present))
    except FileNotFoundError:
        return PartRead(file, gone=True)  # removed since the listing: its rows are simply not done
    except (pa.ArrowException, OSError, ValueError) as e:
        return PartRead(file, error=f"{type(e).__name__}: {e}")


def basename(location: Location) -> str:
    return posixpath.basename(os.fspath(location))


def open_storage(root: str | os.PathLike, storage_options: Mapping | None = None) -> LocalStorage | ObjectStorage:
    """The storage of an output: a directory for paths and file:// URLs, else an fsspec store."""
    if is_local(root):
        # fsspec's local file system writes in place; a directory needs tmp + rename.
        return LocalStorage(Path(local_path(root)))
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
    except (ImportError, TypeError, ValueError) as e:  # a missing s3fs/gcsfs, a bad option
        raise OutputError(f"cannot open output {root}: {e}") from e
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & ATOMIC_UPLOAD_PROTOCOLS:
        raise OutputError(
            f"output {root}: {sorted(protocols)[0]}:// writes files in place, so readers could see half a part; "
            f"use a local path or an object store ({', '.join(sorted(ATOMIC_UPLOAD_PROTOCOLS - {'memory'}))})"
        )
    cls = S3Storage if protocols & {"s3", "s3a"} else ObjectStorage
    return cls(fs, path.rstrip("/"))


# ---------------------------------------------------------------------------------------------
# Local directories
# ---------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_NOREPLACE = 1  # from <linux/fs.h>
_AT_FDCWD = -100


def _publish(tmp: Path, final: Path) -> None:
    """Move `tmp` to `final` unless `final` exists (FileExistsError): a hard link, which fails on
    an existing name, then the temporary's removal; where links are not supported,
    renameat2(RENAME_NOREPLACE). A plain rename would replace a part another run published."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = getattr(libc, "renameat2", None)
        if renameat2 is None or renameat2(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(final), _RENAME_NOREPLACE) != 0:
            err = ctypes.get_errno() if renameat2 is not None else errno.ENOTSUP
            if err == errno.EEXIST:
                raise FileExistsError(final) from None
            raise OutputError(f"cannot publish {final} without replacing what may be there: this file system supports "
                              f"neither hard links nor renameat2 ({os.strerror(err)}); use another output location") from e
        return
    os.unlink(tmp)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: the file is either absent or complete."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class LocalStorage:
    """A directory: parts via `_tmp/` + fsync + rename, small files via a sibling + rename, flock."""

    def __init__(self, root: Path):
        self.root = root

    def location(self, name: str) -> Path:
        return self.root / name

    def glob(self, pattern: str) -> list[Path]:
        return sorted(self.root.glob(pattern))

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def read_text(self, name: str) -> str:
        return (self.root / name).read_text()

    def write(self, name: str, data: bytes) -> None:
        write_atomic(self.root / name, data)

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist, atomically: True if this call created it.

        The content goes to a temporary sibling first and is hard-linked into place: link()
        fails if the name exists, so of two runs creating it at once exactly one succeeds, and
        nobody ever sees it half-written.
        """
        final = self.root / name
        tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(final.parent)
        return True

    def commit(self, name: str, fill: Callable[[BinaryIO], None]) -> Path:
        """Write `name` with `fill(file)` under _tmp/, fsync it, then publish it under its name,
        never replacing a file already there (PartExists)."""
        final = self.root / name
        tmp = self.root / TMP_DIR / f"{final.name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            _publish(tmp, final)
        except FileExistsError:
            tmp.unlink(missing_ok=True)
            raise PartExists(f"{final} already exists: another run is writing this shard (or wrote it, its lock deleted); "
                             "this run stops without replacing it") from None
        _fsync_dir(final.parent)
        return final

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def read_tables(self, files: list[Location], columns: list[str]) -> list[pa.Table]:
        return [pq.read_table(f, columns=columns) for f in files]

    def sizes(self, pattern: str) -> dict[str, int]:
        """{name relative to the root: bytes} of the files matching `pattern`: one listing."""
        return {p.relative_to(self.root).as_posix(): p.stat().st_size for p in self.glob(pattern) if p.is_file()}

    def read_parts(self, files: list[Location], columns: list[str]) -> list[PartRead]:
        return [_read_part(f, lambda f=f: open(f, "rb"), columns) for f in files]

    def move_aside(self, name: str, to: str) -> None:
        """Move `name` to `to` (both relative), keeping it whole: a damaged file is never deleted."""
        (self.root / to).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.root / name, self.root / to)

    def num_rows(self, file: Location) -> int:
        return pq.read_metadata(file).num_rows

    def makedirs(self, *names: str) -> None:
        if not names:
            self.root.mkdir(parents=True, exist_ok=True)
        for name in names:
            (self.root / name).mkdir(exist_ok=True)

    def discard_uncommitted(self, prefixes: Iterable[str]) -> None:
        """Remove temporaries that an interrupted commit of these names left under _tmp/."""
        for prefix in dict.fromkeys(posixpath.basename(p) for p in prefixes):
            for tmp in (self.root / TMP_DIR).glob(f"{prefix}*"):
                logger.info("removing %s left by an interrupted run", tmp)
                tmp.unlink(missing_ok=True)

    def lock(self, name: str, *, stale_after_s: float = LOCK_STALE_S) -> RunLock:
        return RunLock(self.root / name)

    def is_file(self, name: str) -> bool:
        return (self.root / name).is_file()


# ---------------------------------------------------------------------------------------------
# Object stores
# ---------------------------------------------------------------------------------------------


class ObjectStorage:
    """A prefix in an object store, through fsspec: every write is one complete upload."""

    settle_s = LOCK_SETTLE_S

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self.root = fs.unstrip_protocol(path)  # what messages and the summary name

    def _key(self, name: str) -> str:
        return f"{self.path}/{name}"

    def location(self, name: str) -> str:
        return f"{self.root}/{name}"

    def glob(self, pattern: str) -> list[str]:
        folder, _, _ = pattern.rpartition("/")
        # fsspec caches listings; another run (or shard) may have written since.
        self.fs.invalidate_cache(self._key(folder) if folder else self.path)
        return sorted(self.fs.unstrip_protocol(p) for p in self.fs.glob(self._key(pattern)))

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache(self._key(name))
        return self.fs.exists(self._key(name))

    def read_text(self, name: str) -> str:
        return self.fs.cat_file(self._key(name)).decode()

    def write(self, name: str, data: bytes) -> None:
        self._put(self._key(name), data, create=False)

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if absent: True if this call created it (see create_versioned)."""
        try:
            self.create_versioned(self._key(name), data)
        except FileExistsError:
            return False
        return True

    def is_file(self, name: str) -> bool:
        # An object at exactly this key; exists() is also true of a prefix with objects under it
        # (embeddings/, _shards/), which made every resume on S3 a refusal (tests/output/test_storage.py).
        self.fs.invalidate_cache(self._key(name))
        return self.fs.isfile(self._key(name))

    def commit(self, name: str, fill: Callable[[BinaryIO], None]) -> str:
        """Serialise with `fill(buffer)` in memory, then upload to the final key in one piece."""
        buf = io.BytesIO()
        fill(buf)
        self._put(self._key(name), buf.getvalue(), create=True)
        return self.location(name)

    def _put(self, key: str, data: bytes, *, create: bool) -> None:
        self.fs.pipe_file(key, data)  # no create-only write here; see S3Storage

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self._key(name))
        except FileNotFoundError:
            pass

    def read_tables(self, files: list[Location], columns: list[str]) -> list[pa.Table]:
        # Serially, thousands of parts cost minutes of round trips at startup.
        with ThreadPoolExecutor(READ_THREADS) as pool:
            return list(pool.map(lambda f: self._read_table(f, columns), files))

    def _read_table(self, file: Location, columns: list[str]) -> pa.Table:
        # No read-ahead cache: pyarrow reads the footer and the wanted columns by range.
        with self.fs.open(os.fspath(file), "rb", cache_type="none") as f:
            return pq.read_table(f, columns=columns)

    def num_rows(self, file: Location) -> int:
        with self.fs.open(os.fspath(file), "rb", cache_type="none") as f:
            return pq.read_metadata(f).num_rows

    def sizes(self, pattern: str) -> dict[str, int]:
        folder, _, _ = pattern.rpartition("/")
        self.fs.invalidate_cache(self._key(folder) if folder else self.path)
        found = self.fs.glob(self._key(pattern), detail=True)
        return {k[len(self.path) + 1 :]: int(info.get("size") or 0) for k, info in found.items() if info.get("type") != "directory"}

    def read_parts(self, files: list[Location], columns: list[str]) -> list[PartRead]:
        with ThreadPoolExecutor(READ_THREADS) as pool:
            return list(pool.map(lambda f: _read_part(f, lambda: self.fs.open(os.fspath(f), "rb", cache_type="none"), columns), files))

    def move_aside(self, name: str, to: str) -> None:
        self.fs.copy(self._key(name), self._key(to))
        self.fs.rm_file(self._key(name))

    def makedirs(self, *names: str) -> None:
        """Object stores have no directories."""

    def discard_uncommitted(self, prefixes: Iterable[str]) -> None:
        """Incomplete uploads are invisible; without S3's listing of them, a lifecycle rule ends them."""

    def lock(self, name: str, *, stale_after_s: float = LOCK_STALE_S) -> ObjectLock:
        return ObjectLock(self, name, stale_after_s=stale_after_s)

    # -- the lock's primitives: a version is what a conditional write compares ----------------
    def read_versioned(self, key: str) -> tuple[bytes, object]:
        data = self.fs.cat_file(key)
        return data, data

    def create_versioned(self, key: str, data: bytes) -> object:
        """Write `key` if absent (FileExistsError otherwise); here a check, then a write."""
        self.fs.invalidate_cache(key)
        if self.fs.exists(key):
            raise FileExistsError(key)
        self.fs.pipe_file(key, data)
        return data

    def replace(self, key: str, data: bytes, version: object) -> object:
        """Overwrite `key` if it still holds `version` (_Conflict otherwise); here a check, then a write."""
        try:
            current = self.fs.cat_file(key)
        except FileNotFoundError:
            raise _Conflict(f"{key} is gone") from None
        if current != version:
            raise _Conflict(f"{key} changed")
        self.fs.pipe_file(key, data)
        return data

    def delete_key(self, key: str) -> None:
        try:
            self.fs.rm_file(key)
        except FileNotFoundError:
            pass


async def _get_object(fs, bucket: str, key: str) -> tuple[bytes, str]:
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    try:
        return await resp["Body"].read(), resp["ETag"]
    finally:
        resp["Body"].close()


def _precondition_failed(e: BaseException) -> bool:
    """s3fs turns a 412/409 of a conditional PUT into a plain OSError; its cause says which."""
    for err in (e, e.__cause__):
        code = getattr(err, "response", {}).get("Error", {}).get("Code") if err is not None else None
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return True
    return False


class S3Storage(ObjectStorage):
    """S3 and S3-compatible stores (s3fs): parts and the lock use conditional writes."""

    settle_s = 0.0  # conditional writes decide; the read-back is a check for servers that ignore them

    def _split(self, key: str) -> tuple[str, str]:
        bucket, k, _ = self.fs.split_path(key)
        return bucket, k

    def _put(self, key: str, data: bytes, *, create: bool) -> None:
        # One PUT below 2 x 50 MB, a multipart upload above; both appear whole on completion, and
        # s3fs aborts the multipart upload if a part fails.
        try:
            self.fs.pipe_file(key, data, mode="create" if create else "overwrite")
        except FileExistsError as e:
            raise PartExists(f"{self.fs.unstrip_protocol(key)} already exists: another run is writing this shard") from e

    def discard_uncommitted(self, prefixes: Iterable[str]) -> None:
        """Abort multipart uploads of our own part names that a killed run left behind.

        Only names of this shard, which this run's lock covers: other shards' uploads are live.
        """
        for prefix in prefixes:
            bucket, key = self._split(self._key(prefix))
            try:
                uploads = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", [])
                for up in uploads:
                    logger.info("aborting the incomplete upload of s3://%s/%s left by an interrupted run", bucket, up["Key"])
                    self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
            except OSError as e:  # e.g. no s3:ListBucketMultipartUploads permission: only storage is lost
                logger.warning("cannot clean incomplete uploads under s3://%s/%s (%s); a lifecycle rule can", bucket, key, e)

    def read_versioned(self, key: str) -> tuple[bytes, object]:
        from fsspec.asyn import sync

        return sync(self.fs.loop, _get_object, self.fs, *self._split(key))  # body and ETag of one GET

    def create_versioned(self, key: str, data: bytes) -> object:
        bucket, k = self._split(key)
        try:
            return self.fs.call_s3("put_object", Bucket=bucket, Key=k, Body=data, IfNoneMatch="*")["ETag"]
        except OSError as e:
            if _precondition_failed(e):
                raise FileExistsError(key) from e
            raise

    def replace(self, key: str, data: bytes, version: object) -> object:
        bucket, k = self._split(key)
        try:
            return self.fs.call_s3("put_object", Bucket=bucket, Key=k, Body=data, IfMatch=version)["ETag"]
        except FileNotFoundError:
            raise _Conflict(f"{key} is gone") from None
        except OSError as e:
            if _precondition_failed(e):
                raise _Conflict(f"{key} changed") from e
            raise
