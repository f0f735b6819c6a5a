"""Where the output lives, and how a run writes there so that readers only see complete files.

Two kinds of storage, one contract (issue 2: a reader or a resume sees only complete files; the
data is the journal; one run per shard at a time):

Local directories (a path, or a file:// URL). Today's code, unchanged: a part is written under
`_tmp/`, flushed, fsynced, renamed into place and the directory fsynced; small files (`_run.json`,
markers) go through a hidden sibling and a rename. The lock is an flock on `_lock-<shard>`, which
the kernel drops however its holder dies.

Object stores (s3://, gs://, az://; fsspec URLs, credentials and endpoints from the environment or
`--storage-options`). S3 has no rename, but it has something as good: an object written by one
PUT, or by a multipart upload, becomes visible only when the upload completes, whole, in one step.
So a part is serialised in memory and uploaded straight to its final key; the upload in flight is
the temporary file, its completion is the rename. A reader listing the prefix sees a part
complete or not at all. `_run.json`, failure files, markers and `_SUCCESS` are written the same
way, `_SUCCESS` last. (Copying from a temporary key instead would gain nothing: a server-side copy
is not a rename either, it doubles the traffic, and it leaves two objects to clean up.) On S3 a
part is written with `If-None-Match: *`, so a part is never overwritten, not even by a run that
lost its lock. Listing after a write is strongly consistent on S3 (since 2020), GCS and Azure Blob.
Protocols whose uploads are not known to be atomic (sftp, hdfs, webdav, ...) are refused.

What a kill leaves on an object store: the parts committed before it (each complete); maybe an
incomplete multipart upload of the next one (invisible to readers; the shard's next run aborts
those of its own part names, and a bucket lifecycle rule "AbortIncompleteMultipartUpload" is a
good idea anyway); the `_lock-<shard>` object; no marker of that shard and no `_SUCCESS` (a run
with work to do deletes them before it starts). Why the rerun is exactly-once: it takes the lock,
lists the committed parts and failure files and embeds only the ids in neither; each id goes into
exactly one object; part numbers continue after the highest one listed. A row whose part was not
completed is simply not done, and the rerun does it again, with the same numbers.

The lock on an object store is the object `_lock-<shard>`: its owner (host, boot id, pid
namespace, pid, process start time, a random token) and a heartbeat timestamp that a background
thread refreshes every LOCK_HEARTBEAT_S. A lock is taken over, with a warning, when its owner is
provably dead (same host, boot and pid namespace, and that process is gone: a killed run is taken
over at once by the next run on the same machine) or when its heartbeat is older than
LOCK_STALE_S; otherwise the run is refused (exit 2). On S3 every write of the lock is a compare-
and-swap: created with `If-None-Match: *`, refreshed and taken over with `If-Match: <ETag>`, so of
two runs racing for it exactly one wins, and a run whose lock was taken over learns it at its next
heartbeat. A holder also stops writing (LockLost) once it has failed to refresh its lock for half
of LOCK_STALE_S, before anybody may take it over. Every heartbeat reads the lock before it writes
it, so a takeover is noticed even where conditional writes are not honoured. Other object stores
have no conditional writes here: the lock is written only if found absent, then read back after
LOCK_SETTLE_S and compared.

The residual races, honestly: (1) without conditional writes (non-S3 stores, or an S3-compatible
server that ignores the headers), two runs that find the lock absent at nearly the same moment
can both believe they hold it (elsewhere than S3 only if one of them stalls for more than
LOCK_SETTLE_S between its check and its write). The one whose token was overwritten stops at its
next heartbeat, within LOCK_HEARTBEAT_S, but parts that both committed meanwhile may hold the
same ids. (2) The staleness rule trusts the clocks of
both machines to agree to well within LOCK_STALE_S / 2. (3) A holder frozen for longer than
LOCK_STALE_S (SIGSTOP, a suspended VM) exactly between its lease check and a PUT could land one
part after it was taken over; on S3 that part cannot overwrite anything (`If-None-Match`), but its
ids may then be duplicated. (4) Releasing the lock reads it back and deletes it if it is still
ours; a takeover in between (only possible after LOCK_STALE_S of silence) would be deleted too.
All four need a run to be stuck or misconfigured for minutes; none arises from a kill.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

TMP_DIR = "_tmp"
LOCK_STALE_S = 600.0  # an object-store lock without a heartbeat for this long is taken over
LOCK_HEARTBEAT_S = 30.0  # how often its holder refreshes it
LOCK_SETTLE_S = 2.0  # stores without conditional writes: wait this long before reading a lock back
READ_THREADS = 8  # parts whose ids are read at once at startup: each read is 2-3 round trips
# fsspec protocols whose upload becomes visible only once complete (one PUT, a completed multipart
# or resumable upload, a committed block list). "memory" is in-process, for tests.
ATOMIC_UPLOAD_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})


class OutputError(Exception):
    """The output directory cannot be used for this run (exit 2)."""


class LockHeld(OutputError):
    pass


class LockLost(Exception):
    """This run may no longer hold its lock: it stops before writing more; a rerun resumes."""


class _Conflict(Exception):
    """A conditional write of the lock found another version than the one expected."""


Location = Path | str  # a listed file: a Path in a directory, a URL in an object store


def is_url(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and "://" in path


def basename(location: Location) -> str:
    return posixpath.basename(os.fspath(location))


def open_storage(root: str | os.PathLike, storage_options: Mapping | None = None) -> LocalStorage | ObjectStorage:
    """The storage of an output: a directory for paths and file:// URLs, else an fsspec store."""
    if not is_url(root):
        return LocalStorage(Path(root))
    if root.startswith("file://"):
        # fsspec's local file system writes in place; a directory needs tmp + rename.
        return LocalStorage(Path(root.removeprefix("file://")))
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


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: the file is either absent or complete."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _process_start(pid) -> str | None:
    """Start time of `pid` in clock ticks since boot, to tell a live owner from a reused pid."""
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, TypeError, ValueError):
        return None


