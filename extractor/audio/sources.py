"""Where a file's bytes come from: a local path, a URL (https://, s3://, gs://, file://, ...), or
bytes stored in the manifest itself, read with a byte cap and honest errors (issue 12).

A source is opened in the decode worker, never in the job's process, and read as a stream:
every source, local files included, reaches the decoders as one file object (`SourceStream`)
that reads what the decoder asks for, when it asks. Nothing is downloaded whole. Memory in a
worker is therefore bounded by design: a read buffer (READ_BUFFER_BYTES), fsspec's read-ahead
block (FSSPEC_BLOCK_BYTES), at most SPOOL_MAX_BYTES for a server that serves no byte ranges (see
below), and the decoder's own window; never by a file's size or by what a server or a header
claims. The alternative, spooling each file into memory, would bound memory only by the byte cap,
which must admit hours of uncompressed audio (gigabytes): streaming is the only design where both
bounds hold at once.

How each source is read:
- local paths and file:// URLs: the file, opened by us. Anything that is not a regular file
  (/dev/zero, a FIFO, a directory, a socket) is refused before it is opened.
- http(s)://: the standard library (urllib), through Range requests, so libsndfile can seek and
  a segment reads only its region. A server that ignores ranges gives a forward-only stream:
  up to SPOOL_MAX_BYTES of it is held in memory (then the file is read exactly as if local);
  a longer one streams to FFmpeg, which reads forward (libsndfile needs to seek). Not fsspec's
  http filesystem, which reports a refused connection as "no such file", reads a whole range
  response into memory however much the server sends, and needs aiohttp.
- other URLs (s3://, gs://, ftp://, ...): fsspec's buffered file (ranged GETs of
  FSSPEC_BLOCK_BYTES). Every one has a read timeout: s3 and ftp get their library's own (botocore's,
  ftplib's socket timeout), any other scheme a deadline on each call into fsspec (`_Deadline`).
- bytes from the manifest: read in place.

The byte cap counts the bytes the decoder reads from the source, and the read that passes it
fails at once: the decoder sees the end of its input and decode.py raises the recorded
TooLongError. The cap is what `extent_s` seconds of the richest audio we accept can take (see
MAX_BYTES_PER_S), `extent_s` being how far into the file a request's rows reach (max_duration_s
for a whole file), plus HEADER_BYTES. Read errors never raise into a native decoder (an
exception in soundfile's callbacks is printed by cffi and read as 0 bytes): the stream records
the error and reports end of file, and decode.py raises it through `Source.check`.

Every problem is an AudioError whose message names the source and what happened: "cannot read
URL: refused", "timed out", "not found", "too large", "permission denied", ...
"""

from __future__ import annotations

import errno
import http.client
import io
import math
import os
import queue
import socket
import ssl
import stat
import threading
import urllib.error
import urllib.request
from typing import BinaryIO, Mapping

from ..options import DEFAULT_READ_TIMEOUT_S
from .errors import AudioError, DecodeError, TooLongError

__all__ = ["HEADER_BYTES", "MAX_BYTES_PER_S", "Source", "SourceStream", "byte_cap", "open_source"]

# The richest audio accepted, in bytes per second of it: uncompressed 32-bit PCM at 192 kHz with
# 8 channels (studio masters; 7.1 at 96 kHz and 24-bit is half of it). Any file that holds
# `extent_s` seconds of audio, compressed or not, fits in `extent_s` times this (plus headers),
# so a source that yields more bytes is not audio of that length. The cap is not a memory bound
# (streaming is), so it errs on the generous side: it only bounds the time and traffic spent on a
# stream that never ends or never decodes. Before issue 12 it was 48 kHz x 8 ch x 4 B, half of
# what a 96 kHz 7.1 float master takes.
MAX_BYTES_PER_S = 192_000 * 8 * 4  # 6,144,000 bytes/s
# Bytes allowed besides the audio: tags and cover art (MP3s carry several MB of it), an mp4
# index, Ogg/Matroska framing, and the decoders' re-reads of headers.
HEADER_BYTES = 16 << 20
READ_BUFFER_BYTES = 64 << 10  # what one read of a source asks for (mpg123 reads ~200 bytes at a time)
FSSPEC_BLOCK_BYTES = 4 << 20  # one ranged GET to s3:// and friends (s3fs's default is 50 MB)
# A server that serves no byte ranges: up to this much is held in memory, so a typical file
# (a 30 min MP3 at 128 kbit/s is 29 MB) decodes as if local; longer streams go to FFmpeg forward.
SPOOL_MAX_BYTES = 32 << 20
HTTP_SKIP_BYTES = 256 << 10  # a forward seek this short reads on instead of starting a new request
# Bytes just read that an http source keeps: soundfile seeks back to where it believes it is after
# every read, which libFLAC answers by re-reading from a frame a few KB back (measured: one
# request per block of a FLAC without them).
HTTP_BACK_BYTES = 256 << 10
USER_AGENT = "qwen2-audio-embeddings (python-urllib)"


