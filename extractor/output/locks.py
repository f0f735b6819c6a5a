"""One run per shard of an output at a time, however the last one died.

Every lock here is a context manager, and whoever holds one writes only inside it: a writer is
closed before its run's lock is released (output.writer), so nothing lands after the release.

Directories: an flock on `_shards/NNNNN.lock`. The kernel drops it however its holder dies, so a
lock left by a killed run is always taken over, and a live holder always refuses the next run.
The file exists only while a run holds it: release unlinks it (still holding the lock), and
acquire checks, once it holds the lock, that the path still names the file it locked (else the
holder it waited for had just unlinked it, and it tries again). So a refused or finished run
leaves no file behind, and a lock file found at start belongs to a dead run.

`--devices` runs a shard in several processes under one lock: the parent takes it, and each worker
inherits the locked file description (`share()`), so the lock is held until the parent *and* every
worker are gone. A worker that outlives a killed parent (for the moment PR_SET_PDEATHSIG takes)
still holds it; the next run cannot start under it.

Object stores: the object `_shards/NNNNN.lock` with its owner and a heartbeat, written with
conditional PUTs on S3 (output.storage tells the residual races of stores without them).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from multiprocessing import reduction
from pathlib import Path

from ..errors import ConfigError, OutputBusy

logger = logging.getLogger(__name__)

LOCK_STALE_S = 600.0  # an object-store lock without a heartbeat for this long is taken over
LOCK_HEARTBEAT_S = 30.0  # how often its holder refreshes it


class LockHeld(OutputBusy):
    """A live run holds the lock (exit 75)."""


class LockLost(OutputBusy):
    """This run may no longer hold its lock (it was removed or replaced, taken over, or could not
    be refreshed): another run may be writing the shard, so this one stops before writing more
    (exit 75: retry later; the rerun resumes from what is committed)."""


class LockUnusable(ConfigError):
    """The lock cannot be taken for a reason no retry fixes: the output is read-only, a lock path is a directory, ..."""


class _Conflict(Exception):
    """A conditional write of the lock found another version than the one expected."""


def process_start(pid) -> str | None:
    """Start time of `pid` in clock ticks since boot, to tell a live owner from a reused pid."""
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Directories
# ---------------------------------------------------------------------------------------------


def flock_holder(path: Path) -> str | None:
    """Who holds the flock on a local lock file, looked at without taking it: the holder's record
    ("a run starting up" before it has written one), or None when the file is missing or no live
    process holds it (a killed run's file stays behind with its record, but not its flock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a run starting up"
    finally:
        os.close(fd)


class RunLock:
    """An exclusive flock on a file that exists only while it is held."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except IsADirectoryError:
                raise LockUnusable(f"{self.path} is a directory, not a lock file: move it away") from None
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise LockUnusable(f"cannot create the lock {self.path}: {e.strerror} (is the output read-only?)") from e
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a run starting up"
                os.close(fd)
                raise LockHeld(f"another run holds {self.path} ({holder}); retry when it is done") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder we waited for unlinked it as it released: lock the new one
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            logger.warning("taking over the lock %s left by a run that died (%s)", self.path, previous)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd

    def check(self) -> None:
        """Before every write: the lock's path still names the file this run locked. The kernel
        holds the flock however long this process lives, but an operator's `rm` (of the lock, or of
        `_shards/`) lets a second run lock a new file of the same name; from then on this run must
        not write, or both would."""
        _check_same_file(self._fd, self.path)

    def clear_stale(self) -> bool:
        """Remove the lock file if no live run holds it (a run killed after its markers left it):
        True if removed. Never waits, never creates the file."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # a live run holds it
        try:
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                return False  # replaced meanwhile by a run that now holds the new one
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.unlink(self.path)  # holding its flock, as release() does
            logger.info("removed the lock %s left by a run that died (%s)", self.path, holder or "no record")
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    def share(self) -> SharedLock:
        """A picklable handle for a worker process (multiprocessing spawn) that keeps the lock held."""
        assert self._fd is not None, "share() needs a held lock"
        return SharedLock(self._fd, os.getpid(), self.path)

    def add_holders(self, pids: list[int]) -> None:
        """Workers holding shared handles (see module doc); the flock needs no record of them."""

    def release(self) -> None:
        if self._fd is not None:
            # Unlink before unlocking: a run blocked on this inode then sees it is stale and retries.
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)  # closing the last descriptor of the description drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _check_same_file(fd: int | None, path: Path) -> None:
    """LockLost unless `path` is the file open at `fd` (same device and inode)."""
    if fd is None:
        return
    held = os.fstat(fd)
    try:
        now = os.stat(path)
    except FileNotFoundError:
        raise LockLost(f"the lock file {path} was removed while this run held it; another run may be writing "
                       "this shard, so this one stops before writing more (never delete lock files: see the README)") from None
    if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        raise LockLost(f"the lock file {path} was replaced while this run held it (another run locked a new one); "
                       "stopping before writing more")


def _rebuild_shared(dup, parent_pid: int, path) -> SharedLock:
    lock = SharedLock(dup.detach(), parent_pid, path)
    lock._inherited = True
    return lock