class RunLock:
    """One run per (output, shard) at a time.

    An exclusive flock on `_lock-<shard>`: the kernel drops it when the holder dies, however it
    dies, so a lock left by a killed run is always taken over, and a live holder always refuses
    the next run. The file's content says who holds it, for the error message and the log.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(f"another run holds {self.path} ({holder}); refusing to run concurrently") from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            logger.warning("taking over stale lock %s left by a dead run (%s)", self.path, previous)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd

    def check(self) -> None:
        """Nothing to check: the kernel holds the flock until this process ends."""

    def release(self) -> None:
        if self._fd is not None:
            # Empty the file before unlocking: an empty lock file means a clean exit.
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


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

    def commit(self, name: str, fill: Callable[[BinaryIO], None]) -> Path:
        """Write `name` with `fill(file)` under _tmp/, then fsync and rename it into place."""
        final = self.root / name
        tmp = self.root / TMP_DIR / f"{final.name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        return final

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def read_tables(self, files: list[Location], columns: list[str]) -> list[pa.Table]:
        return [pq.read_table(f, columns=columns) for f in files]

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

    def create(self, key: str, data: bytes) -> object:
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
            raise LockLost(f"{self.fs.unstrip_protocol(key)} already exists: another run is writing this shard") from e

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

    def create(self, key: str, data: bytes) -> object:
        bucket, k = self._split(key)
        return self.fs.call_s3("put_object", Bucket=bucket, Key=k, Body=data, IfNoneMatch="*")["ETag"]

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


# ---------------------------------------------------------------------------------------------
# The lock on an object store
# ---------------------------------------------------------------------------------------------


def _read_first_line(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _owner() -> dict:
    """Who we are, precisely enough for a run on the same machine to tell whether we still live."""
    pid = os.getpid()
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")  # containers sharing a host name have their own
    except OSError:
        pid_ns = None
    return {
        "host": socket.gethostname(),
        "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
        "pid_ns": pid_ns,
        "pid": pid,
        "pid_start": _process_start(pid),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _parse(body: bytes) -> dict:
    try:
        holder = json.loads(body)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "unreadable lock"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"


def _judge(holder: dict, stale_after_s: float) -> tuple[bool, str]:
    """(may the lock be taken over, why) for the lock's current content."""
    me = _owner()
    here = all(holder.get(k) is not None and holder.get(k) == me[k] for k in ("host", "boot_id", "pid_ns"))
    if here and _process_start(holder.get("pid")) != holder.get("pid_start"):
        return True, f"its process {holder.get('pid')} on this host is gone"
    try:
        age = time.time() - float(holder["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return True, "it records no heartbeat"
    if age > stale_after_s:
        return True, f"no heartbeat for {age:.0f} s (stale after {stale_after_s:.0f} s)"
    alive = " (alive on this host)" if here else ""
    return False, f"last heartbeat {age:.0f} s ago{alive}; it is taken over after {stale_after_s:.0f} s without one"


class ObjectLock:
    """One run per (output, shard) on an object store: a lock object with a heartbeat (see above)."""

    def __init__(self, storage: ObjectStorage, name: str, *, stale_after_s: float = LOCK_STALE_S, heartbeat_s: float | None = None):
        self.storage, self.key, self.location = storage, storage._key(name), storage.location(name)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(LOCK_HEARTBEAT_S, stale_after_s / 10)
        self.token = uuid.uuid4().hex
        self._owner = _owner()
        self._version: object = None
        self._last_ok = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return json.dumps({**self._owner, "token": self.token, "heartbeat": now, "heartbeat_utc": stamp}).encode()

    def acquire(self) -> None:
        try:
            try:
                self._version = self.storage.create(self.key, self._record())
            except FileExistsError:
                self._take_over()
            self._confirm()
        except (FileNotFoundError, PermissionError) as e:  # no such bucket, no write access
            raise OutputError(f"cannot create the lock {self.location}: {e}") from e
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self._thread.start()

    def _take_over(self) -> None:
        try:
            body, version = self.storage.read_versioned(self.key)
        except FileNotFoundError:  # released since: try once more, and lose if somebody was faster
            try:
                self._version = self.storage.create(self.key, self._record())
            except FileExistsError:
                raise LockHeld(f"another run took {self.location} at the same time; refusing to run concurrently") from None
            return
        holder = _parse(body)
        if holder.get("token") == self.token:  # our own create, retried after a lost response
            self._version = version
            return
        free, why = _judge(holder, self.stale_after_s)
        if not free:
            raise LockHeld(f"another run holds {self.location} ({_describe(holder)}); {why}; refusing to run concurrently")
        logger.warning("taking over stale lock %s (%s): %s", self.location, _describe(holder), why)
        try:
            self._version = self.storage.replace(self.key, self._record(), version)
        except _Conflict:
            raise LockHeld(f"another run took over {self.location} at the same time; refusing to run concurrently") from None

    def _confirm(self) -> None:
        """Read the lock back: ours, or somebody's write landed after ours (a store without CAS)."""
        time.sleep(self.storage.settle_s)
        body, version = self.storage.read_versioned(self.key)
        holder = _parse(body)
        if holder.get("token") != self.token:
            raise LockHeld(f"another run took {self.location} at the same time ({_describe(holder)}); refusing to run concurrently")
        self._version = version

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._refresh()
            except LockLost as e:
                self._lost = str(e)
                logger.error("%s; this run stops before writing more", e)
                return
            except _Conflict:
                pass  # written between our read and our write: the next beat reads who holds it
            except Exception as e:  # the network: keep trying; check() stops the run in time
                logger.warning("cannot refresh the lock %s: %s; retrying in %g s", self.location, e, self.heartbeat_s)

    def _refresh(self) -> None:
        # Read before writing: a takeover shows even on a server that ignores If-Match, and a
        # refresh that landed although its response was lost is recognised as ours.
        try:
            body, version = self.storage.read_versioned(self.key)
        except FileNotFoundError:
            raise LockLost(f"the lock {self.location} was removed") from None
        holder = _parse(body)
        if holder.get("token") != self.token:
            raise LockLost(f"the lock {self.location} was taken over ({_describe(holder)})")
        self._version = self.storage.replace(self.key, self._record(), version)
        self._last_ok = time.monotonic()

    def check(self) -> None:
        """Raise LockLost unless this run certainly still holds the lock: called before each write."""
        if self._lost:
            raise LockLost(f"{self._lost}; stopping before writing more (rerun to resume)")
        silent = time.monotonic() - self._last_ok
        if silent > self.stale_after_s / 2:
            raise LockLost(
                f"the lock {self.location} was not refreshed for {silent:.0f} s and may be taken over after "
                f"{self.stale_after_s:.0f} s; stopping before writing more (rerun to resume)"
            )

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._lost:
            return
        try:
            body, _ = self.storage.read_versioned(self.key)
            if _parse(body).get("token") == self.token:
                self.storage.delete_key(self.key)
        except FileNotFoundError:
            pass
        except Exception as e:  # the run's work is committed; a leftover lock only delays the next run
            logger.warning("cannot remove the lock %s: %s; the next run takes it over after %.0f s", self.location, e, self.stale_after_s)