def byte_cap(extent_s: float) -> float:
    """The most bytes a source may yield for `extent_s` seconds of audio (math.inf: no cap)."""
    return math.inf if not math.isfinite(extent_s) else HEADER_BYTES + math.ceil(extent_s * MAX_BYTES_PER_S)


# --- the stream that decoders read ----------------------------------------------------------


class SourceStream(io.RawIOBase):
    """A source's bytes as a read-only raw file object, counting what it yields.

    Seekable when the backend is (a local file, bytes, a server or store that serves ranges);
    a seek only moves the position, the next read fetches from there. A read that passes the
    cap, and any read error, is recorded in `error` and answered with end of file.
    """

    def __init__(self, name: str, backend, cap: float, too_large: str, read_timeout_s: float | None = None):
        super().__init__()
        self.name = name
        self._read_timeout_s = read_timeout_s  # for messages
        self._backend = backend
        self._cap = cap
        self._too_large = too_large  # the message's tail, made by open_source
        self._pos = 0
        self.bytes_read = 0
        self.error: BaseException | None = None

    @property
    def size(self) -> int | None:
        return self._backend.size

    @property
    def cap(self) -> float:
        return self._cap

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._backend.seekable

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if not self._backend.seekable:
            raise io.UnsupportedOperation(f"{self.name} cannot seek (read forward only)")
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._backend.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(errno.EINVAL, f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer) -> int:
        n = self._read(self._pos, buffer)
        self._pos += n
        return n

    def read_at(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`, without moving the position (counted like any read)."""
        out = bytearray(size)
        got = 0
        while got < size:
            n = self._read(offset + got, memoryview(out)[got:])
            if n == 0:
                break
            got += n
        return bytes(out[:got])

    def _read(self, pos: int, buffer) -> int:
        if self.error is not None or self.closed:
            return 0
        view = memoryview(buffer).cast("B")
        # One byte past the cap proves that the source holds more; no more is ever read.
        want = len(view) if self._cap == math.inf else min(len(view), int(self._cap) + 1 - self.bytes_read)
        if want <= 0:
            return 0
        try:
            n = self._backend.readinto(pos, view[:want])
        except Exception as e:  # recorded, and raised by Source.check
            self.error = e if isinstance(e, (AudioError, MemoryError)) else _read_error(self.name, e, self._read_timeout_s)
            return 0
        self.bytes_read += n
        if self.bytes_read > self._cap:
            self.error = TooLongError(f"cannot read {self.name}: too large: {self._too_large}")
            return 0
        return n

    def detach(self):
        """The backend, which this stream no longer reads or closes."""
        backend, self._backend = self._backend, None
        self.error = self.error or ValueError("detached")
        return backend

    def close(self) -> None:
        if not self.closed and self._backend is not None:
            self._backend.close()
        super().close()


class Source:
    """An opened source: `fileobj()` is what a decoder reads, `check()` raises a read error."""

    def __init__(self, name: str, stream: SourceStream):
        self.name = name  # what messages name: the path or URL, or the manifest row of embedded bytes
        self.stream = stream
        self._file = io.BufferedReader(stream, READ_BUFFER_BYTES)

    @property
    def seekable(self) -> bool:
        return self.stream.seekable()

    def fileobj(self) -> BinaryIO:
        """The source as a file object, rewound when it can be (a second decoder may try it)."""
        if self.seekable:
            self._file.seek(0)
        return self._file

    def read_at(self, offset: int, size: int) -> bytes:
        """Bytes at `offset`, for a header parser; none from a source that cannot seek."""
        return self.stream.read_at(offset, size) if self.seekable else b""

    def descriptor(self) -> int | None:
        """The descriptor of a local regular file that holds no more bytes than its cap, for
        libsndfile to read by itself; None for every other source.

        Such a file cannot pass its cap when read through, so nothing is lost by not counting:
        a decoder that re-reads by seeking is bounded by the decode timeout, and memory by the
        decoder's window either way. What is saved is a call from C into Python per read, about
        90 per audio-second for an MP3 (mpg123 reads ~200 bytes at a time): 3-6 % of a worker's
        CPU on MP3 and FLAC (bench/RESULTS.md). libsndfile reads at the descriptor's offset, which
        stays 0: every read of ours is a pread.
        """
        backend = self.stream._backend
        if isinstance(backend, _LocalFile) and backend.size <= self.stream.cap:
            return backend.fileno()
        return None

    def check(self) -> None:
        """Raise the error that ended the stream early (cap passed, timeout, ...), if any."""
        if self.stream.error is not None:
            raise self.stream.error

    def close(self) -> None:
        self._file.close()


def open_source(name: str, *, data: bytes | None = None, max_duration_s: float, extent_s: float | None = None,
                storage_options: Mapping | None = None, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> Source:
    """Open a source for reading; AudioError if it cannot be read.

    `extent_s`: how many seconds from the file's start the request's rows may need (the end of
    its last segment, or a segment's start plus max_duration_s); default max_duration_s.
    """
    extent_s = max_duration_s if extent_s is None else extent_s
    cap = byte_cap(extent_s)
    too_large = (
        f"more than {cap:,.0f} bytes, the most that {extent_s:g} s of audio can take "
        f"({MAX_BYTES_PER_S:,} bytes/s plus {HEADER_BYTES:,} bytes of headers; max_duration_s={max_duration_s:g})"
    )
    if data is not None:
        if not data:
            raise DecodeError(f"cannot decode {name}: empty audio (0 bytes)")
        backend = _Bytes(data)
    elif "://" not in name or name.startswith("file://"):
        backend = _open_local(name)
    elif name.startswith(("http://", "https://")):
        backend = _open_http(name, read_timeout_s)
    else:
        backend = _open_fsspec(name, storage_options, read_timeout_s)
    if backend.seekable:
        return Source(name, SourceStream(name, backend, cap, too_large, read_timeout_s))
    return Source(name, _spool(name, backend, cap, too_large, read_timeout_s))


# --- backends: size, seekable, readinto(pos, buffer) -> int, close() ---------------------------


class _Bytes:
    def __init__(self, data: bytes):
        self._data = memoryview(data).cast("B")
        self.size = len(self._data)
        self.seekable = True

    def readinto(self, pos: int, buffer: memoryview) -> int:
        chunk = self._data[pos : pos + len(buffer)]
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        self._data = memoryview(b"")


class _LocalFile:
    def __init__(self, f: io.FileIO, size: int):
        self._f = f
        self.size = size
        self.seekable = True

    def readinto(self, pos: int, buffer: memoryview) -> int:
        # pread: the position is the stream's, never the descriptor's.
        return os.preadv(self._f.fileno(), [buffer], pos)

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def _open_local(name: str) -> _LocalFile:
    """A regular, non-empty local file; refused at once otherwise (/dev/zero would never end)."""
    path = name.removeprefix("file://")
    try:
        st = os.stat(path)
        _check_regular(name, st)
        # O_NONBLOCK: should the path have become a FIFO since the stat, the open must not hang.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except AudioError:
        raise
    except OSError as e:
        raise _read_error(name, e) from e
    f = io.FileIO(fd, "rb", closefd=True)
    try:
        st = os.fstat(fd)
        _check_regular(name, st)
    except BaseException:
        f.close()
        raise
    return _LocalFile(f, st.st_size)


def _check_regular(name: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a file")
        raise AudioError(f"cannot read {name}: not a regular file ({kind})")
    if st.st_size == 0:
        raise DecodeError(f"cannot decode {name}: empty file (0 bytes)")


class _Http:
    """An http(s) URL, read through Range requests when the server serves them."""

    def __init__(self, url: str, timeout_s: float):
        self.url = url
        self._timeout_s = timeout_s
        self._resp: http.client.HTTPResponse | None = None
        self._at = 0  # the offset of the next byte that _resp gives
        self._back = bytearray()  # the last bytes before _at (HTTP_BACK_BYTES at most)
        resp = self._request(0)
        if resp is None:
            raise DecodeError(f"cannot decode {url}: empty file (0 bytes)")
        if resp.status == 206:
            self.size = _range_total(resp.headers.get("Content-Range", ""))
            self.seekable = self.size is not None
        else:  # the server ignored the Range header: one forward-only stream, unless it says otherwise
            length = resp.headers.get("Content-Length", "")
            self.size = int(length) if length.isdigit() else None
            self.seekable = self.size is not None and resp.headers.get("Accept-Ranges", "").lower() == "bytes"
        if self.size == 0:
            resp.close()
            raise DecodeError(f"cannot decode {url}: empty file (0 bytes)")
        self._resp = resp

    def _request(self, pos: int) -> http.client.HTTPResponse | None:
        """A response whose body starts at byte `pos`; None if the resource is empty (416)."""
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={pos}-", "User-Agent": USER_AGENT})
        try:
            resp = urllib.request.urlopen(req, timeout=self._timeout_s)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416 and pos == 0:
                return None
            raise
        self.url = resp.geturl()  # after redirects: later ranges go straight there
        if pos and resp.status == 200:
            self._skip(resp, pos)  # a server that forgot ranges mid-way: read up to pos
        elif resp.status == 206:
            first = resp.headers.get("Content-Range", "").removeprefix("bytes ").partition("-")[0].strip()
            if first != str(pos):
                resp.close()
                sent = resp.headers.get("Content-Range")
                raise AudioError(f"cannot read {self.url}: asked for the bytes from {pos}, the server sent {sent!r}")
        return resp

    def _skip(self, resp, n: int) -> None:
        scratch = bytearray(min(n, READ_BUFFER_BYTES))
        while n > 0:
            got = resp.readinto(memoryview(scratch)[: min(n, len(scratch))])
            if got == 0:
                raise http.client.IncompleteRead(b"", n)
            n -= got

    def readinto(self, pos: int, buffer: memoryview) -> int:
        if self.size is not None and pos >= self.size:
            return 0
        if self._at - len(self._back) <= pos < self._at:  # a step back: from the bytes just read
            chunk = memoryview(self._back)[pos - (self._at - len(self._back)) :][: len(buffer)]
            buffer[: len(chunk)] = chunk
            return len(chunk)
        if self._resp is None or pos != self._at:
            if self._resp is not None and 0 < pos - self._at <= HTTP_SKIP_BYTES:
                # Read on to pos, keeping what is read: a decoder that looked at the file's end
                # steps back to its start (libsndfile does, after a header check's first bytes).
                scratch = bytearray(min(pos - self._at, READ_BUFFER_BYTES))
                while self._at < pos:
                    self._next_bytes(memoryview(scratch)[: pos - self._at])
            else:
                if not self.seekable:
                    raise io.UnsupportedOperation("the server serves no byte ranges")
                self._close_response()
                self._resp = self._request(pos)
                self._at = pos
                self._back.clear()
        return self._next_bytes(buffer)

    def _next_bytes(self, buffer: memoryview) -> int:
        """Read the response's next bytes into `buffer`, keeping them in _back."""
        n = self._resp.readinto(buffer)
        if n == 0 and len(buffer) and self._resp.length:
            # http.client reports a body that ends before its Content-Length as a plain end of
            # file; a decoder would take the part for the whole.
            raise http.client.IncompleteRead(b"", self._resp.length)
        if n == 0 and len(buffer) and self._at < (self.size or 0):
            raise http.client.IncompleteRead(b"", self.size - self._at)
        self._at += n
        self._back += buffer[:n]
        del self._back[: max(0, len(self._back) - HTTP_BACK_BYTES)]
        return n

    def _close_response(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None

    def close(self) -> None:
        self._close_response()


def _range_total(content_range: str) -> int | None:
    """The total size in "bytes 0-99/1234"; None when unknown ("*") or malformed."""
    total = content_range.rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def _open_http(url: str, timeout_s: float) -> _Http:
    try:
        return _Http(url, timeout_s)
    except AudioError:
        raise
    except Exception as e:
        if isinstance(e, MemoryError):
            raise
        raise _read_error(url, e, timeout_s) from e


class _Fsspec:
    """A file of an fsspec filesystem (s3fs, gcsfs, ...): ranged reads of FSSPEC_BLOCK_BYTES, each
    through `deadline` when the filesystem's library has no timeout of its own."""

    def __init__(self, f, deadline: _Deadline | None):
        self._f = f
        self._deadline = deadline
        self.size = getattr(f, "size", None)
        self.seekable = self.size is not None and f.seekable()

    def readinto(self, pos: int, buffer: memoryview) -> int:
        data = self._read(pos, len(buffer)) if self._deadline is None else self._deadline.call(self._read, pos, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _read(self, pos: int, size: int) -> bytes:
        if self.seekable and self._f.tell() != pos:
            self._f.seek(pos)
        return self._f.read(size)

    def close(self) -> None:
        if self._deadline is None:
            self._f.close()
        else:
            self._deadline.close(self._f.close)


class _Deadline:
    """Calls into a library that takes no timeout, made on one daemon thread and waited for at most
    `timeout_s` each. A call that does not return in time is abandoned: TimeoutError here, no more
    calls, and the thread ends whenever the library returns (a thread cannot be interrupted)."""

    def __init__(self, timeout_s: float):
        self._timeout_s = timeout_s
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._abandoned = False
        threading.Thread(target=self._serve, name="source-deadline", daemon=True).start()

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, args, result, done = item
            try:
                result.append((True, fn(*args)))
            except BaseException as e:  # raised in the caller's thread
                result.append((False, e))
            done.set()

    def call(self, fn, *args):
        if self._abandoned:
            raise TimeoutError(f"an earlier read got no answer within {self._timeout_s:g} s")
        result: list = []
        done = threading.Event()
        self._calls.put((fn, args, result, done))
        if not done.wait(self._timeout_s):
            self._abandoned = True
            self._calls.put(None)  # the thread's last item, after the call that hangs
            raise TimeoutError(f"no answer within {self._timeout_s:g} s")
        ok, value = result[0]
        if ok:
            return value
        raise value

    def close(self, fn=None) -> None:
        """Run `fn` (closing what the calls used), then end the thread; neither after a call was
        abandoned, which may still hold what `fn` would close."""
        if self._abandoned:
            return
        if fn is not None:
            try:
                self.call(fn)
            except TimeoutError:
                return
        self._calls.put(None)
        self._abandoned = True


# fsspec protocols whose library enforces a read timeout when given one, and how it is given.
# Any other protocol reads through a _Deadline. The user's own storage_options win.
def _s3_timeouts(options: dict, timeout_s: float) -> None:
    # botocore waits 60 s per attempt by default; a stalled store should fail like a stalled server.
    options["config_kwargs"] = {"connect_timeout": timeout_s, "read_timeout": timeout_s, **options.get("config_kwargs", {})}


def _ftp_timeouts(options: dict, timeout_s: float) -> None:
    options.setdefault("timeout", timeout_s)  # ftplib: every read of the control and data connections


_LIBRARY_TIMEOUTS = {"s3": _s3_timeouts, "s3a": _s3_timeouts, "ftp": _ftp_timeouts}


def _open_fsspec(url: str, storage_options: Mapping | None, timeout_s: float) -> _Fsspec:
    import fsspec

    options = dict(storage_options or {})
    library_timeout = _LIBRARY_TIMEOUTS.get(url.partition("://")[0].lower())
    deadline = None
    if library_timeout is not None:
        library_timeout(options, timeout_s)
    else:
        deadline = _Deadline(timeout_s)

    def open_file():
        fs, key = fsspec.core.url_to_fs(url, **options)
        return fs.open(key, "rb", block_size=FSSPEC_BLOCK_BYTES)

    try:
        f = open_file() if deadline is None else deadline.call(open_file)
    except Exception as e:
        if deadline is not None:
            deadline.close()
        if isinstance(e, MemoryError):
            raise
        raise _read_error(url, e, timeout_s) from e
    backend = _Fsspec(f, deadline)
    if backend.size == 0:
        backend.close()
        raise DecodeError(f"cannot decode {url}: empty file (0 bytes)")
    return backend


class _Prefixed:
    """A forward-only backend whose first bytes were already read (the attempt to spool it)."""

    def __init__(self, head: bytearray, rest):
        self._head = memoryview(head)
        self._head_len = len(head)
        self._rest = rest
        self.size = rest.size
        self.seekable = False

    def readinto(self, pos: int, buffer: memoryview) -> int:
        if pos < self._head_len:
            chunk = self._head[pos : pos + len(buffer)]
            buffer[: len(chunk)] = chunk
            return len(chunk)
        self._head = memoryview(b"")  # the decoder is past it: let it go
        return self._rest.readinto(pos, buffer)

    def close(self) -> None:
        self._rest.close()


def _spool(name: str, backend, cap: float, too_large: str, read_timeout_s: float) -> SourceStream:
    """A forward-only source: read up to SPOOL_MAX_BYTES of it. If that is all of it, it becomes
    seekable bytes (libsndfile reads it as if local); else FFmpeg reads it as it comes."""
    if backend.size is not None and backend.size > SPOOL_MAX_BYTES:
        return SourceStream(name, backend, cap, too_large, read_timeout_s)
    first = SourceStream(name, backend, cap, too_large, read_timeout_s)  # the cap holds while spooling
    head = bytearray()
    chunk = bytearray(min(SPOOL_MAX_BYTES + 1, 1 << 20))
    while len(head) <= SPOOL_MAX_BYTES:
        n = first.readinto(memoryview(chunk)[: SPOOL_MAX_BYTES + 1 - len(head)])
        if n == 0:
            break
        head += memoryview(chunk)[:n]
    error = first.error
    first.detach()
    if error is not None:
        backend.close()
        raise error
    if len(head) <= SPOOL_MAX_BYTES:
        backend.close()
        if not head:
            raise DecodeError(f"cannot decode {name}: empty file (0 bytes)")
        return SourceStream(name, _Bytes(head), cap, too_large, read_timeout_s)
    # The spooled bytes are read again from memory and counted again: the cap counts what the
    # decoder reads, so it still stops the stream where it would have.
    return SourceStream(name, _Prefixed(head, backend), cap, too_large, read_timeout_s)


# --- errors ---------------------------------------------------------------------------------


def _read_error(name: str, e: BaseException, timeout_s: float | None = None) -> AudioError:
    """An AudioError saying what happened, as a person would: refused, timed out, not found, ..."""
    return AudioError(f"cannot read {name}: {_what_happened(e, timeout_s)}")


def _what_happened(e: BaseException, timeout_s: float | None) -> str:
    if isinstance(e, urllib.error.HTTPError):
        reason = f"HTTP {e.code} {e.reason}".strip()
        if e.code in (404, 410):
            return f"not found ({reason})"
        if e.code in (401, 403):
            return f"permission denied ({reason})"
        return reason
    if isinstance(e, http.client.IncompleteRead):
        missing = f" {e.expected:,} bytes" if e.expected else ""
        return f"cut off: the connection closed{missing} before the end"
    chain = list(_chain(e))
    # The deepest cause says the most (botocore's "Could not connect" wraps a refused connection),
    # so each kind is looked for along the whole chain, the most telling first.
    if any(isinstance(c, ConnectionRefusedError) or getattr(c, "errno", None) == errno.ECONNREFUSED for c in chain):
        return "refused (connection refused)"
    for cause in chain:
        if isinstance(cause, (TimeoutError, socket.timeout)) or "Timeout" in type(cause).__name__:
            within = f"{timeout_s:g} s" if timeout_s is not None else "the read timeout"
            # urllib wraps what fails while connecting in a URLError; a stalled response is bare.
            if isinstance(e, urllib.error.URLError) or "Connect" in type(cause).__name__:
                return f"timed out (no connection within {within})"
            return f"timed out (no data for {within})"
    for cause in chain:
        if isinstance(cause, socket.gaierror):
            return f"unknown host ({cause.strerror or cause})"
        if isinstance(cause, ssl.SSLError):
            return f"TLS error ({cause.reason or cause})"
        if isinstance(cause, FileNotFoundError):
            return "not found (no such file)"
        if isinstance(cause, PermissionError):
            return "permission denied"
        if isinstance(cause, IsADirectoryError):
            return "not a regular file (a directory)"
        if isinstance(cause, ConnectionResetError):
            return "connection reset by the server"
        if type(cause).__name__ == "EndpointConnectionError":  # botocore: unreachable
            return f"cannot connect ({cause})"
    if isinstance(e, urllib.error.URLError):
        return f"cannot connect ({e.reason})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return f"{type(e).__name__}: {e}"


def _chain(e: BaseException):
    """e, then what caused it (urllib's URLError.reason, `raise ... from`, `during handling`)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            yield reason
        e = e.__cause__ or e.__context__