class SharedLock:
    """A worker's part of its parent's lock (RunLock.share, ObjectLock.share).

    For a directory it holds a duplicate of the locked file description: the flock stays held
    while this process lives, and closing it never unlocks the parent's. For an object store it
    holds nothing; the parent heartbeats, and lists the workers' pids in the lock object.
    check() refuses to write once the parent is gone.
    """

    def __init__(self, fd: int | None, parent_pid: int, path: Path | None = None):
        self.fd, self.parent_pid, self.path = fd, parent_pid, path
        self._inherited = False

    def __reduce__(self):
        # DupFd passes the descriptor to the child during Process.start() (spawn's pass_fds).
        return _rebuild_shared, (reduction.DupFd(self.fd) if self.fd is not None else _NoFd(), self.parent_pid, self.path)

    def check(self) -> None:
        if os.getppid() != self.parent_pid:
            raise LockLost(f"the process holding this run's lock (pid {self.parent_pid}) is gone; stopping before writing more")
        if self.path is not None:
            _check_same_file(self.fd, self.path)

    def release(self) -> None:
        if self._inherited and self.fd is not None:
            os.close(self.fd)  # never LOCK_UN: that would unlock the parent's description too
            self.fd = None

    def __enter__(self) -> SharedLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _NoFd:
    def detach(self):
        return None


# ---------------------------------------------------------------------------------------------
# Object stores
# ---------------------------------------------------------------------------------------------


def _read_first_line(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _owner(pids: list[int] | None = None) -> dict:
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
        "pid_start": process_start(pid),
        # Worker processes writing under this lock (--devices): each as [pid, start].
        "holders": [[p, process_start(p)] for p in (pids or [])],
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
    if here:
        procs = [[holder.get("pid"), holder.get("pid_start")], *(holder.get("holders") or [])]
        if all(process_start(pid) != start for pid, start in procs):
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
    """One run per shard on an object store: a lock object with a heartbeat (see output.storage)."""

    def __init__(self, storage, name: str, *, stale_after_s: float = LOCK_STALE_S, heartbeat_s: float | None = None):
        self.storage, self.key, self.location = storage, storage._key(name), storage.location(name)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(LOCK_HEARTBEAT_S, stale_after_s / 10)
        self.token = uuid.uuid4().hex
        self._holders: list[int] = []
        self._last_ok = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write = threading.Lock()

    def _record(self) -> bytes:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return json.dumps({**_owner(self._holders), "token": self.token, "heartbeat": now, "heartbeat_utc": stamp}).encode()

    def acquire(self) -> None:
        try:
            try:
                self.storage.create_versioned(self.key, self._record())
            except FileExistsError:
                self._take_over()
            self._confirm()
        except (FileNotFoundError, PermissionError) as e:  # no such bucket, no write access
            raise LockUnusable(f"cannot create the lock {self.location}: {e}") from e
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self._thread.start()

    def _take_over(self) -> None:
        try:
            body, version = self.storage.read_versioned(self.key)
        except FileNotFoundError:  # released since: try once more, and lose if somebody was faster
            try:
                self.storage.create_versioned(self.key, self._record())
            except FileExistsError:
                raise LockHeld(f"another run took {self.location} at the same time; retry when it is done") from None
            return
        holder = _parse(body)
        if holder.get("token") == self.token:  # our own create, retried after a lost response
            return
        free, why = _judge(holder, self.stale_after_s)
        if not free:
            raise LockHeld(f"another run holds {self.location} ({_describe(holder)}); {why}; retry when it is done")
        logger.warning("taking over stale lock %s (%s): %s", self.location, _describe(holder), why)
        try:
            self.storage.replace(self.key, self._record(), version)
        except _Conflict:
            raise LockHeld(f"another run took over {self.location} at the same time; retry when it is done") from None

    def _confirm(self) -> None:
        """Read the lock back: ours, or somebody's write landed after ours (a store without CAS)."""
        time.sleep(self.storage.settle_s)
        body, _ = self.storage.read_versioned(self.key)
        holder = _parse(body)
        if holder.get("token") != self.token:
            raise LockHeld(f"another run took {self.location} at the same time ({_describe(holder)}); retry when it is done")

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
        with self._write:
            try:
                body, version = self.storage.read_versioned(self.key)
            except FileNotFoundError:
                raise LockLost(f"the lock {self.location} was removed") from None
            holder = _parse(body)
            if holder.get("token") != self.token:
                raise LockLost(f"the lock {self.location} was taken over ({_describe(holder)})")
            self.storage.replace(self.key, self._record(), version)
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

    def clear_stale(self) -> bool:
        """Nothing here: an object store's stale lock is taken over by the next run with work (a
        delete could race a takeover between its read and its write)."""
        return False

    def share(self) -> SharedLock:
        return SharedLock(None, os.getpid())

    def add_holders(self, pids: list[int]) -> None:
        """List worker processes in the lock object, so that a same-host takeover waits for them too."""
        self._holders = list(pids)
        self._refresh()

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

    def __enter__(self) -> ObjectLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
